"""The ``kfc`` torch.compile backend.

Entry point, equivalence with the eager ``transform`` path, graph breaks, recompiles, parameters left out.

Compiles are slow on the CI's 2 CPU cores, so only the equivalence test goes through inductor; the others hand
the instrumented graphs to ``aot_eager`` (``options={"inner": "aot_eager"}``): the instrumentation, the
registry and the dynamo recompile behaviour are the same, only the final code generator differs.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.frontend.dynamo import backend as kb
from kfc_compile.runtime.attention import self_attention

AOT_EAGER = {"inner": "aot_eager"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def test_entry_point_in_fresh_interpreter():
    code = ("import sys, torch\n"
            "assert 'kfc_compile' not in sys.modules\n"
            "assert 'kfc' in torch._dynamo.list_backends()\n"
            "from torch._dynamo.backends.registry import lookup_backend\n"
            "fn = lookup_backend('kfc')\n"
            "assert fn.__module__ == 'kfc_compile.frontend.dynamo.backend', fn.__module__\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# -- the attention decomposition -------------------------------------------------------------------------------

@pytest.mark.parametrize("mask, padding, need_weights, average", [
    (None, False, False, True), (None, True, True, True), ("bool", True, False, True), ("float", False, True, False),
    ("3d", True, True, True),
])
def test_self_attention_decomposition_is_exact(mask, padding, need_weights, average):
    torch.manual_seed(0)
    L, N, E, H = 5, 3, 8, 2
    x = torch.randn(L, N, E, dtype=torch.float64)
    w, b = torch.randn(3 * E, E, dtype=torch.float64), torch.randn(3 * E, dtype=torch.float64)
    wo, bo = torch.randn(E, E, dtype=torch.float64), torch.randn(E, dtype=torch.float64)
    am = {None: None, "bool": torch.rand(L, L) < 0.3, "float": torch.randn(L, L, dtype=torch.float64),
          "3d": torch.randn(N * H, L, L, dtype=torch.float64)}[mask]
    if mask == "bool":
        am.fill_diagonal_(False)
    kpm = None
    if padding:
        kpm = torch.zeros(N, L, dtype=torch.bool)
        kpm[0, -1] = kpm[2, 1] = True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.multi_head_attention_forward(x, x, x, E, H, w, b, None, None, False, 0.0, wo, bo, training=True,
                                             key_padding_mask=kpm, need_weights=need_weights, attn_mask=am,
                                             average_attn_weights=average)
    got = self_attention(x, E, H, w, b, 0.0, wo, bo, True, kpm, need_weights, am, average, None, -1, -1)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-12, atol=1e-12)
    if need_weights:
        torch.testing.assert_close(got[1], ref[1], rtol=1e-12, atol=1e-12)
    else:
        assert got[1] is None and ref[1] is None


# -- equivalence with the eager path ---------------------------------------------------------------------------

E, HEADS = 8, 2


def _explicit_attention(t: torch.Tensor, mha: nn.MultiheadAttention, batch_first: bool = False) -> torch.Tensor:
    """The same self-attention as ``mha(t, t, t, need_weights=False)``, written with F.linear calls.

    ``kc.transform`` can see those calls (t: (N, L, E)). ``batch_first``: the projections see (N, L, ·) tensors.
    """
    if batch_first:
        N, L, _ = t.shape
        qkv = F.linear(t, mha.in_proj_weight, mha.in_proj_bias)
        q, k, v = qkv.unflatten(-1, (3, E)).unbind(-2)
        q, k, v = [z.view(N, L, HEADS, E // HEADS).transpose(1, 2) for z in (q, k, v)]
        return mha.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(N, L, E))
    x = t.transpose(0, 1)
    L, N, _ = x.shape
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.unflatten(-1, (3, E)).unbind(-2)  # unpacked: fx can trace a fixed-size unpack
    q, k, v = [z.reshape(L, N * HEADS, E // HEADS).transpose(0, 1).view(N, HEADS, L, E // HEADS) for z in (q, k, v)]
    o = F.scaled_dot_product_attention(q, k, v).permute(2, 0, 1, 3).reshape(L * N, E)
    return mha.out_proj(o).view(L, N, E).transpose(0, 1)


class ConvAttentionNet(nn.Module):
    """conv → BN → in-place ReLU → strided conv → tokens → nn.MultiheadAttention → linear head."""

    def __init__(self, explicit: bool = False):
        super().__init__()
        self.explicit = explicit
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, E, 3, stride=2)
        self.attn = nn.MultiheadAttention(E, HEADS, batch_first=True)
        self.fc = nn.Linear(E, 5)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)), inplace=True)
        t = F.relu(self.c2(h)).flatten(2).transpose(1, 2)
        if self.explicit:
            a = _explicit_attention(t, self.attn, batch_first=self.explicit == "batch_first")
        else:
            a = self.attn(t, t, t, need_weights=False)[0]
        return self.fc((t + a).mean(1))


def _train(model, opt, batches, loss_fn=F.cross_entropy):
    for x, y in batches:
        loss_fn(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def _batches(n_steps, sizes, shape, classes, dtype=torch.float32, seed=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_steps):
        n = sizes[i] if isinstance(sizes, (list, tuple)) else sizes
        out.append((torch.randn(n, *shape, generator=g, dtype=dtype), torch.randint(0, classes, (n,), generator=g)))
    return out


def _assert_same_training(eager_opt, opt, eager_model, compiled_model) -> None:
    """float64 eager and compiled runs agree: every layer's factors and every parameter."""
    for layer in eager_opt.layers:
        fe, fc = eager_opt.factors(layer.name), opt.factors(layer.name)
        torch.testing.assert_close(fc.A, fe.A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(fc.G, fe.G, rtol=1e-12, atol=1e-14)
    for pe, pc in zip(eager_model.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(pc, pe, rtol=1e-12, atol=1e-14)


def test_kfc_backend_matches_eager_transform():
    """5 KFC steps in float64: ``torch.compile(m, backend="kfc")`` (inductor) against the eager ``transform`` path.

    MC Fisher, statistics every 2 steps, inverses at steps 1-3, on a model whose attention calls
    ``F.multi_head_attention_forward``. The eager twin spells the attention out with ``F.linear`` (transform
    cannot see inside nn.MultiheadAttention), so both precondition the same 5 layers, packed in_proj included.
    Tolerance: 1e-10 relative on every factor and parameter (inductor reorders float64 reductions).
    """
    torch.manual_seed(0)
    base = ConvAttentionNet().double()
    eager_model = copy.deepcopy(base)
    eager_model.explicit = True
    compiled_model = copy.deepcopy(base)
    opts = dict(lr=0.02, damping=0.01, stats_every=2, inverse_every=3, fisher="mc", clip=None, stats_fraction=1.0)
    eager_opt = kc.KFC(eager_model, generator=torch.Generator().manual_seed(1), **opts)
    cm = torch.compile(compiled_model, backend="kfc")
    opt = kc.KFC(cm, generator=torch.Generator().manual_seed(1), **opts)
    assert opt.layers == []  # found when dynamo compiles
    batches = _batches(5, 6, (3, 8, 8), 5, torch.float64)
    _train(eager_model, eager_opt, batches)
    _train(cm, opt, batches)

    names = [layer.name for layer in eager_opt.layers]
    assert names == ["c1", "c2", "attn.in_proj_weight", "attn.out_proj", "fc"]
    assert sorted(layer.name for layer in opt.layers) == sorted(names)
    assert cm.kfc.graphs == 1
    assert [u.name for u in cm.kfc.uncovered] == ["bn.weight", "bn.bias"]
    for name in names:
        fe, fc = eager_opt.factors(name), opt.factors(name)
        torch.testing.assert_close(fc.A, fe.A, rtol=1e-10, atol=1e-12 * fe.A.abs().max().item())
        torch.testing.assert_close(fc.G, fe.G, rtol=1e-10, atol=1e-12 * fe.G.abs().max().item())
    moved = False
    for (name, pe), (_, pc), (_, p0) in zip(eager_model.named_parameters(), compiled_model.named_parameters(),
                                            base.named_parameters(), strict=True):
        torch.testing.assert_close(pc, pe, rtol=1e-10, atol=1e-12, msg=name)
        moved |= not torch.equal(pe, p0)
    assert moved
    torch.testing.assert_close(compiled_model.bn.running_mean, eager_model.bn.running_mean, rtol=1e-10, atol=1e-12)


def test_kfc_backend_attention_statistics_are_batch_first():
    """approx="reduce" groups positions by example, so the attention projections must reach the statistics batch-first.

    The projections see sequence-first tensors: compare with an eager twin whose projections are batch-first.
    """
    torch.manual_seed(0)
    base = ConvAttentionNet().double()
    eager_model = copy.deepcopy(base)
    eager_model.explicit = "batch_first"
    compiled_model = copy.deepcopy(base)
    opts = dict(lr=0.02, damping=0.01, fisher="mc", clip=None, approx="reduce", stats_fraction=1.0)
    eager_opt = kc.KFC(eager_model, generator=torch.Generator().manual_seed(1), **opts)
    cm = torch.compile(compiled_model, backend="kfc", options=AOT_EAGER)
    opt = kc.KFC(cm, generator=torch.Generator().manual_seed(1), **opts)
    batches = _batches(2, 6, (3, 8, 8), 5, torch.float64)
    _train(eager_model, eager_opt, batches)
    _train(cm, opt, batches)
    for name in ("attn.in_proj_weight", "attn.out_proj", "fc"):
        fe, fc = eager_opt.factors(name), opt.factors(name)
        torch.testing.assert_close(fc.A, fe.A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(fc.G, fe.G, rtol=1e-10, atol=1e-12)


class BrokenNet(nn.Module):
    """Three layers across a graph break (two dynamo graphs); the conv is applied twice."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 3, 3, padding=1)
        self.l1 = nn.Linear(3, 7)
        self.l2 = nn.Linear(7, 4)

    def forward(self, x):
        h = self.l1(torch.tanh(self.c(torch.tanh(self.c(x)))).mean((2, 3)))
        torch._dynamo.graph_break()
        return self.l2(torch.tanh(h))


def test_graph_break_every_graph_instrumented():
    torch.manual_seed(0)
    base = BrokenNet().double()
    eager_model, compiled_model = copy.deepcopy(base), copy.deepcopy(base)
    opts = dict(lr=0.05, damping=0.01, fisher="empirical", clip=None, stats_fraction=1.0)
    eager_opt = kc.KFC(eager_model, **opts)
    cm = torch.compile(compiled_model, backend="kfc", options=AOT_EAGER)
    opt = kc.KFC(cm, **opts)
    batches = _batches(2, 5, (3, 6, 6), 4, torch.float64)
    _train(eager_model, eager_opt, batches)
    _train(cm, opt, batches)
    assert cm.kfc.graphs == 2
    assert dict(torch._dynamo.utils.counters["graph_break"])  # the model's own break
    assert sorted(layer.name for layer in opt.layers) == ["c", "l1", "l2"]
    assert next(layer for layer in opt.layers if layer.name == "c").uses == 2
    _assert_same_training(eager_opt, opt, eager_model, compiled_model)


def test_recompiles_bounded():
    """20 steps with a new lr every step (a scheduler), statistics every 3 steps and a smaller last batch.

    The first graph serves both kinds of step, the partial batch adds one dynamic-shape graph, nothing else.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3))
    cm = torch.compile(model, backend="kfc", options=AOT_EAGER)
    opt = kc.KFC(cm, lr=0.1, damping=0.1, stats_every=3, inverse_every=5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 / (1 + k))
    lrs = set()
    for x, y in _batches(20, [8] * 19 + [5], (3, 6, 6), 3):
        F.cross_entropy(cm(x), y).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        lrs.add(opt.param_groups[0]["lr"])
    assert len(lrs) == 20
    assert cm.kfc.graphs <= 2
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    assert not torch._dynamo.utils.counters["graph_break"]
    assert all(opt.factors(layer.name) is not None for layer in opt.layers) and len(opt.layers) == 2
    assert opt.layer_states()[0].running.updates == 7  # statistics at steps 1, 4, ..., 19


class TiedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 6)

    def forward(self, idx):
        h = torch.tanh(self.hidden(self.emb(idx).mean(1)))
        return F.linear(h, self.emb.weight)  # output projection tied to the embedding


