"""Linear layers inside opaque calls are under KFC in the ``kc.transform`` path.

The opaque calls: ``nn.MultiheadAttention`` leaves, and fx-wrapped functions such as torchvision's
``shifted_window_attention``.

References: for attention, a twin model that spells the same attention out with batch-first ``F.linear`` calls
(which the plain fx path taps); for Swin, a float64 brute force from the per-example output gradients of the
*original* model (a recording mode keeps each projection's input and output, nothing of the library is used).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import kfc_compile as kc

E, HEADS, L, N = 8, 2, 5, 4


def _explicit_attention(t: torch.Tensor, mha: nn.MultiheadAttention) -> torch.Tensor:
    """``mha(t, t, t)[0]`` for batch-first t (N, L, E), with batch-first projections that kc.transform taps."""
    n, length, _ = t.shape
    qkv = F.linear(t, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.unflatten(-1, (3, E)).unbind(-2)
    q, k, v = [z.view(n, length, HEADS, E // HEADS).transpose(1, 2) for z in (q, k, v)]
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, length, E)
    return mha.out_proj(o)


class TinyViT(nn.Module):
    """tokens → (pre-norm) self-attention → MLP → mean-pooled head; ``explicit``: the batch-first twin."""

    def __init__(self, batch_first: bool, explicit: bool = False):
        super().__init__()
        self.batch_first, self.explicit = batch_first, explicit
        self.embed = nn.Linear(3, E)
        self.ln = nn.LayerNorm(E)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
        self.mlp = nn.Linear(E, E)
        self.head = nn.Linear(E, 3)

    def forward(self, x):  # x: (N, L, 3)
        t = self.embed(x)
        h = self.ln(t)
        if self.explicit:
            a = _explicit_attention(h, self.attn)
        elif self.batch_first:
            a = self.attn(h, h, h, need_weights=False)[0]
        else:
            s = h.transpose(0, 1)
            a = self.attn(s, s, s, need_weights=False)[0].transpose(0, 1)
        t = t + a
        t = t + torch.tanh(self.mlp(t))
        return self.head(t.mean(1))


def _data(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, L, 3, generator=g, dtype=dtype), torch.randint(0, 3, (N,), generator=g)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_attention_factors_equal_explicit_twin(batch_first, approx):
    torch.manual_seed(0)
    model = TinyViT(batch_first).double()
    twin = copy.deepcopy(model)
    twin.explicit = True
    x, y = _data()
    tm = kc.transform(model, approx)
    names = sorted(layer.name for layer in tm.kfc.layers)
    assert names == ["attn.in_proj_weight", "attn.out_proj", "embed", "head", "mlp"]
    assert tm.kfc.coverage > 0.9 and not any(u.name.startswith("attn.") for u in tm.kfc.uncovered)
    assert tm.kfc.layer("attn.in_proj_weight").g_dim == 3 * E
    got = kc.curvature(tm, nn.CrossEntropyLoss(), x, y, fisher="empirical", approx=approx)
    ref = kc.curvature(twin, nn.CrossEntropyLoss(), x, y, fisher="empirical", approx=approx)
    assert sorted(ref) == names
    for name in names:
        torch.testing.assert_close(got[name].A, ref[name].A, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(got[name].G, ref[name].G, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_statistics_subsample_whole_examples(batch_first):
    """With statistics on the first k examples only, the seq-first projections must drop whole examples."""
    torch.manual_seed(0)
    model = TinyViT(batch_first).double()
    twin = copy.deepcopy(model)
    x, y = _data()
    # the optimizer's statistics of one step, empirical Fisher: the capture keeps the subset's rows of the user's pass
    opt = kc.KFC(model, lr=0.0, approx="reduce", fisher="empirical", stats_fraction=2 / N - 1e-9, clip=None)
    nn.CrossEntropyLoss()(model(x), y).backward()
    opt.step()
    # the factors of a batch of those two examples alone (a sum-reduced loss: each example's gradient is its own,
    # as the batch-mean loss's gradients are once rescaled by N)
    sub = kc.curvature(twin, nn.CrossEntropyLoss(reduction="sum"), x[:2], y[:2], fisher="empirical",
                       approx="reduce")
    for name in ("attn.in_proj_weight", "attn.out_proj"):
        got = opt.factors(name)
        torch.testing.assert_close(got.A, sub[name].A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.G, sub[name].G, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_outputs_and_gradients_unchanged(batch_first):
    torch.manual_seed(0)
    model = TinyViT(batch_first).double()
    x, y = _data()
    tm = kc.transform(model)
    with torch.no_grad():
        assert torch.equal(tm(x), model(x))
    ref_grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    with tm.kfc.state.armed_forward():  # the armed forward runs the tapped decomposition
        out = tm(x)
    torch.testing.assert_close(out, model(x), rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(F.cross_entropy(out, y), list(model.parameters()))
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_attention_trains_with_kfc():
    torch.manual_seed(0)
    model = TinyViT(False)
    x, y = _data(torch.float32)
    # clip=None: the KL clip's forward-mode JVPs fail in torch's CPU flash attention (no forward AD), in the original
    # nn.MultiheadAttention path as well
    opt = kc.KFC(model, lr=0.05, damping=0.1, clip=None)
    with warnings.catch_warnings():
        # no "layer has no factors" warning: the attention layers got statistics
        warnings.simplefilter("error", UserWarning)
        losses = []
        for _ in range(4):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert opt.factors("attn.in_proj_weight") is not None


class CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.head = nn.Linear(E, 3)

    def forward(self, q, kv):
        return self.head(self.attn(q, kv, kv, need_weights=False)[0].mean(1))


def test_cross_attention_reported_uncovered():
    tm = kc.transform(CrossAttention())
    reasons = {u.name: u.reason for u in tm.kfc.uncovered}
    assert set(reasons) == {"attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"}
    assert all("cross-attention" in r for r in reasons.values())
    assert "cross-attention" in kc.report(tm)


# -- Swin: a torch.fx.wrap'ed function receiving the projection weights ---------------------------------------------

def _swin_block(v2: bool, window: int, shift: int):
    from torchvision.models.swin_transformer import SwinTransformerBlock, SwinTransformerBlockV2

    cls = SwinTransformerBlockV2 if v2 else SwinTransformerBlock
    return cls(dim=E, num_heads=HEADS, window_size=[window, window], shift_size=[shift, shift], mlp_ratio=2.0)


class TinySwin(nn.Module):
    def __init__(self, v2: bool, window: int = 2, shift: int = 1):
        super().__init__()
        self.block = _swin_block(v2, window, shift)
        self.head = nn.Linear(E, 3)

    def forward(self, x):  # (N, H, W, E)
        return self.head(self.block(x).mean((1, 2)))


class _Recorder(TorchFunctionMode):
    """Keeps the (input, output) of every F.linear call with a given weight; the outputs retain their gradient."""

    def __init__(self, weights):
        super().__init__()
        self.weights = weights
        self.calls = {id(w): [] for w in weights}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and id(args[1]) in self.calls:
            out.retain_grad()
            self.calls[id(args[1])].append((args[0], out))
        return out


def _brute_swin(model, x, y, weight, approx):
    """Ω, Γ of ``weight`` (weight block only) from the original model, from the rows of real tokens only.

    Per-example gradients of a summed loss; tokens the attention pads in are the rows whose qkv input is all zero
    (with this random data no real token's is).
    """
    attn = model.block.attn
    rec = _Recorder([attn.qkv.weight, weight])
    with rec:
        out = model(x)
    F.cross_entropy(out, y, reduction="sum").backward()
    ((a_qkv, _),) = rec.calls[id(attn.qkv.weight)]
    ((a, o),) = rec.calls[id(weight)]
    n = x.shape[0]
    real = a_qkv.detach().reshape(n, -1, a_qkv.shape[-1]).ne(0).any(-1)  # (N, windows·tokens)
    t = int(real[0].sum())
    assert bool(real.sum(1).eq(t).all())
    # rows are example-major: (N, windows·tokens, ·), of which the real tokens' (N, T, ·)
    a = a.detach().reshape(n, -1, a.shape[-1]).double()[real].view(n, t, -1)
    g = o.grad.reshape(n, -1, o.shape[-1]).double()[real].view(n, t, -1)
    if approx == "expand":
        A = torch.einsum("nti,ntj->ij", a, a) / n
        G = torch.einsum("nti,ntj->ij", g, g) / (n * t)
    else:
        am, gs = a.mean(1), g.sum(1)
        A, G = am.T @ am / n, gs.T @ gs / n
    return A, G


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_swin_block_factors_brute_force(v2, approx):
    torch.manual_seed(0)
    model = TinySwin(v2).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 4, 4, E, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=g)
    tm = kc.transform(model, approx)
    attn = model.block.attn
    names = {layer.name for layer in tm.kfc.layers}
    assert {"block.attn.qkv", "block.attn.proj"} <= names
    uncovered = {u.name: u.reason for u in tm.kfc.uncovered}
    assert "block.attn.qkv.weight" not in uncovered and "block.attn.proj.weight" not in uncovered
    assert "shifted_window_attention" in uncovered["block.attn.qkv.bias"]
    with torch.no_grad():
        assert torch.equal(tm(x), model(x))
    got = kc.curvature(tm, nn.CrossEntropyLoss(), x, y, fisher="empirical", approx=approx)
    for name, w in (("block.attn.qkv", attn.qkv.weight), ("block.attn.proj", attn.proj.weight)):
        layer = tm.kfc.layer(name)
        assert layer.bias is None and layer.a_dim == E  # weight block only
        A, G = _brute_swin(model, x, y, w, approx)
        torch.testing.assert_close(got[name].A, A, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(got[name].G, G, rtol=1e-10, atol=1e-12, msg=name)


def test_torchvision_vit_and_swin_coverage():
    import torchvision

    for name, size in (("vit_b_32", 224), ("swin_t", 32)):
        model = torchvision.models.get_model(name, weights=None).eval()
        tm = kc.transform(model)
        assert tm.kfc.coverage > 0.99, name
        x = torch.randn(1, 3, size, size)
        with torch.no_grad():
            assert torch.equal(tm(x), model(x))


# (window, shift, H, W): 3×5 is padded to 4×6 (shifted windows, padded tokens in masked regions of their own), 2×3
# to one 4×4 window (no shift, padded tokens attended to by real ones, as in swin_v2_s's later stages at 32×32)
PADDED = [(2, 1, 3, 5), (4, 2, 2, 3)]


@pytest.mark.parametrize("v2", [False, True])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("window, shift, h, w", PADDED)
def test_swin_padded_tokens_not_in_factors(v2, approx, window, shift, h, w):
    """The factors of a Swin block whose input is padded to whole windows are those of the real tokens' rows."""
    torch.manual_seed(0)
    model = TinySwin(v2, window, shift).double()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, h, w, E, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (3,), generator=g)
    tm = kc.transform(model, approx)
    got = kc.curvature(tm, nn.CrossEntropyLoss(), x, y, fisher="empirical", approx=approx)
    attn = model.block.attn
    for name, weight in (("block.attn.qkv", attn.qkv.weight), ("block.attn.proj", attn.proj.weight)):
        A, G = _brute_swin(model, x, y, weight, approx)
        torch.testing.assert_close(got[name].A, A, rtol=1e-10, atol=1e-12, msg=name)
        torch.testing.assert_close(got[name].G, G, rtol=1e-10, atol=1e-12, msg=name)
    with torch.no_grad():
        assert torch.equal(tm(x), model(x))


def test_swin_v2_padding_kfc_step_finite():
    """Swin V2 zeroes the key bias, so a padded token's key is exactly 0 and its gradient is scaled by 1e12.

    The cosine attention's F.normalize scales that gradient by 1/eps = 1e12: in Γ, such rows gave entries ~1e20 (a
    singular factor in swin_v2_s).
    """
    torch.manual_seed(0)
    model = TinySwin(True, window=4, shift=2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 2, 3, E, generator=g)
    y = torch.randint(0, 3, (4,), generator=g)
    G = kc.curvature(model, nn.CrossEntropyLoss(), x, y, fisher="empirical")["block.attn.qkv"].G
    assert torch.isfinite(G).all() and G.abs().max() < 1.0  # the real tokens' Γ is O(1e-2)
    opt = kc.KFC(model, lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad()
            assert torch.isfinite(loss)
    assert torch.isfinite(F.cross_entropy(model(x), y))
    assert torch.isfinite(opt.factors("block.attn.qkv").G).all()
