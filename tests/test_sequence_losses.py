"""Sequence losses: ``ignore_index`` positions, label smoothing and the per-example convention (float64).

References are built independently of the statistics code: the Jacobian of the logits with respect to a layer's
output (a hook adds a zero tensor to it) and the layer input captured by the same hook, so that for every counted
position (n, t), with ℓ_n = (N/M)·Σ_{s real} φ_{n,s} over the M real tokens of the batch,

    Ω = (1/N) Σ_{(n,t) counted} x̄ x̄ᵀ,   Γ = (1/#counted) Σ_{(n,t) counted} Σ_s J_{n,s,t}ᵀ c·H_{n,s} J_{n,s,t}

(type-2; the empirical Γ uses the outer product of Σ_s J_{n,s,t}ᵀ ∇_{f_{n,s}} ℓ_n). A layer counts the real
positions when no real token depends on an ignored one (the head, right padding under a causal model), else every
position (docs/algorithm.md §2.7).
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.losses import loss_spec, output_gradients

B, T, D_IN, D, V = 3, 5, 3, 4, 6
IGNORE = -100


class TokenLM(nn.Module):
    """Token-wise linear → causal cumulative mean (never mixes backwards) → linear head; (B, T, V) or (B, V, T)."""

    def __init__(self, transposed: bool = False, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1, self.head, self.transposed = nn.Linear(D_IN, D), nn.Linear(D, V), transposed
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.l1(x))
        h = z.cumsum(1) / torch.arange(1, x.shape[1] + 1, dtype=x.dtype).unsqueeze(-1)
        f = self.head(h)
        return f.transpose(1, 2) if self.transposed else f


class LabelledLM(TokenLM):
    """Called as ``model(x, labels=y)``, it returns its logits and its own loss (as HF models do)."""

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        f = super().forward(x)
        if labels is None:
            return {"logits": f}
        return {"logits": f, "loss": F.cross_entropy(f.transpose(1, 2), labels, ignore_index=IGNORE)}


def _twins():
    m, t = TokenLM(), TokenLM(transposed=True)
    t.load_state_dict(m.state_dict())
    return m, t


def _batch(seed: int = 1, lengths=(5, 3, 2)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D_IN, dtype=torch.float64, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    for n, length in enumerate(lengths):
        y[n, length:] = IGNORE  # right padding
    return x, y


# -- the brute-force reference -----------------------------------------------------------------------------------
def _jacobian(run, module: nn.Module):
    """(logits (B, T, V), layer input (B, T, d_in), ∂logits/∂layer output (B, T, V, B, T, d_out)) by autograd."""
    seen = {}

    def hook(mod, inputs, out):
        seen["x"] = inputs[0].detach()
        return out + seen["delta"]

    seen["delta"] = torch.zeros_like(_out_of(module, run), requires_grad=True)
    handle = module.register_forward_hook(hook)
    try:
        f = run()
        J = torch.autograd.functional.jacobian(lambda d: _with_delta(seen, d, run), seen["delta"], vectorize=True)
    finally:
        handle.remove()
    return f.detach(), seen["x"], J


def _out_of(module, run):
    box = {}
    h = module.register_forward_hook(lambda mod, i, o: box.setdefault("o", o.detach()))
    try:
        run()
    finally:
        h.remove()
    return box["o"]


def _with_delta(seen, d, run):
    seen["delta"] = d
    return run()


def _references(run, module, mask, counted):
    """What both brute-force references start from (f, J, N, the token weight c = N/M, counted, p, x̄).

    x̄ is the layer input with its homogeneous 1; ``counted`` defaults to ``mask``.
    """
    f, x, J = _jacobian(run, module)
    n = f.shape[0]
    p = torch.softmax(f, -1)
    xb = torch.cat([x, torch.ones(*x.shape[:-1], 1, dtype=x.dtype)], -1)
    return f, J, n, n / int(mask.sum()), mask if counted is None else counted, p, xb


def brute_reduce(run, module, mask, counted=None):
    """Type-2 KFAC-reduce (Ω, Γ): x̃_n the mean of x̄ over the counted positions, Γ from Σ_t of the gradients."""
    f, J, n, c, counted, p, xb = _references(run, module, mask, counted)
    A = G = 0.0
    for i in range(n):
        xm = (xb[i] * counted[i].unsqueeze(-1)).sum(0) / counted[i].sum()
        A = A + torch.outer(xm, xm) / n
        K = J[i, :, :, i].sum(2)  # (T, V, d_out): Σ_t of ∂f_{i,s}/∂(layer output at t)
        for s in range(T):
            if mask[i, s]:
                G = G + K[s].T @ (c * (torch.diag(p[i, s]) - torch.outer(p[i, s], p[i, s]))) @ K[s] / n
    return A, G


def brute_factors(run, module, mask, fisher="type-2", targets=None, smoothing=0.0, counted=None):
    """(Ω, Γ) of ``module`` by the definition; ``counted`` (B, T) the positions that count (default: ``mask``)."""
    f, J, n, c, counted, p, xb = _references(run, module, mask, counted)
    A = sum(torch.outer(xb[i, t], xb[i, t]) for i in range(n) for t in range(T) if counted[i, t]) / n
    if fisher == "empirical":
        fr = f.clone().requires_grad_(True)
        per = F.cross_entropy(fr.transpose(1, 2), targets, reduction="none", ignore_index=IGNORE,
                              label_smoothing=smoothing)
        (v,) = torch.autograd.grad(c * per.sum(), fr)  # Σ_n ∇ℓ_n: example n's part is ∇_{f_n} ℓ_n
    G = torch.zeros(J.shape[-1], J.shape[-1], dtype=f.dtype)
    for i in range(n):
        for t in range(T):
            if not counted[i, t]:
                continue
            Jt = J[i, :, :, i, t, :]  # (T, V, d_out): every position s of example i
            if fisher == "empirical":
                g = torch.einsum("sv,svo->o", v[i], Jt)
                G += torch.outer(g, g)
            else:
                for s in range(T):
                    if mask[i, s]:
                        H = c * (torch.diag(p[i, s]) - torch.outer(p[i, s], p[i, s]))
                        G += Jt[s].T @ H @ Jt[s]
    return A, G / int(counted.sum())


def _close(got, A, G):
    torch.testing.assert_close(got.A, A, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.G, G, rtol=1e-10, atol=1e-12)


# -- kc.curvature with targets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_padded_batch_against_brute_force_and_twin(fisher):
    """Right padding: every layer drops the padding (Ω over real tokens, Γ over their count); the twin agrees."""
    m, t = _twins()
    x, y = _batch()
    mask = y != IGNORE
    got = kc.curvature(m, kc.CrossEntropy(class_dim=-1), x, y, fisher=fisher)
    twin = kc.curvature(t, kc.CrossEntropy(), x, y, fisher=fisher)
    for name in ("l1", "head"):
        A, G = brute_factors(lambda: m(x), getattr(m, name), mask, fisher, y)
        _close(got[name], A, G)
        _close(twin[name], A, G)
    assert float(got["head"].A[-1, -1]) == pytest.approx(int(mask.sum()) / B)  # bias–bias: real tokens per example


def test_reduce_averages_over_the_real_positions():
    """KFAC-reduce: x̃_n is the mean over example n's real positions (l1 under a masked prompt: all of them)."""
    m, t = _twins()
    x, y = _batch()
    y[0, 0] = IGNORE  # a masked prompt token of example 0: l1 keeps every position
    mask = y != IGNORE
    got = kc.curvature(m, kc.CrossEntropy(class_dim=-1), x, y, fisher="type-2", approx="reduce")
    twin = kc.curvature(t, kc.CrossEntropy(), x, y, fisher="type-2", approx="reduce")
    for name, counted in (("head", None), ("l1", torch.ones_like(mask))):
        A, G = brute_reduce(lambda: m(x), getattr(m, name), mask, counted)
        _close(got[name], A, G)
        _close(twin[name], A, G)


