"""patch_cov_update_ and patch_sum against float64 gather references, on both backends."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import triton_kernels as tk
from triton_kernels import tuning

import kernel_refs as R

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])
LAYOUTS = ["contiguous", "channels_last", "permuted"]


def make_input(shape, dtype, layout: str, seed: int = 0) -> torch.Tensor:
    """``x`` of logical shape (N, C, *S) in a given memory layout (values drawn in fp32, then cast)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    d = len(shape) - 2
    if layout == "channels_last":
        if d == 1:   # no memory format for 3-d tensors: the same idea by hand, (N, L, C) storage
            return x.transpose(1, 2).contiguous().transpose(1, 2)
        return x.contiguous(memory_format=torch.channels_last if d == 2 else torch.channels_last_3d)
    if layout == "permuted":  # spatial-major, channel next, batch innermost: arbitrary strides
        perm = list(range(2, 2 + d)) + [1, 0]
        inv = [perm.index(i) for i in range(2 + d)]
        return x.permute(perm).contiguous().permute(inv)
    return x


@st.composite
def conv_cases(draw):
    d = draw(st.integers(1, 3))
    ks = tuple(draw(st.integers(1, 3)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dil = tuple(draw(st.integers(1, 2)) for _ in range(d))
    pad = tuple(draw(st.integers(0, 2)) for _ in range(2 * d))
    S = R.draw_spatial(draw, ks, dil, pad, (6 if d == 1 else 4 if d == 2 else 2))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    Cg = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    if depthwise:
        Cg = 1
    N = draw(st.integers(1, 3))
    assume(Cg * math.prod(ks) <= 40)
    To = R.out_sizes(S, ks, stride, pad, dil)
    assume(N * math.prod(To) <= 250)
    return dict(shape=(N, groups * Cg, *S), kernel_size=ks, stride=stride, padding=pad, dilation=dil, groups=groups)


def run_cov(case, ones, dtype, fdtype, layout, alpha, beta, seed=0):
    x = make_input(case["shape"], dtype, layout, seed)
    geo = {k: case[k] for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
    G = case["groups"]
    Dp = case["shape"][1] // G * math.prod(case["kernel_size"]) + ones
    F0 = R.random_sym((G, Dp, Dp), fdtype)
    F = torch.full((G, Dp, Dp), float("nan"), dtype=fdtype) if beta == 0 else F0.clone()
    out = tk.patch_cov_update_(F, x, **geo, alpha=alpha, beta=beta, ones=ones)
    assert out is F
    ks, st_, pad, dil = (case[k] for k in ("kernel_size", "stride", "padding", "dilation"))
    want = alpha * R.patch_cov(x, ks, st_, pad, dil, G, ones) + (beta * F0.double() if beta != 0 else 0.0)
    R.assert_symmetric(F)
    assert R.rel_err(F, want) < R.tol(fdtype)
    return F


@settings(max_examples=30, **SETTINGS)
@given(case=conv_cases(), ones=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       layout=st.sampled_from(LAYOUTS), ab=st.sampled_from([(1.0, 0.0), (0.5, 0.0), (1.0, 1.0), (0.2, 0.8)]))
def test_patch_cov_grid(backend, case, ones, dtype, layout, ab):
    if layout == "permuted" and len(case["shape"]) == 3:
        layout = "channels_last"
    run_cov(case, ones, dtype, torch.float32, layout, *ab)


@settings(max_examples=15, **SETTINGS)
@given(case=conv_cases(), ones=st.booleans())
def test_patch_sum_grid(backend, case, ones):
    x = make_input(case["shape"], torch.float32, "channels_last")
    geo = {k: case[k] for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
    got = tk.patch_sum(x, **geo, ones=ones)
    ks, st_, pad, dil = (case[k] for k in ("kernel_size", "stride", "padding", "dilation"))
    want = R.patch_sum(x, ks, st_, pad, dil, case["groups"], ones)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert R.rel_err(got, want) < 1e-5


NAMED = {
    "resnet_3x3_s1": dict(shape=(2, 5, 6, 7), kernel_size=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1),
                          dilation=(1, 1), groups=1),
    "stride2_asym_same": dict(shape=(1, 3, 8, 7), kernel_size=(4, 3), stride=(2, 2), padding=(1, 2, 1, 1),
                              dilation=(1, 1), groups=1),
    "depthwise_2d": dict(shape=(2, 6, 5, 5), kernel_size=(3, 3), stride=(1, 1), padding=(1, 1, 1, 1),
                         dilation=(1, 1), groups=6),
    "grouped_dilated_1d": dict(shape=(3, 4, 13), kernel_size=(3,), stride=(2,), padding=(2, 0), dilation=(3,),
                               groups=2),
    "conv3d_video": dict(shape=(1, 2, 4, 5, 5), kernel_size=(2, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1, 1, 1, 1),
                         dilation=(1, 1, 2), groups=1),
    "pointwise": dict(shape=(2, 20, 3, 4), kernel_size=(1, 1), stride=(1, 1), padding=(0, 0, 0, 0),
                      dilation=(1, 1), groups=1),
    "padding_larger_than_input": dict(shape=(1, 1, 2, 2), kernel_size=(3, 3), stride=(1, 1),
                                      padding=(3, 3, 3, 3), dilation=(1, 1), groups=1),
}


@pytest.mark.parametrize("name", sorted(NAMED))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_patch_cov_named(backend, name, layout):
    run_cov(NAMED[name], True, torch.float32, torch.float32, layout, 1.0, 0.0)


def test_patch_cov_fp64(backend):
    run_cov(NAMED["grouped_dilated_1d"], True, torch.float64, torch.float64, "contiguous", 0.5, 0.5)
    run_cov(NAMED["resnet_3x3_s1"], False, torch.float32, torch.float64, "channels_last", 1.0, 0.0)


def test_patch_cov_bf16_against_rounded_values(backend):
    case = NAMED["resnet_3x3_s1"]
    x = make_input(case["shape"], torch.bfloat16, "channels_last")
    F = torch.full((1, 46, 46), float("nan"))
    tk.patch_cov_update_(F, x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, ones=True)
    R.assert_symmetric(F)
    assert R.rel_err(F, R.patch_cov(x.double(), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True)) < 2e-6


@pytest.mark.parametrize("split", [2, 5])
def test_patch_cov_split_reduction(use, split):
    use("triton")
    case = dict(shape=(3, 4, 7, 6), kernel_size=(2, 3), stride=(1, 1), padding=(1, 0, 1, 1), dilation=(1, 1),
                groups=2)
    F0 = R.random_sym((2, 13, 13), torch.float32)
    x = make_input(case["shape"], torch.float32, "channels_last")
    outs = []
    for _ in range(2):
        F = F0.clone()
        with tuning.override(patch=tuning.SymConfig(block_d=16, block_m=16, split=split)):
            tk.patch_cov_update_(F, x, (2, 3), (1, 1), (1, 0, 1, 1), (1, 1), 2, alpha=0.5, beta=0.5, ones=True)
        R.assert_symmetric(F)
        want = 0.5 * R.patch_cov(x, (2, 3), (1, 1), (1, 0, 1, 1), (1, 1), 2, True) + 0.5 * F0.double()
        assert R.rel_err(F, want) < 2e-5
        outs.append(F)
    assert torch.equal(outs[0], outs[1])


def test_patch_triton_equals_torch(use):
    case = NAMED["stride2_asym_same"]
    x = make_input(case["shape"], torch.float32, "channels_last")
    geo = {k: case[k] for k in ("kernel_size", "stride", "padding", "dilation", "groups")}
    res = {}
    for mode in ("torch", "triton"):
        use(mode)
        F = tk.patch_cov_update_(torch.full((1, 37, 37), float("nan")), x, **geo, ones=True)
        res[mode] = (F, tk.patch_sum(x, **geo, ones=True))
    assert R.rel_err(res["triton"][0], res["torch"][0]) < 1e-6
    assert R.rel_err(res["triton"][1], res["torch"][1]) < 1e-6


def test_patch_sum_dtypes_and_count(backend):
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    s = tk.patch_sum(x, (2, 2), (1, 1), (0, 0, 0, 0), (1, 1), 3, ones=True)
    assert s.dtype == torch.float64 and s.shape == (2, 3, 5)
    assert torch.all(s[..., -1] == 12)   # the ones coordinate counts the T = 4*3 locations
    s = tk.patch_sum(x.to(torch.bfloat16), (2, 2), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    assert s.dtype == torch.float32
    assert R.rel_err(s, R.patch_sum(x.to(torch.bfloat16), (2, 2), (1, 1), (0, 0, 0, 0), (1, 1), 1, False)) < 1e-6


def test_patch_cov_unbatched_factor_when_one_group(backend):
    x = torch.randn(2, 2, 5)
    F = torch.full((7, 7), float("nan"))
    tk.patch_cov_update_(F, x, (3,), (1,), (1, 1), (1,), 1, ones=True)
    assert R.rel_err(F, R.patch_cov(x, (3,), (1,), (1, 1), (1,), 1, True)[0]) < 1e-5
