"""Preconditioning against dense float64 solves (docs/algorithm.md §5.1–5.2, §11.1 item 3)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature import inverses as P
from kfc_compile.curvature.decompositions import eigendecompose, factored_inverses
from kfc_compile.curvature.precondition import apply_buckets, build_buckets


def spd(groups, d, gen, rank=None):
    X = torch.randn(groups, d, rank or 3 * d, dtype=torch.float64, generator=gen)
    return X @ X.mT / X.shape[-1] + 0.05 * torch.eye(d, dtype=torch.float64)


def dense_eigen(A, G, g, eta, scale=1.0):
    """(scale·kron(Γ, Ω) + η I)⁻¹ vec(g) per group, row-major [W | b]."""
    out = []
    for i in range(A.shape[0]):
        K = scale * torch.kron(G[i], A[i]) + eta * torch.eye(A.shape[-1] * G.shape[-1], dtype=torch.float64)
        out.append(torch.linalg.solve(K, g[i].reshape(-1)).reshape(g[i].shape))
    return torch.stack(out)


def dense_factored(A, G, g, eta, scale=1.0):
    """kron(Γ_d, Ω_d)⁻¹ vec(g) with Ω_d = scale·Ω + π√η I, Γ_d = Γ + √η/π I, π from the trace norms."""
    out = []
    for i in range(A.shape[0]):
        Ai = scale * A[i]
        da, dg = Ai.shape[-1], G.shape[-1]
        pi = ((torch.trace(Ai) / da) / (torch.trace(G[i]) / dg)).sqrt()
        s = eta ** 0.5
        Ad = Ai + pi * s * torch.eye(da, dtype=torch.float64)
        Gd = G[i] + s / pi * torch.eye(dg, dtype=torch.float64)
        out.append(torch.linalg.solve(torch.kron(Gd, Ad), g[i].reshape(-1)).reshape(g[i].shape))
    return torch.stack(out)


LAYERS = [
    ("linear+bias", lambda: nn.Linear(5, 4)),
    ("linear", lambda: nn.Linear(5, 3, bias=False)),
    ("conv+bias", lambda: nn.Conv2d(3, 4, 2)),
    ("grouped conv+bias", lambda: nn.Conv2d(4, 6, (2, 1), groups=2)),
    ("depthwise conv", lambda: nn.Conv1d(3, 3, 3, groups=3, bias=False)),
]


@pytest.mark.parametrize("method", ["eigen", "factored"])
@pytest.mark.parametrize("eta,scale", [(0.0, 1.0), (0.3, 1.0), (1e-2, 7.0)])
def test_layer_preconditioner_matches_dense_solve(method, eta, scale):
    gen = torch.Generator().manual_seed(0)
    A, G = spd(2, 6, gen), spd(2, 3, gen)
    g = torch.randn(2, 3, 6, dtype=torch.float64, generator=gen)
    inv = P.compute_inverse(method, A, G, eta, scale, "x")
    got = P.precondition_layer(inv, g)
    ref = (dense_eigen if method == "eigen" else dense_factored)(A, G, g, eta, scale)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    # same result from the rescaling path (eigen: reuse the eigenbasis; factored: new inverses)
    moved = P.rescale_inverse(P.compute_inverse(method, A, G, 0.7, 1.0, "x"), eta, scale, A, G, "x")
    torch.testing.assert_close(P.precondition_layer(moved, g), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("label,make", LAYERS, ids=[label for label, _ in LAYERS])
@pytest.mark.parametrize("method", ["eigen", "factored"])
def test_optimizer_precondition_matches_dense_solve(label, make, method):
    """Through the optimizer: [∇W | ∇b] layout, groups, bias column, weight decay folded into gradient and damping."""
    torch.manual_seed(1)
    gen = torch.Generator().manual_seed(2)
    model = nn.Sequential(make()).double()
    damping, wd = 0.05, 0.01
    opt = kc.KFC(model, lr=0.1, damping=damping, weight_decay=wd, damping_method=method, fallback=None)
    (layer,) = opt.layers
    A, G = spd(layer.groups, layer.a_dim, gen), spd(layer.groups, layer.g_dim, gen)
    opt.set_factors(layer.name, A, G, frozen=True)
    layer.weight.grad = torch.randn_like(layer.weight)
    if layer.bias is not None:
        layer.bias.grad = torch.randn_like(layer.bias)
    got = opt.precondition()

    gw = (layer.weight.grad + wd * layer.weight.detach()).reshape(layer.groups, layer.g_dim, -1)
    parts = [gw]
    if layer.bias is not None:
        parts.append((layer.bias.grad + wd * layer.bias.detach()).reshape(layer.groups, layer.g_dim, 1))
    g = torch.cat(parts, -1)
    ref = (dense_eigen if method == "eigen" else dense_factored)(A, G, g, damping + wd)
    a_in = layer.a_dim - (layer.bias is not None)
    torch.testing.assert_close(got[layer.weight], ref[..., :a_in].reshape(layer.weight.shape), rtol=1e-10, atol=1e-12)
    if layer.bias is not None:
        torch.testing.assert_close(got[layer.bias], ref[..., a_in].reshape(layer.bias.shape), rtol=1e-10, atol=1e-12)


def test_pi_damping_invariant_to_factor_rescaling():
    """docs/algorithm.md §5.1: with the trace-norm π, (cΩ, Γ/c) gives the same damped product."""
    gen = torch.Generator().manual_seed(3)
    A, G = spd(1, 5, gen), spd(1, 4, gen)
    g = torch.randn(1, 4, 5, dtype=torch.float64, generator=gen)
    a = P.precondition_layer(P.compute_inverse("factored", A, G, 0.1, 1.0, "x"), g)
    b = P.precondition_layer(P.compute_inverse("factored", 13.0 * A, G / 13.0, 0.1, 1.0, "x"), g)
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


def test_buckets_batch_same_shapes_and_match_per_layer_calls():
    gen = torch.Generator().manual_seed(4)
    shapes = [(1, 5, 3), (2, 5, 3), (1, 4, 4), (3, 5, 3)]  # (groups, a, g): layers 0, 1, 3 share a bucket
    invs, mats = {}, {}
    for i, (groups, a, gd) in enumerate(shapes):
        invs[i] = P.compute_inverse("eigen", spd(groups, a, gen), spd(groups, gd, gen), 0.2, 1.0 + i, f"l{i}")
        mats[i] = torch.randn(groups, gd, a, dtype=torch.float64, generator=gen)
    buckets = build_buckets(invs)
    assert sorted(len(b.members) for b in buckets) == [1, 3]
    full = apply_buckets(buckets, mats)
    partial = apply_buckets(buckets, {i: m for i, m in mats.items() if i != 1})
    for i in mats:
        ref = P.precondition_layer(invs[i], mats[i])
        torch.testing.assert_close(full[i], ref, rtol=1e-12, atol=1e-13)
        if i != 1:
            torch.testing.assert_close(partial[i], ref, rtol=1e-12, atol=1e-13)
    assert 1 not in partial


def test_kernels_are_the_entry_point(monkeypatch):
    calls = []
    import triton_kernels as tk
    for name in ("eigen_precondition", "kron_precondition"):
        orig = getattr(tk, name)
        monkeypatch.setattr(tk, name, lambda *a, _o=orig, _n=name, **k: (calls.append(_n), _o(*a, **k))[1])
    gen = torch.Generator().manual_seed(5)
    A, G, g = spd(2, 3, gen), spd(2, 2, gen), torch.randn(2, 2, 3, dtype=torch.float64, generator=gen)
    for method in ("eigen", "factored"):
        apply_buckets(build_buckets({0: P.compute_inverse(method, A, G, 0.1, 1.0, "x")}), {0: g})
    assert calls == ["eigen_precondition", "kron_precondition"]


@pytest.mark.parametrize("method", ["eigen", "factored"])
def test_undamped_singular_factor_raises(method):
    gen = torch.Generator().manual_seed(6)
    A = spd(1, 6, gen, rank=2) - 0.05 * torch.eye(6, dtype=torch.float64)  # rank 2
    G = spd(1, 3, gen)
    with pytest.raises(kc.SingularFactorError, match="singular"):
        P.compute_inverse(method, A, G, 0.0, 1.0, "conv1")
    P.compute_inverse(method, A, G, 1e-3, 1.0, "conv1")  # damped: fine


def test_fp32_cholesky_failure_is_retried_in_fp64(monkeypatch):
    gen = torch.Generator().manual_seed(7)
    A, G = spd(1, 4, gen).float(), spd(1, 3, gen).float()
    real = torch.linalg.cholesky_ex

    def flaky(M, *a, **k):
        L, info = real(M, *a, **k)
        return (L, torch.ones_like(info)) if M.dtype == torch.float32 else (L, info)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", flaky)
    Ainv, Ginv, _ = factored_inverses(A, G, 0.0)
    assert Ainv.dtype == torch.float32
    torch.testing.assert_close(Ainv[0] @ A[0], torch.eye(4), rtol=1e-4, atol=1e-4)


def test_fp32_eigh_failure_is_retried_in_fp64(monkeypatch):
    gen = torch.Generator().manual_seed(8)
    A, G = spd(2, 4, gen).float(), spd(2, 3, gen).float()
    real = torch.linalg.eigh

    def flaky(M, *a, **k):
        if M.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated convergence failure")
        return real(M, *a, **k)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    QA, lA, QG, lG = eigendecompose(A, G)
    assert QA.dtype == torch.float32
    torch.testing.assert_close(QA @ torch.diag_embed(lA) @ QA.mT, A, rtol=1e-4, atol=1e-4)


def test_factored_damping_survives_rounding_of_a_rank_deficient_factor():
    """A rank-deficient fp32 Ω with a -1e-6 eigenvalue from rounding, beside a Γ of trace ~1e14.

    π then gives Ω almost none of η (π√η ≈ 1e-8), so without a rounding floor Cholesky fails even in fp64 (seen on
    mnasnet).
    """
    torch.manual_seed(0)
    d = 72
    Q, _ = torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))
    lam = torch.zeros(d, dtype=torch.float64)
    lam[0], lam[1], lam[-1] = 10.0, 5.0, -1e-6
    A = (Q @ torch.diag(lam) @ Q.T).float()[None]
    G = (1e14 * torch.eye(32)).float()[None]
    Ainv, Ginv, _ = factored_inverses(A, G, eta=0.1)
    assert torch.isfinite(Ainv).all() and torch.isfinite(Ginv).all()
    assert torch.linalg.eigvalsh(Ainv.double()).min() > 0  # positive definite, not a clamped mess


@pytest.mark.parametrize("method", ["eigen", "factored"])
def test_factored_clip_statistic_is_v_F_v_under_the_damped_curvature(method):
    """clip_curvature='factored': ν = vᵀ F̂_γ v with v = −lr·F̂_γ⁻¹∇h, i.e. lr²·∇hᵀF̂_γ⁻¹∇h from a dense solve.

    Clipping scales the update by sqrt(C/ν); no extra forward is needed (no recorded inputs).
    """
    torch.manual_seed(3)
    gen = torch.Generator().manual_seed(4)
    model = nn.Sequential(nn.Linear(5, 3)).double()
    damping, wd, lr, clip = 0.05, 0.01, 0.7, 1e-4
    opt = kc.KFC(model, lr=lr, damping=damping, weight_decay=wd, damping_method=method, fallback=None, momentum=0.0,
                 clip=clip, clip_curvature="factored", clip_scaling="fixed")  # ν ≤ clip (the old default)
    (layer,) = opt.layers
    A, G = spd(1, layer.a_dim, gen), spd(1, layer.g_dim, gen)
    opt.set_factors(layer.name, A, G, frozen=True)
    layer.weight.grad = torch.randn_like(layer.weight)
    layer.bias.grad = torch.randn_like(layer.bias)
    g = torch.cat([layer.weight.grad + wd * layer.weight.detach(),
                   (layer.bias.grad + wd * layer.bias.detach())[:, None]], -1)[None]
    u = (dense_eigen if method == "eigen" else dense_factored)(A, G, g, damping + wd)
    nu = lr ** 2 * float((u * g).sum())
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert opt.last_step["nu"] == pytest.approx(nu, rel=1e-10)
    assert nu > clip and opt.last_step["clip_scale"] == pytest.approx((clip / nu) ** 0.5, rel=1e-10)
    step_w = model[0].weight.detach() - before[0]
    torch.testing.assert_close(step_w, -lr * (clip / nu) ** 0.5 * u[0, :, :5], rtol=1e-9, atol=1e-12)


def test_clip_curvature_validation():
    with pytest.raises(ValueError, match="clip_curvature"):
        kc.KFC(nn.Linear(2, 2), lr=0.1, clip_curvature="kl")


@pytest.mark.parametrize("method", ["eigen", "factored"])
def test_silent_coordinates_restricted_inverse_matches_dense_solve(method):
    """A conv whose 5×5 kernel mostly reads padding (1×1 input, padding 2) has silent Ω coordinates.

    The inverse is taken on the live block only, and the update equals the dense damped solve with the full Ω (weight
    decay makes the silent coordinates' gradient nonzero); state_dict keeps the restricted inverse.
    """
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(6, 4, 5, padding=2), nn.Flatten(), nn.Linear(4, 3)).double()
    damping, wd = 0.05, 0.01
    opt = kc.KFC(model, lr=0.1, damping=damping, weight_decay=wd, damping_method=method, fallback=None,
                 stats_fraction=1.0, clip=None)
    x, y = torch.randn(16, 6, 1, 1, dtype=torch.float64), torch.randint(0, 3, (16,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # statistics and inverses from the batch
    conv = opt.layers[0]
    inv = opt.layer_state(conv.name).inverse
    assert inv.live is not None and inv.live.tolist() == [c * 25 + 12 for c in range(6)] + [150]
    A, G = (t.unsqueeze(0) for t in opt.factors(conv.name))
    assert float(A.diagonal(dim1=-2, dim2=-1)[0, 0]) == 0.0  # a silent coordinate indeed
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    got = opt.precondition()
    g = torch.cat([(conv.weight.grad + wd * conv.weight.detach()).reshape(1, 4, -1),
                   (conv.bias.grad + wd * conv.bias.detach()).reshape(1, 4, 1)], -1)
    ref = (dense_eigen if method == "eigen" else dense_factored)(A, G, g, damping + wd)
    torch.testing.assert_close(got[conv.weight], ref[..., :150].reshape(conv.weight.shape), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got[conv.bias], ref[..., 150].reshape(conv.bias.shape), rtol=1e-9, atol=1e-12)
    opt2 = kc.KFC(copy.deepcopy(model), lr=0.1, damping=damping, weight_decay=wd, damping_method=method,
                  fallback=None)
    opt2.load_state_dict(opt.state_dict())
    assert torch.equal(opt2.layer_states()[0].inverse.live, inv.live)


def test_silent_coordinates_without_damping_raise():
    A = torch.eye(80, dtype=torch.float64)[None].clone()
    A[0, :20, :20] = 0
    G = torch.eye(3, dtype=torch.float64)[None]
    with pytest.raises(kc.SingularFactorError, match="never see a nonzero input"):
        P.compute_inverse("factored", A, G, 0.0, 1.0, "x")