def test_padded_batch_equals_the_unpadded_examples_one_by_one():
    """The padded batch's factors are the unpadded sequences' statistics, run one at a time, normalised over M."""
    m, _ = _twins()
    x, y = _batch()
    lengths = (y != IGNORE).sum(1).tolist()
    m_real = sum(lengths)
    got = kc.curvature(m, kc.CrossEntropy(class_dim=-1), x, y, fisher="type-2")
    for name in ("l1", "head"):
        A = G = 0.0
        for i, length in enumerate(lengths):
            xi = x[i : i + 1, :length]
            per = kc.curvature(m, kc.CrossEntropy(class_dim=-1, reduction="sum"), xi, y[i : i + 1, :length],
                               fisher="type-2")[name]  # ℓ = Σ_t φ_t of one unpadded example; Γ over its length
            A = A + per.A / B
            G = G + per.G * length * (B / m_real) / m_real  # per-example loss (N/M)·Σ φ, Γ over all M tokens
        _close(got[name], A, G)


def test_a_masked_prompt_keeps_every_position_where_real_tokens_depend_on_it():
    """An ignored position that later real tokens read (cumulative mean) carries gradient: l1 keeps every row."""
    m, _ = _twins()
    x, y = _batch(lengths=(5, 5, 5))
    y[:, 0] = IGNORE  # a masked prompt token
    mask = y != IGNORE
    tm = kc.transform(m)
    got = kc.curvature(tm, kc.CrossEntropy(class_dim=-1), x, y, fisher="type-2")
    _close(got["head"], *brute_factors(lambda: m(x), m.head, mask))
    _close(got["l1"], *brute_factors(lambda: m(x), m.l1, mask, counted=torch.ones_like(mask)))
    assert tm.kfc.state.masking["head"] == "masked"
    assert "every position kept" in tm.kfc.state.masking["l1"]


