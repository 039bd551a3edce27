"""Linear layers written as matmuls are linear layers under KFC, with the factors of the equivalent ``nn.Linear``.

Every form (``x @ W.T``, ``x @ W``, ``torch.matmul(x, W.t())``, transposes and permutes, ``x.matmul(W)``,
``torch.mm``, ``torch.addmm`` as in HF's ``Conv1D``, a bias added after the call in either order) is compared, in
float64, with an ``nn.Linear`` twin computing the same function: the factors (``kc.curvature``, type-2 and
empirical, expand and reduce), the preconditioned gradient mapped back to the parameter's own layout, a 5-step
``kc.KFC`` trajectory, and the layers both front ends register. Weights with another use stay uncovered with the
reason, on both paths. HF GPT-2 (random weights, never downloaded): every ``Conv1D`` is a KFC layer on both paths,
with the factors of a twin whose ``Conv1D``s are ``nn.Linear``s.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.frontend.dynamo.backend import registry_for

IN, OUT, HEAD, N = 5, 4, 3, 8
AOT = {"inner": "aot_eager"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles new modules through one ``Net.forward``: dynamo's per-code recompile limit must not bind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class Conv1D(nn.Module):
    """HF's ``transformers.pytorch_utils.Conv1D``: ``addmm(b, x.view(-1, nx), W)`` with W stored (nx, nf)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


def _flat(s, x, f):
    """``f`` on the 2-d view of x, viewed back: how ``mm`` / ``addmm`` layers take inputs of any rank."""
    return f(x.view(-1, x.size(-1))).view(x.size()[:-1] + (s.out,))


# form -> (weight stored as (out, in) i.e. nn.Linear's layout, has a bias, forward, flattens the input)
FORMS = {
    "x @ W.T": (True, False, lambda s, x: x @ s.weight.T, False),
    "x @ W.T + b": (True, True, lambda s, x: x @ s.weight.T + s.bias, False),
    "matmul(x, W.t()) + b": (True, True, lambda s, x: torch.matmul(x, s.weight.t()) + s.bias, False),
    "x @ W.transpose(0, 1)": (True, False, lambda s, x: x @ s.weight.transpose(0, 1), False),
    "b + x @ W.permute(1, 0)": (True, True, lambda s, x: s.bias + x @ s.weight.permute(1, 0), False),
    "x @ W": (False, False, lambda s, x: x @ s.weight, False),
    "x @ W + b": (False, True, lambda s, x: x @ s.weight + s.bias, False),
    "b + x @ W": (False, True, lambda s, x: s.bias + x @ s.weight, False),
    "add(x.matmul(W), b)": (False, True, lambda s, x: torch.add(x.matmul(s.weight), s.bias), False),
    "mm(x2d, W) + b": (False, True, lambda s, x: _flat(s, x, lambda v: torch.mm(v, s.weight) + s.bias), True),
    "addmm(b, x2d, W)": (False, True, lambda s, x: _flat(s, x, lambda v: torch.addmm(s.bias, v, s.weight)), True),
}


class MatmulLinear(nn.Module):
    """The function of ``lin`` written as one of ``FORMS``; parameters named like ``nn.Linear``'s (same layer names)."""

    def __init__(self, lin: nn.Linear, form: str):
        super().__init__()
        out_in, has_bias, self.fn, _ = FORMS[form]
        self.out = lin.out_features
        w = lin.weight.detach().clone()
        self.weight = nn.Parameter(w if out_in else w.t().contiguous())
        self.bias = nn.Parameter(lin.bias.detach().clone()) if has_bias else None

    def forward(self, x):
        return self.fn(self, x)


class FlatLinear(nn.Linear):
    """``nn.Linear`` on the 2-d view of its input: the exact twin of a flattening form (same rows as examples)."""

    def forward(self, x):
        return super().forward(x.view(-1, x.size(-1))).view(x.size()[:-1] + (self.out_features,))


class Net(nn.Module):
    """``first`` on an input of rank ``rank`` (leading dims are positions), tanh, mean over positions, a head."""

    def __init__(self, first: nn.Module, rank: int = 3):
        super().__init__()
        self.first = first
        self.head = nn.Linear(OUT, HEAD)
        self.dims = tuple(range(1, rank - 1))

    def forward(self, x):
        h = torch.tanh(self.first(x))
        return self.head(h.mean(self.dims) if self.dims else h)


def _pair(form: str, rank: int = 3, flat_twin: bool = False) -> tuple[Net, Net]:
    """(the form's model, its nn.Linear twin), float64, same parameters."""
    torch.manual_seed(0)
    has_bias = FORMS[form][1]
    lin = (FlatLinear if flat_twin else nn.Linear)(IN, OUT, bias=has_bias).double()
    twin = Net(lin, rank).double()
    model = Net(MatmulLinear(lin, form), rank).double()
    model.head.load_state_dict(twin.head.state_dict())
    return model, twin


