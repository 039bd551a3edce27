"""syrk_update_ against float64 references, on both backends (the Triton one through the interpreter)."""
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


def make_x(shape, dtype, layout: str) -> torch.Tensor:
    """X with the given logical shape in a contiguous, transposed (column-major) or sliced layout."""
    if layout == "transposed":
        return torch.randn(*shape[:-2], shape[-1], shape[-2]).to(dtype).mT
    if layout == "sliced":
        return torch.randn(*shape[:-1], 2 * shape[-1]).to(dtype)[..., ::2]
    return torch.randn(*shape).to(dtype)


def run_case(B, M, D, ones, xdtype, fdtype, layout, alpha, beta):
    shape = (M, D) if B is None else (B, M, D)
    X = make_x(shape, xdtype, layout)
    Dp = D + ones
    fshape = (Dp, Dp) if B is None else (B, Dp, Dp)
    F0 = R.random_sym(fshape, fdtype)
    F = torch.full(fshape, float("nan"), dtype=fdtype) if beta == 0 else F0.clone()
    out = tk.syrk_update_(F, X, alpha=alpha, beta=beta, ones=ones)
    assert out is F
    want = alpha * R.syrk(X, ones) + (beta * F0.double() if beta != 0 else 0.0)
    R.assert_symmetric(F)
    assert R.rel_err(F, want) < R.tol(fdtype)
    return F


@settings(max_examples=30, **SETTINGS)
@given(B=st.sampled_from([None, 1, 3]), M=st.integers(1, 70), D=st.integers(1, 37), ones=st.booleans(),
       xdtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       fdtype=st.sampled_from([torch.float32, torch.float64]),
       layout=st.sampled_from(["contiguous", "transposed", "sliced"]),
       ab=st.sampled_from([(1.0, 0.0), (0.5, 0.0), (2.0, 1.0), (0.1, 0.9), (-1.5, 0.25)]))
def test_syrk_grid(backend, B, M, D, ones, xdtype, fdtype, layout, ab):
    run_case(B, M, D, ones, xdtype, fdtype, layout, *ab)


@pytest.mark.parametrize("M,D", [(1, 1), (16, 16), (33, 17), (64, 48)])
def test_syrk_block_edges(backend, M, D):
    """Sizes at, below and above the 16-wide interpreter tiles, bias column landing on a tile edge."""
    run_case(None, M, D, True, torch.float32, torch.float32, "contiguous", 1.0, 0.0)
    run_case(2, M, D - 1 if D > 1 else 1, True, torch.bfloat16, torch.float32, "contiguous", 0.5, 0.5)


def test_syrk_bf16_against_rounded_values(backend):
    """bf16 inputs: compared with the fp64 product of the bf16-rounded values, fp32 accumulation."""
    X = torch.randn(2, 45, 21).to(torch.bfloat16)
    F = torch.full((2, 22, 22), float("nan"))
    tk.syrk_update_(F, X, ones=True)
    R.assert_symmetric(F)
    assert R.rel_err(F, R.syrk(X.double(), True)) < 2e-6


def test_syrk_empty_rows(backend):
    """M = 0: only the moving-average part remains (and beta = 0 gives zeros, not NaN)."""
    F0 = R.random_sym((5, 5), torch.float32)
    F = F0.clone()
    tk.syrk_update_(F, torch.empty(0, 4), alpha=3.0, beta=0.5, ones=True)
    assert torch.allclose(F, 0.5 * F0)
    F = torch.full((5, 5), float("nan"))
    tk.syrk_update_(F, torch.empty(0, 4), ones=True)
    assert torch.equal(F, torch.zeros(5, 5))


def test_syrk_uses_upper_triangle_of_old_factor(backend):
    """Documented rule: with beta != 0 the old lower triangle is ignored (both backends)."""
    F0 = R.random_sym((6, 6), torch.float32)
    F = F0.clone()
    F[torch.tril(torch.ones(6, 6, dtype=torch.bool), -1)] = float("nan")
    X = torch.randn(9, 6)
    tk.syrk_update_(F, X, alpha=1.0, beta=2.0)
    R.assert_symmetric(F)
    assert R.rel_err(F, 2 * F0.double() + R.syrk(X, False)) < 1e-5


@pytest.mark.parametrize("split", [2, 7])
def test_syrk_split_reduction(use, split):
    """The [SPLIT, ...] workspace path: matches the reference, and is bitwise deterministic."""
    use("triton")
    X = torch.randn(1, 90, 35)
    F0 = R.random_sym((1, 36, 36), torch.float32)
    results = []
    for _ in range(2):
        F = F0.clone()
        with tuning.override(syrk=tuning.SymConfig(block_d=16, block_m=16, split=split)):
            tk.syrk_update_(F, X, alpha=0.5, beta=0.75, ones=True)
        R.assert_symmetric(F)
        assert R.rel_err(F, 0.5 * R.syrk(X, True) + 0.75 * F0.double()) < 2e-5
        results.append(F)
    assert torch.equal(results[0], results[1])
    # beta = 0 on the split path still ignores a poisoned factor
    F = torch.full((1, 36, 36), float("nan"))
    with tuning.override(syrk=tuning.SymConfig(block_d=16, block_m=16, split=split)):
        tk.syrk_update_(F, X, ones=True)
    R.assert_symmetric(F)


def test_split_finalizer_with_smaller_tiles(use, monkeypatch):
    """The finaliser may tile more finely than the main kernel (it does for 128-wide tiles on GPU)."""
    from triton_kernels import symstore
    use("triton")
    monkeypatch.setattr(symstore, "FINALIZE_MAX_BLOCK", 16)
    X = torch.randn(1, 70, 52)
    F0 = R.random_sym((1, 53, 53), torch.float32)
    F = F0.clone()
    with tuning.override(syrk=tuning.SymConfig(block_d=32, block_m=16, split=3)):
        tk.syrk_update_(F, X, alpha=2.0, beta=0.5, ones=True)
    R.assert_symmetric(F)
    assert R.rel_err(F, 2.0 * R.syrk(X, True) + 0.5 * F0.double()) < 2e-5


def test_syrk_triton_equals_torch(use):
    X = torch.randn(3, 40, 23)
    out = {}
    for mode in ("torch", "triton"):
        use(mode)
        out[mode] = tk.syrk_update_(torch.full((3, 24, 24), float("nan")), X, alpha=0.25, ones=True)
    assert R.rel_err(out["triton"], out["torch"]) < 1e-6


def test_syrk_noncontiguous_factor(backend):
    """F as a strided view (e.g. a slice of a larger state buffer) is updated in place."""
    big = torch.full((2, 9, 9), float("nan"))
    F = big[:, 1:8, 1:8]
    X = torch.randn(2, 11, 6)
    tk.syrk_update_(F, X, ones=True)
    R.assert_symmetric(F)
    assert R.rel_err(F, R.syrk(X, True)) < 1e-5
    assert torch.isnan(big[:, 0]).all() and torch.isnan(big[:, :, 8]).all()