def test_weight_with_another_use_goes_to_fallback():
    cm = torch.compile(TiedNet(), backend="kfc", options=AOT_EAGER)
    opt = kc.KFC(cm, lr=0.1, fisher="empirical", clip=None)
    F.cross_entropy(cm(torch.randint(0, 10, (4, 3))), torch.randint(0, 10, (4,))).backward()
    opt.step()
    assert [layer.name for layer in opt.layers] == ["hidden"]
    reasons = {u.name: u.reason for u in cm.kfc.uncovered}
    assert "embedding" in reasons["emb.weight"]
    assert {n for g in opt.param_groups if g["role"] == "fallback" for n in opt.fallback_names} == {"emb.weight"}


def test_layer_dropped_when_a_later_graph_reveals_another_use():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            h = self.fc(x)
            torch._dynamo.graph_break()
            return h @ self.fc.weight  # a second graph uses the weight outside a linear call

    cm = torch.compile(Reuse(), backend="kfc", options=AOT_EAGER)
    opt = kc.KFC(cm, lr=0.1, fisher="empirical", clip=None)
    with pytest.warns(UserWarning, match="leaves KFC"):
        cm(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert opt.layers == [] and "matmul" in {u.name: u.reason for u in cm.kfc.uncovered}["fc.weight"]


def test_graphs_compiled_before_the_optimizer_are_adopted():
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    cm = torch.compile(model, backend="kfc", options=AOT_EAGER)
    cm(torch.randn(4, 5))  # compiled before any registry exists: an orphan registry keeps the layers
    opt = kc.KFC(cm, lr=0.1, fisher="empirical", clip=None)
    assert [layer.name for layer in opt.layers] == ["0", "2"]
    F.cross_entropy(cm(torch.randn(4, 5)), torch.randint(0, 3, (4,))).backward()
    opt.step()
    assert all(opt.factors(n) is not None for n in ("0", "2"))
    assert cm.kfc.graphs == 1


def test_other_backends_are_refused():
    with pytest.raises(NotImplementedError, match="backend='kfc'"):
        kc.KFC(torch.compile(nn.Linear(3, 2), backend="aot_eager"), lr=0.1)
    info = kb.registry_for(torch.compile(nn.Linear(3, 2), backend="kfc"))
    assert info.layers == [] and "no graph compiled yet" in info.uncovered[0].reason


def test_inference_and_no_grad_calls():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(3 * 16, 2))
    cm = torch.compile(model, backend="kfc", options=AOT_EAGER)
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(cm(x), model(x))
    torch.testing.assert_close(cm(x), model(x))
    assert [layer.name for layer in kb.registry_for(cm).layers] == ["0", "3"]