def _data(rank: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (N, 2, 3)[: rank - 1] + (IN,)
    return torch.randn(shape, dtype=torch.float64, generator=g), torch.randint(0, HEAD, (N,), generator=g)


def _params(model: Net, out_in: bool) -> list[torch.Tensor]:
    """The model's parameters with the first weight in nn.Linear's layout."""
    ps = [model.first.weight if out_in else model.first.weight.t()]
    if model.first.bias is not None:
        ps.append(model.first.bias)
    return ps + list(model.head.parameters())


@pytest.mark.parametrize("rank", [2, 3, 4])
@pytest.mark.parametrize("form", list(FORMS))
def test_forms_are_linear_layers_with_the_twins_factors(form, rank):
    model, twin = _pair(form, rank)
    x, y = _data(rank)
    torch.testing.assert_close(model(x), twin(x), rtol=1e-13, atol=1e-13)
    tm = kc.transform(model)
    (first,) = [layer for layer in tm.kfc.layers if layer.name == "first"]
    assert first.kind == ("linear" if FORMS[form][0] else "matmul")
    assert (first.a_dim, first.g_dim, first.bias is not None) == (IN + FORMS[form][1], OUT, FORMS[form][1])
    assert not tm.kfc.uncovered
    for fisher in ("type-2", "empirical"):
        got = kc.curvature(tm, "cross_entropy", x, y, fisher=fisher)
        ref = kc.curvature(twin, "cross_entropy", x, y, fisher=fisher)
        assert set(got) == set(ref) == {"first", "head"}
        for name in ref:
            torch.testing.assert_close(got[name].A, ref[name].A, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(got[name].G, ref[name].G, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("form", list(FORMS))
def test_reduce_factors_equal_the_twin(form):
    """KFAC-reduce pools per example: a flattening form's twin is ``nn.Linear`` on the same 2-d view (as F.linear)."""
    model, twin = _pair(form, 3, flat_twin=FORMS[form][3])
    x, y = _data(3)
    got = kc.curvature(model, "cross_entropy", x, y, fisher="type-2", approx="reduce")
    ref = kc.curvature(twin, "cross_entropy", x, y, fisher="type-2", approx="reduce")
    for name in ("first", "head"):
        torch.testing.assert_close(got[name].A, ref[name].A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got[name].G, ref[name].G, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("form", list(FORMS))
def test_preconditioned_gradient_maps_back_to_the_parameter_layout(form):
    model, twin = _pair(form)
    x, y = _data()
    opts = dict(lr=0.0, fisher="empirical", stats_fraction=1.0, clip=None, fallback=None, damping=1e-2)
    results = []
    for m in (model, twin):
        opt = kc.KFC(m, **opts)
        F.cross_entropy(m(x), y).backward()
        opt.step()  # statistics and inverses, no move (lr = 0)
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        results.append(opt.precondition())
    got, ref = results
    out_in = FORMS[form][0]
    w = model.first.weight
    assert got[w].shape == w.shape
    torch.testing.assert_close(got[w] if out_in else got[w].t(), ref[twin.first.weight], rtol=1e-11, atol=1e-13)
    # not a layout accident: the preconditioned gradient differs from the plain one
    assert (ref[twin.first.weight] - twin.first.weight.grad).abs().max() > 1e-6
    pairs = [(model.head.weight, twin.head.weight), (model.head.bias, twin.head.bias)]
    if FORMS[form][1]:
        pairs.append((model.first.bias, twin.first.bias))
    for p, q in pairs:
        torch.testing.assert_close(got[p], ref[q], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("form", list(FORMS))
def test_five_step_trajectory_equals_the_twin(form):
    """Default KFC-pre (MC Fisher on a subset, exact ν clipping, momentum, moving averages) on a fixed RNG."""
    model, twin = _pair(form)
    out_in = FORMS[form][0]
    opts = dict(lr=0.05, weight_decay=1e-3, stats_fraction=0.5, inverse_every=2)
    opt_m = kc.KFC(model, generator=torch.Generator().manual_seed(3), **opts)
    opt_t = kc.KFC(twin, generator=torch.Generator().manual_seed(3), **opts)
    start = [p.detach().clone() for p in _params(twin, True)]
    for step in range(5):
        x, y = _data(seed=10 + step)
        for m, opt in ((model, opt_m), (twin, opt_t)):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        for p, q in zip(_params(model, out_in), _params(twin, True), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert all((p - s).abs().max() > 1e-4 for p, s in zip(_params(twin, True), start, strict=True))


@pytest.mark.parametrize("form", ["x @ W.T + b", "matmul(x, W.t()) + b", "b + x @ W.permute(1, 0)", "x @ W",
                                  "add(x.matmul(W), b)", "addmm(b, x2d, W)"])
def test_compiled_path_registers_the_same_layer_with_the_twins_factors(form):
    model, twin = _pair(form)
    x, y = _data()
    tm = kc.transform(copy.deepcopy(model))
    cm = torch.compile(model, backend="kfc", options=AOT)
    ct = torch.compile(twin, backend="kfc", options=AOT)
    infos = [registry_for(cm), registry_for(ct)]
    cm(x), ct(x)

    def layers(info, kinds=True):
        return sorted((la.name, la.kind if kinds else "", la.a_dim, la.g_dim, la.uses, la.bias is not None)
                      for la in info.layers)

    assert layers(infos[0]) == layers(tm.kfc)
    assert layers(infos[0], kinds=False) == layers(infos[1], kinds=False)
    opts = dict(lr=0.0, fisher="empirical", stats_fraction=1.0, clip=None, fallback=None)
    opt_m, opt_t = kc.KFC(cm, **opts), kc.KFC(ct, **opts)
    for m, opt in ((cm, opt_m), (ct, opt_t)):
        F.cross_entropy(m(x), y).backward()
        opt.step()
    for name in ("first", "head"):
        got, ref = opt_m.factors(name), opt_t.factors(name)
        torch.testing.assert_close(got.A, ref.A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.G, ref.G, rtol=1e-12, atol=1e-14)


# case -> (parameters used, layers covered besides the head, {uncovered parameter: word in its reason ("": any)})
USES = {
    "weight_sum": ("wb", "", {"w": "weight also used by", "b": ""}),
    "transpose_twice": ("vb", "", {"v": "used by", "b": "used by add"}),
    "bias_elsewhere": ("wb", "", {"w": "bias also used by", "b": "bias also used by"}),
    "output_twice": ("wb", "w", {"b": "used by add"}),
    "addmm_alpha": ("wb", "", {"w": "addmm", "b": "addmm"}),
    "bias_2d": ("wc", "w", {"c": "used by add"}),
    "weight_left": ("vb", "", {"v": "matmul", "b": "used by add"}),
    "input_parameter": ("wp", "", {"w": "weight also used by matmul", "p": "matmul"}),
}
SHAPES = {"w": (IN, OUT), "v": (OUT, IN), "b": (OUT,), "c": (1, OUT), "p": (N, IN)}


class Uses(nn.Module):
    """A matmul weight and what else touches the parameters, per case (only the case's parameters exist)."""

    def __init__(self, case: str):
        super().__init__()
        self.case = case
        for name in USES[case][0]:
            self.register_parameter(name, nn.Parameter(torch.randn(SHAPES[name]) * 0.3))
        self.head = nn.Linear(OUT, HEAD)

    def forward(self, x):
        c = self.case
        if c == "weight_sum":
            h = x @ self.w + self.b + 0.1 * self.w.sum()
        elif c == "transpose_twice":
            vt = self.v.T  # one view, two users: the matmul and the sum
            h = x @ vt + self.b + vt.sum()
        elif c == "bias_elsewhere":
            h = x @ self.w + self.b + self.b.square().sum()
        elif c == "output_twice":  # the matmul output is used besides the add: no bias fused
            z = x @ self.w
            h = (z + self.b) * z
        elif c == "addmm_alpha":
            h = torch.addmm(self.b, x, self.w, alpha=2.0)
        elif c == "bias_2d":  # not a bias of shape (out,)
            h = x @ self.w + self.c
        elif c == "weight_left":
            h = (self.v @ x.T).T + self.b
        else:  # "input_parameter": a parameter as the input has no batch rows
            h = x @ self.w + self.p @ self.w
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("case", list(USES))
def test_a_weight_with_another_use_stays_uncovered_on_both_paths(case):
    _, covered, expected = USES[case]
    x = torch.randn(N, IN, dtype=torch.float64)
    torch.manual_seed(0)
    model = Uses(case).double()
    tm = kc.transform(copy.deepcopy(model))
    cm = torch.compile(model, backend="kfc", options=AOT)
    info = registry_for(cm)
    cm(x)
    for kfc in (tm.kfc, info):
        reasons = {u.name: u.reason for u in kfc.uncovered}
        assert set(reasons) == set(expected), (case, reasons)
        for name, word in expected.items():
            assert word in reasons[name], (case, name, reasons[name])
        assert {la.name for la in kfc.layers} == {"head", *covered}
        for la in kfc.layers:
            if la.name == "w":  # a bias-free layer: the add is not its bias
                assert la.bias is None and la.a_dim == IN and la.kind == "matmul"


class Shared(nn.Module):
    """One (out, in) weight through ``F.linear`` and ``x @ W.T`` (one layer), another through F.linear and ``x @ W``."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(IN, IN) * 0.3)
        self.s = nn.Parameter(torch.randn(IN, IN) * 0.3)
        self.head = nn.Linear(IN, HEAD)

    def forward(self, x):
        h = torch.tanh(F.linear(x, self.a))
        h = torch.tanh(h @ self.a.T)
        h = torch.tanh(F.linear(h, self.s) + h @ self.s)
        return self.head(h)


def test_a_weight_shared_by_linear_and_matmul_calls():
    """``x @ W.T`` is ``F.linear(x, W)``: both calls are uses of one layer; ``x @ W`` holds W the other way round.

    No Kronecker pair fits ``F.linear(x, W)`` and ``x @ W`` both, so that weight is uncovered and the reason names the
    matmul.
    """
    torch.manual_seed(0)
    x, y = _data(2)
    model = Shared().double()
    tm = kc.transform(copy.deepcopy(model))
    cm = torch.compile(model, backend="kfc", options=AOT)
    info = registry_for(cm)
    cm(x)
    for kfc in (tm.kfc, info):
        (a,) = [la for la in kfc.layers if la.name == "a"]
        assert (a.kind, a.uses) == ("linear", 2)
        reasons = {u.name: u.reason for u in kfc.uncovered}
        assert set(reasons) == {"s"} and "matmul" in reasons["s"] and "linear" in reasons["s"]
    # two uses of one layer: Ω and Γ add the rows of both calls (expand), against explicit rows
    f = kc.curvature(tm, "cross_entropy", x, y, fisher="empirical")["a"]
    h1 = torch.tanh(F.linear(x, model.a))
    torch.testing.assert_close(f.A, (x.T @ x + h1.T @ h1) / N, rtol=1e-12, atol=1e-14)


transformers = pytest.importorskip("transformers")


class LM(nn.Module):
    """A causal LM's last-position logits (the loss is one term per example)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids, use_cache=False).logits[:, -1]


def _gpt2() -> tuple[LM, LM, list[str]]:
    """HF GPT-2 tiny (random weights) and its twin with every ``Conv1D`` an ``nn.Linear``; the Conv1D names."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.pytorch_utils import Conv1D as HFConv1D

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, attn_pdrop=0.0,
                     embd_pdrop=0.0, resid_pdrop=0.0)
    model = LM(GPT2LMHeadModel(cfg)).double().eval()
    twin = copy.deepcopy(model)
    names = [n for n, m in model.named_modules() if isinstance(m, HFConv1D)]
    for name in names:
        conv = twin.get_submodule(name)
        lin = nn.Linear(conv.weight.shape[0], conv.nf).double()
        lin.weight.data.copy_(conv.weight.t())
        lin.bias.data.copy_(conv.bias)
        parent, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent), child, lin)
    return model, twin, names


def test_hf_gpt2_conv1d_layers_are_under_kfc_on_both_paths():
    model, twin, names = _gpt2()
    assert len(names) == 8
    ids = torch.randint(0, 64, (4, 10), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 64, (4,), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids), twin(ids), rtol=1e-12, atol=1e-12)
    tm = kc.transform(copy.deepcopy(model))
    cm = torch.compile(model, backend="kfc", options=AOT)
    ct = torch.compile(twin, backend="kfc", options=AOT)
    infos = [registry_for(cm), registry_for(ct)]
    cm(ids), ct(ids)
    for kfc in (infos[0], tm.kfc):  # compiled, and eager (Conv1D modules traced inside black-boxed blocks)
        conv = {la.name: la for la in kfc.layers if la.kind == "matmul"}
        assert sorted(conv) == sorted(names), sorted(conv)
        assert all(la.bias is not None for la in conv.values())
    opts = dict(lr=0.0, fisher="empirical", stats_fraction=1.0, clip=None, fallback="sgd")
    opt_m, opt_t, opt_e = kc.KFC(cm, **opts), kc.KFC(ct, **opts), kc.KFC(tm, **opts)
    for m, opt in ((cm, opt_m), (ct, opt_t), (tm, opt_e)):
        F.cross_entropy(m(ids), y).backward()
        opt.step()
    for name in names:
        ref = opt_t.factors(name)
        for opt in (opt_m, opt_e):
            got = opt.factors(name)
            torch.testing.assert_close(got.A, ref.A, rtol=1e-10, atol=1e-14)
            torch.testing.assert_close(got.G, ref.G, rtol=1e-10, atol=1e-14)
