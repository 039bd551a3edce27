"""The statistics step's cheaper forms give the same factors (issue 17, item 3).

The torch twin's symmetrisation, the one-copy patch matrix, the shifted-product method's written-in-place
products and GEMM window sums, the fresh accumulators written with beta = 0 and the moving averages as foreach
ops, each against an independent form: exact arithmetic (small integers, powers of two), the explicit im2col, the
float64 reference, and per-factor updates.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.factors import Factors, RunningFactors
from kfc_compile.curvature.statistics import BatchStatistics
from triton_kernels import checks, reference, shift_cov


def _ints(*shape, dtype, seed):
    return torch.randint(-8, 9, shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("d", [1, 7, 256, 257, 640, 641, 700])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.25, 0.5), (1.0, 0.0), (0.5, 0.0), (2.0, 1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sym_axpby_is_the_upper_triangle_rule(d, alpha, beta, dtype):
    """Exact arithmetic (integers, powers of two): sym(βF + αG) from the upper triangle, bit for bit.

    β = 0 never reads F (NaN there), both sides of the one-``where`` width and of the block size.
    """
    F0, G = _ints(2, d, d, dtype=dtype, seed=d), _ints(2, d, d, dtype=dtype, seed=d + 1)
    F = torch.full_like(F0, float("nan")) if beta == 0 else F0.clone()
    upper = torch.triu(alpha * G + (beta * F0 if beta else 0))
    want = upper + torch.triu(upper, 1).mT
    reference.sym_axpby_(F, G, alpha, beta)
    assert torch.equal(F, want)


@pytest.mark.parametrize("shape,kernel,stride,padding,dilation,groups", [
    ((3, 4, 9), (3,), (2,), (1, 2), (2,), 2),
    ((2, 6, 7, 8), (3, 2), (1, 2), (1, 0, 2, 1), (1, 2), 3),
    ((2, 2, 4, 5, 6), (3, 2, 3), (1, 2, 1), (1, 1, 0, 1, 1, 0), (1, 1, 2), 1),
])
@pytest.mark.parametrize("ones", [False, True])
def test_patch_matrix_is_the_explicit_im2col(shape, kernel, stride, padding, dilation, groups, ones):
    """The one-copy (groups, Dg', N·T) patch matrix holds exactly im2col's patches (and its row of ones)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    geom = checks.conv_geometry(x, kernel, stride, padding, dilation, groups)
    cols = reference.im2col(x, geom, ones)  # (N, G, Dg', T)
    want = cols.permute(1, 2, 0, 3).reshape(groups, geom.dp(ones), geom.N * geom.T)
    assert torch.equal(reference.patch_matrix(x, geom, ones), want)


@pytest.mark.parametrize("out_min", [0, 1 << 60])  # every product into its slot / every product copied
def test_shift_products_both_ways_match_the_reference(monkeypatch, out_min):
    """The products written straight into their strided slot or copied there: the float64 im2col factor."""
    monkeypatch.setattr(shift_cov, "_OUT_MIN", out_min)
    g = torch.Generator().manual_seed(3)
    for shape, groups in (((3, 8, 9, 7), 2), ((2, 4, 6, 6), 1)):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        geom = checks.conv_geometry(x, (5, 3), (1, 1), (2, 2, 1, 0), (1, 2), groups)
        D = geom.dp(True)
        F0 = torch.randn(groups, D, D, generator=g, dtype=torch.float64)
        F0 = F0 + F0.mT
        want = reference.patch_cov_update_(F0.clone(), x, geom, 0.5, 0.75, True)
        got = shift_cov.patch_cov_update_(F0.clone(), x, geom, 0.5, 0.75, True)
        assert torch.equal(got, got.mT)
        assert ((got - want).abs().max() / want.abs().max()) < 1e-14


def test_fold_is_the_per_factor_moving_average():
    """One foreach fold over layers with different ε (and dtypes) is bit for bit ``mul_(ε).add_(F, 1 − ε)``.

    A batch Ω that is its running Ω (averaged in the kernel epilogue) is left alone.
    """
    g = torch.Generator().manual_seed(1)
    specs = [(3, torch.float32, 1), (5, torch.float64, 1), (4, torch.float32, 4), (2, torch.float32, 9)]
    runs, batches, want = [], [], []
    for n, (d, dtype, updates) in enumerate(specs):
        A, G = (torch.randn(1, d, d, generator=g, dtype=dtype) for _ in range(2))
        r = RunningFactors(A.clone(), G.clone(), updates=updates)
        b = Factors(r.A if n == 2 else torch.randn(1, d, d, generator=g, dtype=dtype),
                    torch.randn(1, d + 1, d + 1, generator=g, dtype=dtype)[:, :d, :d])
        eps = min(1.0 - 1.0 / (updates + 1), 0.95)
        wa = r.A.clone() if n == 2 else r.A.clone().mul_(eps).add_(b.A, alpha=1.0 - eps)
        want.append((wa, r.G.clone().mul_(eps).add_(b.G, alpha=1.0 - eps), updates + 1))
        runs.append(r)
        batches.append(b)
    RunningFactors.fold(list(zip(runs, batches, strict=True)), 0.95)
    for r, (wa, wg, updates) in zip(runs, want, strict=True):
        assert torch.equal(r.A, wa) and torch.equal(r.G, wg) and r.updates == updates


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 4, 3, bias=False), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 5)).double()


def test_fresh_accumulators_are_written_whole(monkeypatch):
    """New Ω / Γ accumulators are written by the kernels with beta = 0: NaN-filled ones give the same factors."""
    x = torch.randn(6, 2, 6, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    y = torch.randint(0, 5, (6,), generator=torch.Generator().manual_seed(3))
    want = kc.curvature(_net(), "cross_entropy", x, y, fisher="type-2")
    new = BatchStatistics._new
    monkeypatch.setattr(BatchStatistics, "_new", lambda self, d, k=1: new(self, d, k).fill_(float("nan")))
    got = kc.curvature(_net(), "cross_entropy", x, y, fisher="type-2")
    assert set(got) == set(want) and len(got) == 3
    for name, f in want.items():
        assert torch.equal(got[name].A, f.A) and torch.equal(got[name].G, f.G)
