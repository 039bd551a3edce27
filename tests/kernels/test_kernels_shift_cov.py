"""The CPU shifted-product patch covariance (triton_kernels/shift_cov.py) against the float64 brute force."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import triton_kernels as tk
from triton_kernels import checks, reference, shift_cov

import kernel_refs as R

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


@st.composite
def stride1_cases(draw):
    d = draw(st.integers(1, 3))
    ks = tuple(draw(st.integers(1, 5 if d < 3 else 3)) for _ in range(d))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(d))
    pad = tuple(draw(st.integers(0, 4)) for _ in range(2 * d))
    S = R.draw_spatial(draw, ks, dil, pad, (7 if d == 1 else 5 if d == 2 else 2))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    Cg = 1 if draw(st.booleans()) and groups > 1 else draw(st.integers(1, 3))
    N = draw(st.integers(1, 3))
    assume(math.prod(ks) > 1 and Cg * math.prod(ks) <= 60)
    return dict(shape=(N, groups * Cg, *S), kernel_size=ks, stride=(1,) * d, padding=pad, dilation=dil,
                groups=groups)


def _run(case, ones, alpha=1.0, beta=0.0, chunk_bytes=64 << 20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case["shape"], generator=g, dtype=torch.float64)
    geo = {k: case[k] for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
    geom = checks.conv_geometry(x, **geo)
    G = case["groups"]
    Dp = geom.dp(ones)
    F0 = R.random_sym((G, Dp, Dp), torch.float64)
    F = torch.full((G, Dp, Dp), float("nan"), dtype=torch.float64) if beta == 0 else F0.clone()
    shift_cov.patch_cov_update_(F, x, geom, alpha, beta, ones, chunk_bytes=chunk_bytes)
    want = alpha * R.patch_cov(x, case["kernel_size"], case["stride"], case["padding"], case["dilation"], G, ones)
    if beta != 0:
        want = want + beta * F0
    return F, want


@settings(max_examples=60, **SETTINGS)
@given(case=stride1_cases(), ones=st.booleans(), ab=st.sampled_from([(1.0, 0.0), (0.5, 0.9)]))
def test_shift_cov_grid(case, ones, ab):
    F, want = _run(case, ones, *ab)
    R.assert_symmetric(F)
    assert R.rel_err(F, want) < 1e-12


@pytest.mark.parametrize("chunk_bytes", [1, 4096])
def test_shift_cov_chunked(chunk_bytes):
    """Shift groups processed a few at a time (a memory cap) give the same factor."""
    case = dict(shape=(2, 4, 6, 7), kernel_size=(3, 5), stride=(1, 1), padding=(1, 1, 2, 2), dilation=(1, 1),
                groups=2)
    F, want = _run(case, True, chunk_bytes=chunk_bytes)
    assert R.rel_err(F, want) < 1e-12


def test_shift_cov_paper_net_layer():
    """The paper net's second conv (5×5, 32 channels, pad 2) in float32 agrees with the im2col reference."""
    x = torch.randn(4, 32, 15, 15, generator=torch.Generator().manual_seed(0))
    geom = checks.conv_geometry(x, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1)
    a, b = torch.zeros(1, 801, 801), torch.zeros(1, 801, 801)
    reference.patch_cov_update_(a, x, geom, 1.0, 0.0, True)
    shift_cov.patch_cov_update_(b, x, geom, 1.0, 0.0, True)
    assert torch.equal(b, b.mT)
    assert ((a - b).abs().max() / a.abs().max()) < 1e-5


def test_shift_cov_rejects_strides():
    x = torch.randn(1, 2, 6, 6)
    geom = checks.conv_geometry(x, (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1)
    assert not shift_cov.eligible(geom)
    with pytest.raises(ValueError, match="stride 1"):
        shift_cov.patch_cov_update_(torch.zeros(1, 19, 19), x, geom, 1.0, 0.0, True)


@pytest.mark.parametrize("method", ["auto", "im2col", "shift"])
def test_torch_backend_methods(monkeypatch, method):
    """Through the op: every KFC_PATCH_COV choice gives the brute-force factor; auto picks one and keeps it."""
    monkeypatch.setenv("KFC_KERNELS", "torch")
    monkeypatch.setenv("KFC_PATCH_COV", method)
    monkeypatch.setattr(shift_cov, "_chosen", {})
    x = torch.randn(3, 6, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = R.patch_cov(x, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1, True)
    for _ in range(2):  # auto: the timed first call, then the cached choice
        F = torch.zeros(1, 151, 151, dtype=torch.float64)
        tk.patch_cov_update_(F, x, (5, 5), (1, 1), (2, 2, 2, 2), (1, 1), 1, ones=True)
        assert R.rel_err(F, want) < 1e-12
    assert len(shift_cov._chosen) == (1 if method == "auto" else 0)
    if method == "auto":
        assert set(shift_cov._chosen.values()) <= {"im2col", "shift"}


def test_bad_method(monkeypatch):
    monkeypatch.setenv("KFC_KERNELS", "torch")
    monkeypatch.setenv("KFC_PATCH_COV", "fastest")
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="KFC_PATCH_COV"):
        tk.patch_cov_update_(torch.zeros(1, 19, 19), x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, ones=True)