# -- labels passed to the model ------------------------------------------------------------------------------------
def test_labels_keyword_masks_like_targets():
    """(b) ``model(x, labels=y)``: kc.curvature and the KFC statistics of a plain loop see the labels."""
    m = TokenLM()
    lm = LabelledLM()
    x, y = _batch()
    spec = kc.CrossEntropy(class_dim=-1)
    ref = kc.curvature(m, spec, x, y, fisher="type-2")
    got = kc.curvature(lm, spec, {"x": x, "labels": y}, None, fisher="type-2")
    assert set(got) == set(ref) == {"l1", "head"}
    for name in ref:
        _close(got[name], ref[name].A, ref[name].G)
    for fraction in (1.0, 0.5):  # the statistics in the user's backward / on the subset's rows
        lm = LabelledLM()
        opt = kc.KFC(lm, lr=0.0, loss=spec, fisher="type-2", stats_fraction=fraction)
        lm(x, labels=y)["loss"].backward()
        opt.step()
        sub = ref if fraction == 1.0 else kc.curvature(m, spec, x[:2], y[:2], fisher="type-2")
        c_ratio = 1.0 if fraction == 1.0 else (B / int((y != IGNORE).sum())) / (2 / int((y[:2] != IGNORE).sum()))
        for name in ref:  # the subset's ℓ_n is the whole batch's: c = N/M of the batch
            _close(opt.factors(name), sub[name].A, sub[name].G * c_ratio)
    emp = kc.curvature(m, spec, x, y, fisher="empirical")  # the user's own backward of the model's masked loss
    lm = LabelledLM()
    opt = kc.KFC(lm, lr=0.0, loss=spec, fisher="empirical", stats_fraction=1.0)
    lm(x, labels=y)["loss"].backward()
    opt.step()
    for name in emp:
        _close(opt.factors(name), emp[name].A, emp[name].G)


