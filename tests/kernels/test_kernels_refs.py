"""The references themselves: test helpers against brute-force loops, and triton_kernels.reference against them."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as tF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from triton_kernels import checks, reference

import kernel_refs as R

# (x shape, kernel, stride, padding (lo, hi per dim), dilation, groups)
GEOMS = [
    ((2, 3, 7), (3,), (2,), (1, 2), (1,), 1),
    ((1, 4, 6), (2,), (1,), (0, 0), (2,), 4),
    ((2, 2, 5, 6), (3, 2), (1, 2), (1, 0, 2, 1), (1, 2), 2),
    ((1, 3, 4, 4), (1, 1), (2, 1), (0, 0, 0, 0), (1, 1), 3),
    ((1, 2, 3, 4, 3), (2, 2, 1), (1, 2, 1), (0, 1, 1, 0, 1, 1), (2, 1, 1), 1),
]


@pytest.mark.parametrize("shape,ks,st_,pad,dil,groups", GEOMS)
@pytest.mark.parametrize("ones", [False, True])
def test_gather_patches_match_loops(shape, ks, st_, pad, dil, groups, ones):
    x = torch.randn(shape)
    want = R.loop_patches(x, ks, st_, pad, dil, groups, ones)
    assert torch.equal(R.gather_patches(x, ks, st_, pad, dil, groups, ones), want)


def test_gather_patches_match_unfold():
    x = torch.randn(2, 6, 9, 8, dtype=torch.float64)
    got = R.gather_patches(x, (3, 2), (2, 1), (1, 1, 2, 2), (1, 2), 1, False)[:, 0]
    want = tF.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 2), stride=(2, 1))
    assert torch.equal(got, want)


@st.composite
def geometries(draw, max_d: int = 3):
    d = draw(st.integers(1, max_d))
    ks = tuple(draw(st.integers(1, 3)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(d))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(2 * d))
    S = R.draw_spatial(draw, ks, dil, pad, (5 if d < 3 else 2))
    groups = draw(st.integers(1, 3))
    C = groups * draw(st.integers(1, 3))
    N = draw(st.integers(1, 3))
    return (N, C, *S), ks, stride, pad, dil, groups


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(g=geometries(), ones=st.booleans())
def test_reference_im2col_and_sums(g, ones):
    shape, ks, st_, pad, dil, groups = g
    x = torch.randn(shape, dtype=torch.float64)
    geom = checks.conv_geometry(x, ks, st_, pad, dil, groups)
    want = R.gather_patches(x, ks, st_, pad, dil, groups, ones)
    assert torch.equal(reference.im2col(x, geom, ones), want)
    assert geom.T == want.shape[-1] and geom.dp(ones) == want.shape[2]
    s = reference.patch_sum(x, geom, ones, torch.float64)
    assert torch.allclose(s, want.sum(-1), rtol=1e-12, atol=1e-12)
    F = torch.full((groups, geom.dp(ones), geom.dp(ones)), float("nan"), dtype=torch.float64)
    reference.patch_cov_update_(F, x, geom, 1.0, 0.0, ones)
    assert torch.allclose(F, torch.einsum("ngdt,nget->gde", want, want), rtol=1e-12, atol=1e-12)


def test_syrk_helper_matches_outer_product_loop():
    X = torch.randn(7, 5)
    want = torch.zeros(6, 6, dtype=torch.float64)
    for m in range(7):
        xb = torch.cat([X[m].double(), torch.ones(1, dtype=torch.float64)])
        want += torch.outer(xb, xb)
    assert torch.allclose(R.syrk(X, True), want, rtol=1e-14, atol=1e-14)


def test_preconditioner_helpers_match_kronecker_solve():
    """U = (G (x) A + damping I)^-1 vec(grad) with G = QG diag(lG) QG^T (row-major vec), and the kron form."""
    torch.manual_seed(0)
    DG, D, damping = 4, 5, 0.3
    QG = torch.linalg.qr(torch.randn(DG, DG, dtype=torch.float64))[0]
    QA = torch.linalg.qr(torch.randn(D, D, dtype=torch.float64))[0]
    lG, lA = torch.rand(DG, dtype=torch.float64), torch.rand(D, dtype=torch.float64)
    G, A = QG @ torch.diag(lG) @ QG.T, QA @ torch.diag(lA) @ QA.T
    grad = torch.randn(DG, D, dtype=torch.float64)
    solve = torch.linalg.solve(torch.kron(G, A) + damping * torch.eye(DG * D, dtype=torch.float64), grad.reshape(-1))
    assert torch.allclose(R.eigen(grad, QG, lG, QA, lA, damping), solve.reshape(DG, D), rtol=1e-10, atol=1e-12)
    Gi, Ai = torch.linalg.inv(G + torch.eye(DG)), torch.linalg.inv(A + torch.eye(D))
    want = (torch.kron(Gi, Ai) @ grad.reshape(-1)).reshape(DG, D)
    assert torch.allclose(R.kron(grad, Gi, Ai), want, rtol=1e-10, atol=1e-12)
    # and the library's references agree with the helpers
    ref = reference.eigen_precondition(grad[None], QG[None], lG[None], QA[None], lA[None], damping, None, 1.0, 0.0,
                                       torch.float64)[0]
    assert torch.allclose(ref, solve.reshape(DG, D), rtol=1e-10, atol=1e-12)
    ref = reference.kron_precondition(grad[None], Gi[None], Ai[None], None, 1.0, 0.0, torch.float64)[0]
    assert torch.allclose(ref, want, rtol=1e-10, atol=1e-12)


def test_out_sizes_formula_matches_conv():
    x = torch.randn(1, 1, 11, 10)
    y = tF.conv2d(tF.pad(x, (2, 1, 0, 3)), torch.ones(1, 1, 3, 2), stride=(2, 3), dilation=(2, 1))
    assert R.out_sizes((11, 10), (3, 2), (2, 3), (0, 3, 2, 1), (2, 1)) == list(y.shape[2:])
    assert math.prod(y.shape[2:]) == checks.conv_geometry(x, (3, 2), (2, 3), (0, 3, 2, 1), (2, 1), 1).T