def test_registries_do_not_keep_models_alive():
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    alive = weakref.ref(model[0].weight)
    cm = torch.compile(model, backend="kfc", options=AOT_EAGER)
    opt = kc.KFC(cm, lr=0.1, fisher="empirical", clip=None)
    F.cross_entropy(cm(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
    opt.step()
    assert len(opt.layers) == 2
    del model, cm, opt
    torch._dynamo.reset()
    gc.collect()
    assert alive() is None


@pytest.mark.parametrize("backend", ["aot_eager", "kfc"])
def test_compiled_transform_taps_do_not_break_graphs(backend):
    """``torch.compile(kc.transform(m))`` (any backend): the capture taps neither break the graph nor guard.

    Inside dynamo the capture taps call kfc::record, so they neither break the graph nor guard on the capture flags;
    only the armed output tap (the Fisher pass needs an eager autograd node on the model output) breaks, at the very
    end, on statistics steps. The kfc backend sees those taps and adds none of its own.
    """
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(4, 4, 3, stride=2),
                         nn.Flatten(), nn.Linear(4 * 9, 5)).double()
    eager_model, compiled_model = copy.deepcopy(base), copy.deepcopy(base)
    opts = dict(lr=0.05, damping=0.01, stats_every=2, inverse_every=3, clip=None, stats_fraction=1.0)
    eager_opt = kc.KFC(eager_model, generator=torch.Generator().manual_seed(1), **opts)
    options = AOT_EAGER if backend == "kfc" else None
    cm = torch.compile(kc.transform(compiled_model), backend=backend, options=options)
    opt = kc.KFC(cm, generator=torch.Generator().manual_seed(1), **opts)
    taps_before = kb.STATS["sites"]
    batches = _batches(4, 6, (3, 8, 8), 5, torch.float64)
    _train(eager_model, eager_opt, batches)
    _train(cm, opt, batches)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    breaks = torch._dynamo.utils.counters["graph_break"]
    assert breaks and all("_armed_output_tap" in reason for reason in breaks)
    assert kb.STATS["sites"] == taps_before
    _assert_same_training(eager_opt, opt, eager_model, compiled_model)


def test_statistics_subset_compiled_equals_eager():
    """stats_fraction < 1: the eager and the kfc-backend optimizers both give the factors of the first examples.

    The eager optimizer runs a separate forward of the subset, the kfc-backend model keeps the capture in the user's
    pass and uses the subset's rows; for a model without cross-example coupling and the deterministic type-2 Fisher
    both give the factors of the first examples.
    """
    torch.manual_seed(0)
    base = BrokenNet().double()
    eager_model, compiled_model = copy.deepcopy(base), copy.deepcopy(base)
    opts = dict(lr=0.05, damping=0.01, fisher="type-2", clip=None, stats_fraction=0.4)
    eager_opt = kc.KFC(eager_model, **opts)
    cm = torch.compile(compiled_model, backend="kfc", options=AOT_EAGER)
    opt = kc.KFC(cm, **opts)
    batches = _batches(1, 5, (3, 6, 6), 4, torch.float64)  # one statistics step: the factors are its own
    _train(eager_model, eager_opt, batches)
    _train(cm, opt, batches)
    x, y = batches[0]
    ref = kc.curvature(copy.deepcopy(base), "cross_entropy", x[:2], y[:2], fisher="type-2")  # ceil(0.4·5) = 2
    assert sorted(ref) == sorted(layer.name for layer in eager_opt.layers) == sorted(layer.name for layer in opt.layers)
    for name, f in ref.items():
        for got in (eager_opt.factors(name), opt.factors(name)):
            torch.testing.assert_close(got.A, f.A, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got.G, f.G, rtol=1e-12, atol=1e-14)


def test_two_modules_of_one_class_each_get_their_own_graphs(monkeypatch):
    """Two modules compiled with backend="kfc" and no options each get their own layers and statistics.

    torch.compile(m, backend="kfc") without options hands dynamo the same backend function for every module; dynamo
    would then run the first module's graphs (and taps) for the second. Each module must get its own layers and
    statistics, equal to an eager twin's.
    """
    from torch._dynamo.backends.registry import lookup_backend

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx",
                        lambda gm, ex, config_patches=None: lookup_backend("aot_eager")(gm, ex))  # fast CI
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()  # noqa: E731
    bases = [make(), make()]
    opts = dict(lr=0.05, damping=0.01, fisher="type-2", clip=None, stats_fraction=1.0)
    batches = _batches(2, 6, (4,), 3, torch.float64)
    compiled, eager = [], []
    for base in bases:
        cm = torch.compile(copy.deepcopy(base), backend="kfc")
        compiled.append((cm, kc.KFC(cm, **opts)))
        em = copy.deepcopy(base)
        eager.append((em, kc.KFC(em, **opts)))
    for x, y in batches:  # the two compiled modules alternate, as in a training loop holding both
        for (cm, opt), (em, eopt) in zip(compiled, eager, strict=True):
            _train(cm, opt, [(x, y)])
            _train(em, eopt, [(x, y)])
    for (cm, opt), (em, eopt) in zip(compiled, eager, strict=True):
        assert [layer.name for layer in opt.layers] == ["0", "2"]
        for name in ("0", "2"):
            torch.testing.assert_close(opt.factors(name).A, eopt.factors(name).A, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(opt.factors(name).G, eopt.factors(name).G, rtol=1e-12, atol=1e-14)
        for pc, pe in zip(cm.parameters(), em.parameters(), strict=True):
            torch.testing.assert_close(pc, pe, rtol=1e-12, atol=1e-14)