def test_hf_gpt2_causal_shift_against_brute_force():
    """(c) HF GPT-2 (random weights, tiny config) with labels= containing −100: the causal shift, per layer."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=7, n_positions=8, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 7, (2, 5), generator=g)
    labels = ids.clone()
    labels[1, 3:] = IGNORE  # right padding of example 1
    shifted = F.pad(labels, (0, 1), value=IGNORE)[:, 1:]
    mask = shifted != IGNORE
    got = kc.curvature(model, kc.CrossEntropy(class_dim=-1), {"input_ids": ids, "labels": labels}, None,
                       fisher="type-2")
    run = lambda: model(input_ids=ids).logits  # noqa: E731
    block = model.transformer.h[0]
    for name, module in (("transformer.h.0.attn.c_attn", block.attn.c_attn),
                         ("transformer.h.0.mlp.c_proj", block.mlp.c_proj)):
        A, G = brute_factors(run, module, mask)
        key = next(k for k in got if k.endswith(name.split("transformer.")[-1]))
        a = got[key]
        _close(a, A, G)


# -- label smoothing -------------------------------------------------------------------------------------------------
def test_smoothed_loss_hessian_is_that_of_the_plain_loss():
    """Σ_k q_k(−log p_k) has the logit Hessian diag p − p pᵀ: checked against a float64 autograd Hessian."""
    g = torch.Generator().manual_seed(0)
    f = torch.randn(V, dtype=torch.float64, generator=g)
    for eps in (0.0, 0.1, 0.7):
        H = torch.autograd.functional.hessian(
            lambda z, eps=eps: F.cross_entropy(z[None], torch.tensor([2]), label_smoothing=eps), f)
        p = torch.softmax(f, 0)
        torch.testing.assert_close(H, torch.diag(p) - torch.outer(p, p), rtol=1e-12, atol=1e-14)


def test_label_smoothing_fisher_and_loss():
    """Type-2 equals ε = 0's; empirical matches the brute force of the smoothed loss; batch_loss is F's."""
    m, _ = _twins()
    x, y = _batch()
    mask = y != IGNORE
    eps = 0.2
    smooth, plain = kc.CrossEntropy(class_dim=-1, label_smoothing=eps), kc.CrossEntropy(class_dim=-1)
    a, b = (kc.curvature(m, s, x, y, fisher="type-2") for s in (smooth, plain))
    for name in a:
        _close(a[name], b[name].A, b[name].G)
    emp = kc.curvature(m, smooth, x, y, fisher="empirical")
    for name in ("l1", "head"):
        _close(emp[name], *brute_factors(lambda: m(x), getattr(m, name), mask, "empirical", y, smoothing=eps))
    f = m(x)
    ref = F.cross_entropy(f.transpose(1, 2), y, ignore_index=IGNORE, label_smoothing=eps)
    torch.testing.assert_close(smooth(f, y), ref, rtol=0, atol=0)
    assert loss_spec(nn.CrossEntropyLoss(ignore_index=3, label_smoothing=0.1)) == kc.CrossEntropy(
        ignore_index=3, label_smoothing=0.1)


def test_output_vectors_and_fisher_inner_respect_the_mask():
    """MC vectors vanish at ignored terms; fisher_inner sums the real terms with c = N/M."""
    spec = kc.CrossEntropy(class_dim=-1)
    g = torch.Generator().manual_seed(0)
    f = torch.randn(B, T, V, dtype=torch.float64, generator=g)
    _, y = _batch()
    mask = spec.term_mask(f, y)
    (v,) = output_gradients(spec, "mc", f, None, 1, g, mask)
    assert bool((v[~mask] == 0).all()) and bool((v[mask] != 0).any())
    u, w = torch.randn(2, B, T, V, dtype=torch.float64, generator=g)
    p = torch.softmax(f, -1)
    H = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)
    ref = (torch.einsum("btv,btvw,btw->bt", u, H, w) * mask).sum() * (B / int(mask.sum())) / B
    torch.testing.assert_close(spec.fisher_inner(f, u, w, mask), ref, rtol=1e-12, atol=1e-14)
    assert list(output_gradients(spec, "type-2", f, mask=torch.zeros(B, T, dtype=torch.bool))) == []


# -- a KFC trajectory --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_kfc_steps_match_the_twin(fisher):
    """compile_step (eager) with ignore_index and label smoothing: the (B, T, V) model takes its twin's steps."""
    m, t = _twins()
    x, y = _batch()
    specs = (kc.CrossEntropy(class_dim=-1, label_smoothing=0.1), kc.CrossEntropy(label_smoothing=0.1))
    steps = [kc.compile_step(mod, s, compile=False, lr=0.1, damping=1e-2, fisher=fisher, stats_fraction=1.0)
             for mod, s in zip((m, t), specs, strict=True)]
    for _ in range(3):
        losses = [step(x, y) for step in steps]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=1e-12)
    for p, q in zip(m.parameters(), t.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert steps[0].optimizer.model.kfc.state.masking == {"l1": "masked", "head": "masked"}


# -- bad input -------------------------------------------------------------------------------------------------------
def test_bad_input_is_a_clear_error():
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        kc.CrossEntropy(ignore_index=-100.0)
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        kc.CrossEntropy(ignore_index=True)
    for eps in (-0.1, 1.0, "0.1"):
        with pytest.raises(ValueError, match="label_smoothing must be a float in"):
            kc.CrossEntropy(label_smoothing=eps)
    with pytest.raises(ValueError, match="class weights"):
        loss_spec(nn.CrossEntropyLoss(weight=torch.ones(V)))
    f = torch.zeros(B, T, V)
    with pytest.raises(ValueError, match="do not match logits"):
        kc.CrossEntropy(class_dim=-1).term_mask(f, torch.zeros(B, V, dtype=torch.long))
    m, _ = _twins()
    x, y = _batch()
    with pytest.raises(ValueError, match="every label is ignore_index"):
        kc.curvature(m, kc.CrossEntropy(class_dim=-1), x, torch.full_like(y, IGNORE), fisher="type-2")


def test_unknown_hf_loss_type_is_reported_once_and_not_guessed():
    """A labels= whose loss type is unknown is not used for masking (a RuntimeWarning, once)."""
    m = LabelledLM()
    m.loss_type = "ForSomethingElse"
    x, y = _batch()
    spec = kc.CrossEntropy(class_dim=-1)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = kc.curvature(m, spec, {"x": x, "labels": y}, None, fisher="type-2")
    assert any("not used to drop ignore_index" in str(e.message) for e in w)
    ref = kc.curvature(m, spec, x, torch.randint(0, V, (B, T)), fisher="type-2")  # all positions count
    torch.testing.assert_close(got["l1"].A, ref["l1"].A)


def test_subset_pass_and_exact_fisher_products_see_compile_steps_targets():
    """compile_step's targets reach the separate subset pass (stats_fraction) and the exact Fisher products.

    On a leading subset ℓ_n stays the whole batch's per-example loss: c = N/M of the batch.
    """
    m = TokenLM()
    x, y = _batch()
    spec = kc.CrossEntropy(class_dim=-1)
    step = kc.compile_step(m, spec, compile=False, lr=0.0, fisher="type-2", stats_fraction=0.5)
    step(x, y)
    c_batch = B / int((y != IGNORE).sum())
    sub = kc.curvature(TokenLM(), spec, x[:2], y[:2], fisher="type-2")
    ratio = c_batch / (2 / int((y[:2] != IGNORE).sum()))
    for name in ("l1", "head"):
        _close(step.optimizer.factors(name), sub[name].A, sub[name].G * ratio)
    # exact Fisher products on the batch the step recorded: uᵀFu = mean_n (Ju)ₙᵀ Hₙ (Ju)ₙ over the real tokens
    g = torch.Generator().manual_seed(5)
    params = dict(m.named_parameters())
    u = {p: torch.randn(p.shape, dtype=p.dtype, generator=g) for p in params.values()}
    m(x)  # two recorded calls for the products: one without visible labels, one with compile_step's targets
    with step.optimizer.model.kfc.state.visible_labels(y):
        m(x)
    calls = step.optimizer.model.kfc.state.recorded_calls()
    assert len(calls) == 2 and calls[1].labels is y and calls[0].labels is None
    gram = step.optimizer._exact_gram([u], 1.0)
    f, ju = torch.func.jvp(lambda *ps: torch.func.functional_call(m, dict(zip(params, ps, strict=True)), (x,)),
                           tuple(params.values()), tuple(u[p] for p in params.values()))
    p = torch.softmax(f, -1)
    quad = (p * ju * ju).sum(-1) - (p * ju).sum(-1) ** 2  # (Ju)ᵀ(diag p − p pᵀ)(Ju) per position
    ref = c_batch * (quad * (y != IGNORE)).sum() / B
    sizes = [c.batch_size() for c in calls]
    # the first recorded call has no visible labels (all its positions count), the second has them: mean over both
    plain = (1 / T) * quad.sum() / B
    torch.testing.assert_close(gram[0, 0], (plain * sizes[0] + ref * sizes[1]) / sum(sizes), rtol=1e-10, atol=0)


class ConvTokens(nn.Module):
    """A pointwise Conv1d over (B, C, T) — not token-aligned in the (B, T, ·) sense — then a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.head = nn.Conv1d(D_IN, D, 1), nn.Linear(D, V)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.conv(x.transpose(1, 2))).transpose(1, 2))


def test_a_layer_that_is_not_token_aligned_keeps_its_rows_and_says_so():
    """The conv's Ω counts every position (bias–bias entry T), its Γ comes from the masked loss over N·T rows."""
    model = kc.transform(ConvTokens())
    x, y = _batch()
    mask = y != IGNORE
    got = kc.curvature(model, kc.CrossEntropy(class_dim=-1), x, y, fisher="type-2")
    masking = model.kfc.state.masking
    assert masking["head"] == "masked" and "conv1d layer is not token-aligned" in masking["conv"]
    assert float(got["conv"].A[-1, -1]) == pytest.approx(T)
    assert float(got["head"].A[-1, -1]) == pytest.approx(int(mask.sum()) / B)
    plain = kc.curvature(model, kc.CrossEntropy(class_dim=-1), x, y.clamp(min=0), fisher="type-2")
    torch.testing.assert_close(got["conv"].A, plain["conv"].A, rtol=1e-12, atol=0)  # the same rows
    assert not torch.allclose(got["conv"].G, plain["conv"].G)  # but the masked loss's Γ
