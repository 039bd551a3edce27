"""eigen_precondition / kron_precondition against float64 references, on both backends."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import triton_kernels as tk
from triton_kernels import tuning

import kernel_refs as R

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


def eig_inputs(B, DG, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = () if B is None else (B,)
    QG = torch.linalg.qr(torch.randn(*shape, DG, DG, generator=g, dtype=torch.float64))[0].to(dtype)
    QA = torch.linalg.qr(torch.randn(*shape, D, D, generator=g, dtype=torch.float64))[0].to(dtype)
    lG = torch.rand(*shape, DG, generator=g, dtype=torch.float64).to(dtype)
    lA = torch.rand(*shape, D, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(*shape, DG, D, generator=g)
    return grad, QG, lG, QA, lA


def kron_inputs(B, DG, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = () if B is None else (B,)
    Gi = torch.randn(*shape, DG, DG, generator=g, dtype=torch.float64)
    Ai = torch.randn(*shape, D, D, generator=g, dtype=torch.float64)
    Gi, Ai = (Gi @ Gi.mT / DG).to(dtype), (Ai @ Ai.mT / D).to(dtype)
    return torch.randn(*shape, DG, D, generator=g), Gi, Ai


@settings(max_examples=10, **SETTINGS)
@given(B=st.sampled_from([None, 1, 3]), DG=st.integers(1, 40), D=st.integers(1, 40),
       damping=st.sampled_from([1e-3, 0.1, 1.0]), gdtype=st.sampled_from([torch.float32, torch.bfloat16]),
       fdtype=st.sampled_from([torch.float32, torch.float64]))
def test_eigen_grid(backend, B, DG, D, damping, gdtype, fdtype):
    grad, QG, lG, QA, lA = eig_inputs(B, DG, D, fdtype)
    grad = grad.to(gdtype)
    U = tk.eigen_precondition(grad, QG, lG, QA, lA, damping)
    assert U.shape == grad.shape and U.dtype == fdtype
    assert R.rel_err(U, R.eigen(grad, QG, lG, QA, lA, damping)) < (1e-11 if fdtype == torch.float64 else 2e-5)


@settings(max_examples=12, **SETTINGS)
@given(B=st.sampled_from([None, 1, 3]), DG=st.integers(1, 40), D=st.integers(1, 40),
       fdtype=st.sampled_from([torch.float32, torch.float64]))
def test_kron_grid(backend, B, DG, D, fdtype):
    grad, Gi, Ai = kron_inputs(B, DG, D, fdtype)
    U = tk.kron_precondition(grad, Gi, Ai)
    assert U.shape == grad.shape and U.dtype == fdtype
    assert R.rel_err(U, R.kron(grad, Gi, Ai)) < (1e-11 if fdtype == torch.float64 else 2e-5)


@pytest.mark.parametrize("odtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("alpha,beta", [(1.0, 0.0), (-0.1, 1.0), (0.5, 0.9)])
def test_fused_out_epilogue(backend, odtype, alpha, beta):
    """``out`` <- beta*out + alpha*U in place (a momentum buffer or a bf16 parameter); beta=0 ignores NaN."""
    grad, QG, lG, QA, lA = eig_inputs(3, 18, 21)
    _, Gi, Ai = kron_inputs(3, 18, 21)
    for fn, ref in ((lambda o: tk.eigen_precondition(grad, QG, lG, QA, lA, 0.05, out=o, alpha=alpha, beta=beta),
                     R.eigen(grad, QG, lG, QA, lA, 0.05)),
                    (lambda o: tk.kron_precondition(grad, Gi, Ai, out=o, alpha=alpha, beta=beta),
                     R.kron(grad, Gi, Ai))):
        o0 = torch.randn(3, 18, 21).to(odtype)
        o = torch.full_like(o0, float("nan")) if beta == 0 else o0.clone()
        res = fn(o)
        assert res is o and o.dtype == odtype
        want = alpha * ref + (beta * o0.double() if beta != 0 else 0.0)
        tol = 1e-2 if odtype == torch.bfloat16 else (1e-11 if odtype == torch.float64 else 2e-5)
        if odtype == torch.float64:
            tol = 2e-5     # U itself is computed in fp32 (the factors are fp32)
        assert not torch.isnan(o).any()
        assert R.rel_err(o, want) < tol


def test_out_can_alias_grad_and_be_strided(backend):
    """Writing the update over the gradient itself, and into a non-contiguous view (a parameter slice)."""
    grad, QG, lG, QA, lA = eig_inputs(None, 9, 14)
    want = R.eigen(grad, QG, lG, QA, lA, 0.1)
    g = grad.clone()
    tk.eigen_precondition(g, QG, lG, QA, lA, 0.1, out=g)
    assert R.rel_err(g, want) < 2e-5
    param = torch.zeros(14, 20)
    view = param[:, 3:12].T          # (9, 14), strides (1, 20)
    tk.eigen_precondition(grad, QG, lG, QA, lA, 0.1, out=view, alpha=-2.0, beta=1.0)
    assert R.rel_err(view, -2.0 * want) < 2e-5
    assert torch.all(param[:, :3] == 0) and torch.all(param[:, 12:] == 0)


def test_batched_equals_per_layer(backend):
    """One batched launch gives the same as B separate unbatched calls."""
    grad, QG, lG, QA, lA = eig_inputs(4, 7, 19)
    U = tk.eigen_precondition(grad, QG, lG, QA, lA, 0.01)
    for b in range(4):
        Ub = tk.eigen_precondition(grad[b], QG[b], lG[b], QA[b], lA[b], 0.01)
        assert R.rel_err(Ub, U[b]) < 1e-6


def test_noncontiguous_factors(backend):
    grad, QG, lG, QA, lA = eig_inputs(2, 10, 12)
    QGt = QG.mT.contiguous().mT          # same values, column-major
    lA2 = torch.stack([lA, lA], -1)[..., 0]  # strided eigenvalues
    U = tk.eigen_precondition(grad.mT.contiguous().mT, QGt, lG, QA, lA2, 0.2)
    assert R.rel_err(U, R.eigen(grad, QG, lG, QA, lA, 0.2)) < 2e-5


def test_small_tiles_and_grouped_order(use):
    """16-wide tiles: many row and column blocks, so the grouped (swizzled) program order is exercised."""
    use("triton")
    grad, QG, lG, QA, lA = eig_inputs(2, 50, 37)
    with tuning.override(gemm=tuning.GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2)):
        U = tk.eigen_precondition(grad, QG, lG, QA, lA, 0.01)
    assert R.rel_err(U, R.eigen(grad, QG, lG, QA, lA, 0.01)) < 2e-5


def test_triton_equals_torch(use):
    grad, QG, lG, QA, lA = eig_inputs(2, 33, 17)
    res = {}
    for mode in ("torch", "triton"):
        use(mode)
        res[mode] = tk.eigen_precondition(grad, QG, lG, QA, lA, 1e-3)
    assert R.rel_err(res["triton"], res["torch"]) < 1e-5
