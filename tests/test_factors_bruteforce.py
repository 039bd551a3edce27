"""Every factor entry against a float64 brute force (docs/algorithm.md §2.3, §2.7, §11.1).

The brute force builds each patch with explicit Python loops over examples, output positions, channels and kernel
offsets, indexing the *unpadded* input and resolving padding (zeros, reflect, replicate, circular, 'same',
'valid') itself, so it shares nothing with the library's im2col. Γ comes from per-example output gradients of the
original model (``retain_grad`` on the layer output, sum-reduced loss so each example's gradient is its own).
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import kfc_compile as kc

from kfc_test_helpers import output_grads

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------------------------------
# brute force

def _source(i: int, size: int, mode: str) -> int | None:
    """Index into the unpadded input for a (possibly out-of-range) coordinate, or None for a zero."""
    if 0 <= i < size:
        return i
    if mode == "zeros":
        return None
    if mode == "reflect":
        return -i if i < 0 else 2 * (size - 1) - i
    if mode == "replicate":
        return 0 if i < 0 else size - 1
    if mode == "circular":
        return i % size
    raise ValueError(mode)


def _pads(padding, kernel, dilation) -> list[tuple[int, int]]:
    d = len(kernel)
    if padding == "valid":
        return [(0, 0)] * d
    if padding == "same":
        out = []
        for k, dl in zip(kernel, dilation, strict=True):
            total = dl * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    p = (padding,) * d if isinstance(padding, int) else tuple(padding)
    return [(v, v) for v in p]


def brute_conv_patches(x: np.ndarray, kernel, stride, padding, dilation, groups, mode) -> np.ndarray:
    """(N, groups, T, Dg): patch of every example, group and output position, channel-major, offset-minor."""
    N, C, *S = x.shape
    cg = C // groups
    pads = _pads(padding, kernel, dilation)
    out = [(s + lo + hi - dl * (k - 1) - 1) // st + 1
           for s, (lo, hi), k, dl, st in zip(S, pads, kernel, dilation, stride, strict=True)]
    positions = list(itertools.product(*[range(o) for o in out]))
    offsets = list(itertools.product(*[range(k) for k in kernel]))
    P = np.zeros((N, groups, len(positions), cg * len(offsets)))
    for n in range(N):
        for g in range(groups):
            for t, pos in enumerate(positions):
                col = 0
                for c in range(cg):
                    for off in offsets:
                        idx = []
                        for dim in range(len(S)):
                            i = pos[dim] * stride[dim] - pads[dim][0] + off[dim] * dilation[dim]
                            idx.append(_source(i, S[dim], mode))
                        if all(i is not None for i in idx):
                            P[n, g, t, col] = x[(n, g * cg + c, *idx)]
                        col += 1
    return P


def brute_factors(P: np.ndarray, grads: np.ndarray, has_bias: bool, approx: str):
    """Paper-scaled Ω, Γ from patches P (N, G, T, Dg) and per-example output gradients (N, G, T, Ig)."""
    N, G, T, _ = P.shape
    if has_bias:
        P = np.concatenate([P, np.ones((N, G, T, 1))], axis=-1)
    A = np.zeros((G, P.shape[-1], P.shape[-1]))
    Gm = np.zeros((G, grads.shape[-1], grads.shape[-1]))
    for n in range(N):
        for g in range(G):
            if approx == "expand":
                for t in range(T):
                    A[g] += np.outer(P[n, g, t], P[n, g, t]) / N
                    Gm[g] += np.outer(grads[n, g, t], grads[n, g, t]) / (N * T)
            else:
                xm = P[n, g].sum(0) / T
                gs = grads[n, g].sum(0)
                A[g] += np.outer(xm, xm) / N
                Gm[g] += np.outer(gs, gs) / N
    return A, Gm


def conv_grads_rows(gy: torch.Tensor, groups: int) -> np.ndarray:
    """(N, Cout, *out) -> (N, G, T, Ig) with the same position order as the brute-force patches."""
    N, C = gy.shape[:2]
    return gy.reshape(N, groups, C // groups, -1).permute(0, 1, 3, 2).numpy()


def check(factors, A, G, tol=1e-10):
    got_A = factors.A if factors.A.dim() == 3 else factors.A.unsqueeze(0)
    got_G = factors.G if factors.G.dim() == 3 else factors.G.unsqueeze(0)
    A, G = torch.from_numpy(A), torch.from_numpy(G)
    assert got_A.shape == A.shape and got_G.shape == G.shape
    torch.testing.assert_close(got_A, A, rtol=tol, atol=tol * max(1.0, A.abs().max().item()))
    torch.testing.assert_close(got_G, G, rtol=tol, atol=tol * max(1.0, G.abs().max().item()))


# ------------------------------------------------------------------------------------------------------------------
# the geometry grid

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


@st.composite
def conv_geometries(draw):
    d = draw(st.sampled_from([1, 2, 3]))
    kmax = {1: 4, 2: 3, 3: 2}[d]
    kernel = tuple(draw(st.integers(1, kmax)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (1,) * d if pad_kind == "same" else tuple(draw(st.integers(1, 2)) for _ in range(d))
    extra = {1: 4, 2: 3, 3: 2}[d]
    spatial = tuple(dl * (k - 1) + 1 + draw(st.integers(0, extra)) for k, dl in zip(kernel, dilation, strict=True))
    if pad_kind == "int":
        padding = draw(st.integers(0, 2))
    elif pad_kind == "tuple":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(d))
    else:
        padding = pad_kind
    if mode != "zeros":  # reflect needs pad < size; keep all non-zero modes inside one wrap
        pads = _pads(padding, kernel, dilation)
        spatial = tuple(max(s, max(lo, hi) + 1) for s, (lo, hi) in zip(spatial, pads, strict=True))
    depthwise = draw(st.booleans())
    groups = draw(st.integers(1, 3))
    cin = groups if depthwise else groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    return dict(d=d, kernel=kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, cin=cin,
                cout=cout, bias=draw(st.booleans()), mode=mode, spatial=spatial, n=draw(st.sampled_from([1, 2, 3])),
                approx=draw(st.sampled_from(["expand", "reduce"])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=40, **SETTINGS)
@given(conv_geometries())
def test_conv_factors_match_brute_force(geo):
    torch.manual_seed(geo["seed"])
    conv = CONV[geo["d"]](geo["cin"], geo["cout"], geo["kernel"], stride=geo["stride"], padding=geo["padding"],
                          dilation=geo["dilation"], groups=geo["groups"], bias=geo["bias"],
                          padding_mode=geo["mode"]).double()
    model = nn.Sequential(conv, nn.Tanh())
    x = torch.randn(geo["n"], geo["cin"], *geo["spatial"], dtype=torch.float64)
    y = torch.randn_like(model(x))
    (gy,) = output_grads(model, conv, x, y)
    P = brute_conv_patches(x.numpy(), geo["kernel"], geo["stride"], geo["padding"], geo["dilation"],
                           geo["groups"], geo["mode"])
    A, G = brute_factors(P, conv_grads_rows(gy, geo["groups"]), geo["bias"], geo["approx"])
    tm = kc.transform(model, approx=geo["approx"])
    layer = tm.kfc.layers[0]
    assert (layer.name, layer.groups, layer.a_dim, layer.g_dim) == ("0", geo["groups"], A.shape[-1], G.shape[-1])
    f = kc.curvature(tm, nn.MSELoss(reduction="sum"), x, y, fisher="empirical", approx=geo["approx"])["0"]
    check(f, A, G)
    if geo["groups"] == 1:
        assert f.A.dim() == 2 and f.G.dim() == 2


class FunctionalConv(nn.Module):
    """Geometry given to ``torch.conv2d`` positionally and to ``F.conv1d`` by keyword."""

    def __init__(self):
        super().__init__()
        self.w2 = nn.Parameter(torch.randn(4, 2, 2, 3))
        self.b2 = nn.Parameter(torch.randn(4))
        self.w1 = nn.Parameter(torch.randn(3, 4, 2))

    def forward(self, x):
        h = torch.tanh(torch.conv2d(x, self.w2, self.b2, (2, 1), (1, 0), (1, 2), 2))
        return F.conv1d(h.flatten(2), weight=self.w1, stride=2, padding="valid", dilation=3)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_functional_conv_matches_brute_force(approx):
    torch.manual_seed(2)
    model = FunctionalConv().double()
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64)
    y = torch.randn_like(model(x))
    f = kc.curvature(model, nn.MSELoss(reduction="sum"), x, y, fisher="empirical", approx=approx)
    assert set(f) == {"w2", "w1"}
    outs = {}
    orig = {"conv2d": torch.conv2d, "conv1d": F.conv1d}

    def spy(kind):
        def call(*args, **kwargs):
            out = orig[kind](*args, **kwargs)
            out.retain_grad()
            outs[kind] = ((args[0] if args else kwargs["input"]).detach(), out)
            return out
        return call

    torch.conv2d, F.conv1d = spy("conv2d"), spy("conv1d")
    try:
        nn.MSELoss(reduction="sum")(model(x), y).backward()
    finally:
        torch.conv2d, F.conv1d = orig["conv2d"], orig["conv1d"]
    xin, out = outs["conv2d"]
    P = brute_conv_patches(xin.numpy(), (2, 3), (2, 1), (1, 0), (1, 2), 2, "zeros")
    check(f["w2"], *brute_factors(P, conv_grads_rows(out.grad, 2), True, approx))
    xin, out = outs["conv1d"]
    P = brute_conv_patches(xin.numpy(), (2,), (2,), "valid", (3,), 1, "zeros")
    check(f["w1"], *brute_factors(P, conv_grads_rows(out.grad, 1), False, approx))


def test_bias_row_and_beta_counts():
    """Stride 1, pad R: Ω's bias entries, and with a = 1 everywhere the overlap counts in its weight block.

    Ω's bias-bias entry is T, the bias row is Σ_t a, and with a = 1 everywhere the weight block holds the overlap
    counts β(δ, δ') of docs/algorithm.md §2.2.
    """
    T1 = T2 = 5
    conv = nn.Conv2d(1, 1, 3, padding=1).double()
    x = torch.ones(1, 1, T1, T2, dtype=torch.float64)
    f = kc.curvature(nn.Sequential(conv), "mse", x, torch.zeros(1, 1, T1, T2, dtype=torch.float64),
                     fisher="empirical")["0"]
    offsets = list(itertools.product(range(-1, 2), repeat=2))

    def beta(d1, d2):
        return math.prod(T - max(a, b, 0) + min(a, b, 0) for T, a, b in zip((T1, T2), d1, d2, strict=True))

    expected = torch.tensor([[beta(a, b) for b in offsets] for a in offsets], dtype=torch.float64)
    torch.testing.assert_close(f.A[:9, :9], expected)
    torch.testing.assert_close(f.A[9, :9], torch.tensor([beta(a, a) for a in offsets], dtype=torch.float64))
    assert f.A[9, 9].item() == T1 * T2


@settings(max_examples=12, **SETTINGS)
@given(rank=st.sampled_from([2, 3, 4]), n=st.sampled_from([1, 2, 3]), bias=st.booleans(),
       approx=st.sampled_from(["expand", "reduce"]), seed=st.integers(0, 2**16))
def test_linear_any_rank_matches_brute_force(rank, n, bias, approx, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(3, 2, bias=bias).double()
    model = nn.Sequential(lin, nn.Tanh())
    lead = [2, 3][: rank - 2]
    x = torch.randn(n, *lead, 3, dtype=torch.float64)
    y = torch.randn(n, *lead, 2, dtype=torch.float64)
    (gy,) = output_grads(model, lin, x, y)
    P = x.reshape(n, 1, -1, 3).numpy()  # positions = all leading index tuples
    A, G = brute_factors(P, gy.reshape(n, 1, -1, 2).numpy(), bias, approx)
    f = kc.curvature(model, nn.MSELoss(reduction="sum"), x, y, fisher="empirical", approx=approx)["0"]
    check(f, A, G)


class SharedUses(nn.Module):
    """One conv called on two inputs of different sizes, and one Linear weight tied into an F.linear call."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        a = torch.tanh(self.conv(x))
        b = torch.tanh(self.conv(x[..., ::2, ::2]))
        h = torch.cat([a.flatten(2), b.flatten(2)], dim=2).transpose(1, 2)  # (N, T1 + T2, 3)
        return torch.cat([self.lin(h), F.linear(h * h, self.lin.weight, self.lin.bias)], dim=1)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_shared_weights_sum_uses_as_positions(approx):
    torch.manual_seed(0)
    model = SharedUses().double()
    x = torch.randn(2, 2, 4, 6, dtype=torch.float64)
    y = torch.randn_like(model(x))
    tm = kc.transform(model, approx=approx)
    assert {(layer.name, layer.uses) for layer in tm.kfc.layers} == {("conv", 2), ("lin", 2)}
    f = kc.curvature(tm, nn.MSELoss(reduction="sum"), x, y, fisher="empirical", approx=approx)

    g_conv = output_grads(model, model.conv, x, y)
    P = np.concatenate([brute_conv_patches(xi.numpy(), (3, 3), (1, 1), 1, (1, 1), 1, "zeros")
                        for xi in (x, x[..., ::2, ::2].contiguous())], axis=2)
    Gr = np.concatenate([conv_grads_rows(g, 1) for g in g_conv], axis=2)
    check(f["conv"], *brute_factors(P, Gr, True, approx))

    # the Linear's inputs: h (module call) and h*h (functional call), recomputed from the model
    with torch.no_grad():
        a = torch.tanh(model.conv(x))
        b = torch.tanh(model.conv(x[..., ::2, ::2]))
        h = torch.cat([a.flatten(2), b.flatten(2)], dim=2).transpose(1, 2)
    P = torch.cat([h, h * h], dim=1).reshape(2, 1, -1, 3).numpy()
    outs = []
    orig_linear = F.linear

    def spy(inp, w, bias=None):  # both uses (nn.Linear.forward calls F.linear too), in call order
        o = orig_linear(inp, w, bias)
        if w is model.lin.weight and inp.requires_grad:
            o.retain_grad()
            outs.append(o)
        return o

    F.linear = spy
    try:
        nn.MSELoss(reduction="sum")(model(x), y).backward()
    finally:
        F.linear = orig_linear
    assert len(outs) == 2
    Gr = torch.cat([o.grad for o in outs], dim=1).reshape(2, 1, -1, 2).numpy()
    check(f["lin"], *brute_factors(P, Gr, True, approx))


# ------------------------------------------------------------------------------------------------------------------
# weight-gradient consistency (docs/algorithm.md §11.1.1)

def _library_patches(site, x: torch.Tensor) -> torch.Tensor:
    """(groups, N·T, Dg) rows of the site's input, in the library's own geometry.

    The rows come from its site object and the triton_kernels reference im2col.
    """
    if site.kind == "linear":
        return site.input_rows(x)
    from triton_kernels.checks import conv_geometry
    from triton_kernels.reference import im2col

    xp = site._padded(x)
    geom = conv_geometry(xp, site.kernel_size, site.stride, site.padding, site.dilation, site.groups)
    cols = im2col(xp, geom)  # (N, G, Dg, T)
    return cols.permute(1, 0, 3, 2).reshape(site.groups, -1, cols.shape[2])


class GradModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
        self.c2 = nn.Conv1d(6, 4, 3, padding="same", padding_mode="reflect", bias=False)
        self.c3 = nn.Conv3d(1, 2, 2, padding=1, padding_mode="circular")
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.c1(x))  # (N, 6, 3, 5)
        h = torch.tanh(self.c2(h.flatten(2)))  # (N, 4, 15)
        h = self.c3(h.reshape(h.shape[0], 1, 4, 3, 5)).mean(1)  # (N, 5, 4, 6)
        return self.fc(h.reshape(h.shape[0], 4, -1).transpose(1, 2))  # (N, 30, 3)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gradient_consistency(reduction):
    """Σ_{n,t} g ⊗ p̄ over the tapped (input, Γ-side gradient) pairs equals autograd's [∇W | ∇b]."""
    torch.manual_seed(1)
    model = GradModel().double()
    x = torch.randn(3, 4, 5, 3, dtype=torch.float64)
    y = torch.randn_like(model(x))
    tm = kc.transform(model)
    assert [layer.name for layer in tm.kfc.layers] == ["c1", "c2", "c3", "fc"]
    state = tm.kfc.state
    seen = []
    record = state.record
    state.record = lambda i, xi, gy: (seen.append((i, xi.detach(), gy.detach())), record(i, xi, gy))
    factors = kc.curvature(tm, nn.MSELoss(reduction=reduction), x, y, fisher="empirical")
    del state.record
    nn.MSELoss(reduction="sum")(model(x), y).backward()  # Σ_n ∇ℓ_n for the sum-reduced per-example losses

    K = y[0].numel()
    scale = 1.0 if reduction == "sum" else float(K)  # mean: ℓ_n = (1/K) Σ_k φ_k
    assert len(seen) == 4
    for i, xi, gy in seen:
        layer_index, site = state.sites[i].layer, state.sites[i].site
        layer = tm.kfc.layers[layer_index]
        P = _library_patches(site, xi)
        if site.has_bias:
            P = torch.cat([P, P.new_ones(*P.shape[:-1], 1)], dim=-1)
        Gr = site.output_rows(gy) * scale
        grad_wb = (Gr.mT @ P).reshape(layer.weight.shape[0], -1)  # groups stacked along output rows
        expected = layer.weight.grad.reshape(layer.weight.shape[0], -1)
        if layer.bias is not None:
            expected = torch.cat([expected, layer.bias.grad.unsqueeze(1)], dim=1)
        torch.testing.assert_close(grad_wb, expected, rtol=1e-10, atol=1e-10)
        # the same patches and gradients give the library's factors
        n = x.shape[0]
        f = factors[layer.name]
        A = f.A if f.A.dim() == 3 else f.A.unsqueeze(0)
        torch.testing.assert_close(A, P.mT @ P / n, rtol=1e-10, atol=1e-10)
        G = f.G if f.G.dim() == 3 else f.G.unsqueeze(0)
        torch.testing.assert_close(G * scale**2, Gr.mT @ Gr / Gr.shape[1], rtol=1e-10, atol=1e-10)
