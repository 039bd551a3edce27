"""Triton implicit-im2col kernels for conv layers: the patch second moment and the patch sum.

The second moment is KFC's Omega, the sum KFAC-reduce's input statistic.

Patches are never materialised: a row m of the virtual im2col matrix is an (example, output location) pair, a
column d a (channel, kernel offset) pair in ``weight.flatten(1)`` order, and the kernels compute input addresses
on the fly from any strides (NCHW, channels_last, views), with zero padding done by masking. 1-d and 2-d convs
run as 3-d convs with leading size-1 dims. Grid for the covariance = (upper tiles, reduction slices, groups);
the split reduction goes through the same deterministic workspace + finaliser as syrk.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from .checks import ConvGeometry
from .symstore import finalize, n_upper_tiles, split_finalize_kernel, store_partial, sym_store, upper_tile
from .syrk import dot_mode

_MAX_GRID = 65535
_INT32_MAX = 2**31 - 1


@triton.jit
def _patch_cols(offs_d, c_base, Dg, sxc, sx0, sx1, sx2, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                DL0: tl.constexpr, DL1: tl.constexpr, DL2: tl.constexpr, NDIM: tl.constexpr):
    """Column part of the virtual im2col matrix (loop invariant).

    Column d = (channel c, kernel offset q), in ``weight.flatten(1)`` order. Returns (address offset, per-dim
    input offset q*dilation, column mask).
    """
    c = offs_d // (K0 * K1 * K2)
    q = offs_d - c * (K0 * K1 * K2)
    q0 = q // (K1 * K2)
    q = q - q0 * (K1 * K2)
    q1 = q // K2
    q2 = q - q1 * K2
    c2 = q2 * DL2
    off = (c_base + c).to(tl.int64) * sxc + c2.to(tl.int64) * sx2
    c1 = q1 * DL1
    c0 = q0 * DL0
    if NDIM >= 2:
        off += c1.to(tl.int64) * sx1
    if NDIM >= 3:
        off += c0.to(tl.int64) * sx0
    return off, c0, c1, c2, offs_d < Dg


@triton.jit
def _patch_rows(offs_m, m_hi, T, O1, O2, sxn, sx0, sx1, sx2, P0, P1, P2, ST0: tl.constexpr, ST1: tl.constexpr,
                ST2: tl.constexpr, NDIM: tl.constexpr):
    """Row part: row m = (example n, output location o). Returns (address offset, per-dim o*stride - pad, mask)."""
    n = offs_m // T
    r = offs_m - n * T
    o0 = r // (O1 * O2)
    r = r - o0 * (O1 * O2)
    o1 = r // O2
    o2 = r - o1 * O2
    r2 = o2 * ST2 - P2
    off = n.to(tl.int64) * sxn + r2.to(tl.int64) * sx2
    r1 = o1 * ST1 - P1
    r0 = o0 * ST0 - P0
    if NDIM >= 2:
        off += r1.to(tl.int64) * sx1
    if NDIM >= 3:
        off += r0.to(tl.int64) * sx0
    return off, r0, r1, r2, offs_m < m_hi


@triton.jit
def _patch_load(x_ptr, row_off, r0, r1, r2, m_ok, col_off, c0, c1, c2, d_ok, S0, S1, S2, NDIM: tl.constexpr):
    """(BLOCK_M, BLOCK_D) block: input coordinate = row part + column part per dim; zero padding by masking."""
    i2 = r2[:, None] + c2[None, :]
    ok = m_ok[:, None] & d_ok[None, :] & (i2 >= 0) & (i2 < S2)
    if NDIM >= 2:
        i1 = r1[:, None] + c1[None, :]
        ok = ok & (i1 >= 0) & (i1 < S1)
    if NDIM >= 3:
        i0 = r0[:, None] + c0[None, :]
        ok = ok & (i0 >= 0) & (i0 < S0)
    return tl.load(x_ptr + (row_off[:, None] + col_off[None, :]), mask=ok, other=0.0)


@triton.jit
def _patch_cov_kernel(x_ptr, f_ptr, ws_ptr, M, T, O1, O2, S0, S1, S2, sxn, sxc, sx0, sx1, sx2, P0, P1, P2,
                      Cg, Dg, Dp, s_fb, s_fr, s_fc, ws_s_split, ws_s_b, m_per_split, alpha, beta,
                      K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, ST0: tl.constexpr, ST1: tl.constexpr,
                      ST2: tl.constexpr, DL0: tl.constexpr, DL1: tl.constexpr, DL2: tl.constexpr,
                      NDIM: tl.constexpr, ONES: tl.constexpr, BETA_ZERO: tl.constexpr, USE_WS: tl.constexpr,
                      CAST: tl.constexpr, PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    t = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.program_id(2)
    ti, tj = upper_tile(t)
    acc_dt = f_ptr.dtype.element_ty
    offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    c_base = g * Cg
    coff_i, ci0, ci1, ci2, di_ok = _patch_cols(offs_i, c_base, Dg, sxc, sx0, sx1, sx2, K0, K1, K2, DL0, DL1, DL2,
                                               NDIM)
    coff_j, cj0, cj1, cj2, dj_ok = _patch_cols(offs_j, c_base, Dg, sxc, sx0, sx1, sx2, K0, K1, K2, DL0, DL1, DL2,
                                               NDIM)
    m_lo = s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.full((BLOCK_D, BLOCK_D), 0, acc_dt)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        roff, r0, r1, r2, m_ok = _patch_rows(offs_m, m_hi, T, O1, O2, sxn, sx0, sx1, sx2, P0, P1, P2, ST0, ST1, ST2,
                                             NDIM)
        a_i = _patch_load(x_ptr, roff, r0, r1, r2, m_ok, coff_i, ci0, ci1, ci2, di_ok, S0, S1, S2, NDIM)
        a_j = _patch_load(x_ptr, roff, r0, r1, r2, m_ok, coff_j, cj0, cj1, cj2, dj_ok, S0, S1, S2, NDIM)
        if CAST:
            a_i = a_i.to(acc_dt)
            a_j = a_j.to(acc_dt)
        if ONES:  # bias coordinate Dg is 1 on valid rows
            a_i += (m_ok[:, None] & (offs_i[None, :] == Dg)).to(a_i.dtype)
            a_j += (m_ok[:, None] & (offs_j[None, :] == Dg)).to(a_j.dtype)
        acc = tl.dot(tl.trans(a_i), a_j, acc, input_precision=PREC, out_dtype=acc_dt)
    if USE_WS:
        store_partial(ws_ptr, ws_s_split, ws_s_b, Dp, s, g, acc, offs_i, offs_j)
    else:
        sym_store(f_ptr + g.to(tl.int64) * s_fb, s_fr, s_fc, acc, offs_i, offs_j, Dp, alpha, beta, BETA_ZERO)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _patch_sum_kernel(x_ptr, out_ptr, T, O1, O2, S0, S1, S2, sxn, sxc, sx0, sx1, sx2, P0, P1, P2, Cg, Dg, Dp,
                      G, K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, ST0: tl.constexpr,
                      ST1: tl.constexpr, ST2: tl.constexpr, DL0: tl.constexpr, DL1: tl.constexpr, DL2: tl.constexpr,
                      NDIM: tl.constexpr, ONES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr):
    """out[n, g, d] = sum_t pbar[n, t, g, d]; grid (N, groups, D tiles)."""
    n = tl.program_id(0)
    g = tl.program_id(1)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    out_dt = out_ptr.dtype.element_ty
    coff, c0, c1, c2, d_ok = _patch_cols(offs_d, g * Cg, Dg, sxc, sx0, sx1, sx2, K0, K1, K2, DL0, DL1, DL2, NDIM)
    m_lo = n * T
    m_hi = m_lo + T
    acc = tl.full((BLOCK_D,), 0, out_dt)
    for m0 in range(m_lo, m_hi, BLOCK_T):
        offs_m = m0 + tl.arange(0, BLOCK_T)
        roff, r0, r1, r2, m_ok = _patch_rows(offs_m, m_hi, T, O1, O2, sxn, sx0, sx1, sx2, P0, P1, P2, ST0, ST1, ST2,
                                             NDIM)
        a = _patch_load(x_ptr, roff, r0, r1, r2, m_ok, coff, c0, c1, c2, d_ok, S0, S1, S2, NDIM)
        acc += tl.reduce(a.to(out_dt), 0, _add)
    if ONES:
        acc += (offs_d == Dg).to(out_dt) * T
    base = out_ptr + (n.to(tl.int64) * G + g) * Dp
    tl.store(base + offs_d, acc, mask=offs_d < Dp)


KERNELS = (_patch_cov_kernel, _patch_sum_kernel, _add, _patch_cols, _patch_rows, _patch_load, split_finalize_kernel,
           upper_tile, sym_store, store_partial)


def _geom_args(x: Tensor, geom: ConvGeometry) -> tuple[list, dict]:
    """Runtime and constexpr kernel arguments describing x and the conv geometry (3 spatial dims)."""
    lead = 3 - geom.d
    sx = (0,) * lead + tuple(x.stride()[2:])
    rt = [geom.T, geom.out[1], geom.out[2], *geom.spatial, x.stride(0), x.stride(1), *sx, *geom.pad_lo]
    ce = dict(K0=geom.kernel[0], K1=geom.kernel[1], K2=geom.kernel[2], ST0=geom.stride[0], ST1=geom.stride[1],
              ST2=geom.stride[2], DL0=geom.dilation[0], DL1=geom.dilation[1], DL2=geom.dilation[2], NDIM=geom.d)
    return rt, ce


def _check_size(geom: ConvGeometry) -> None:
    if geom.N * geom.T > _INT32_MAX // 2:
        raise ValueError(f"patch kernels: N*T = {geom.N * geom.T} rows is too large for the Triton kernel "
                         "(row indices are int32)")


def _launch_cov(F3: Tensor, x: Tensor, geom: ConvGeometry, alpha: float, beta: float, ones: bool,
                cfg: tuning.SymConfig, interpreted: bool) -> None:
    M = geom.N * geom.T
    Dp = geom.dp(ones)
    G = geom.groups
    split = cfg.split or tuning.choose_split(n_upper_tiles(Dp, cfg.block_d) * G, M, cfg.block_m, x.device,
                                             interpreted)
    m_per_split = triton.cdiv(max(triton.cdiv(M, split), 1), cfg.block_m) * cfg.block_m
    split = max(1, triton.cdiv(M, m_per_split))
    cast, prec = dot_mode(x.dtype, F3.dtype, interpreted)
    use_ws = split > 1
    rt, ce = _geom_args(x, geom)
    for g0 in range(0, G, _MAX_GRID):
        Fb = F3[g0:g0 + _MAX_GRID]
        ng = Fb.shape[0]
        ws = torch.empty((split, ng, Dp, Dp), dtype=F3.dtype, device=F3.device) if use_ws else Fb
        grid = (n_upper_tiles(Dp, cfg.block_d), split, ng)
        # the group offset g0 is folded into the base pointer of x (channels g0*Cg onwards)
        xb = x[:, g0 * geom.Cg:]
        _patch_cov_kernel[grid](xb, Fb, ws, M, *rt, geom.Cg, geom.Dg, Dp, Fb.stride(0), Fb.stride(1), Fb.stride(2),
                                ws.stride(0) if use_ws else 0, ws.stride(1) if use_ws else 0, m_per_split,
                                float(alpha), float(beta), **ce, ONES=bool(ones), BETA_ZERO=(beta == 0),
                                USE_WS=use_ws, CAST=cast, PREC=prec, BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m,
                                num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if use_ws:
            finalize(ws, Fb, split, alpha, beta, cfg.block_d, num_warps=cfg.num_warps)


def patch_cov_update_(F3: Tensor, x: Tensor, geom: ConvGeometry, alpha: float, beta: float, ones: bool,
                      interpreted: bool) -> None:
    """Triton path on a validated factor F3 (groups, Dg', Dg')."""
    _check_size(geom)
    Dp, M = geom.dp(ones), geom.N * geom.T
    default = tuning.sym_default("patch", Dp, M, geom.groups, x.dtype, x.device, interpreted)
    key = (geom, tuple(x.stride()), bool(ones), x.dtype, F3.dtype, str(x.device), tuning.fp32_precision(),
           beta == 0)

    def bench(cfg: tuning.SymConfig) -> float:
        scratch = F3.clone()
        return triton.testing.do_bench(lambda: _launch_cov(scratch, x, geom, alpha, beta, ones, cfg, interpreted))

    cfg = tuning.pick("patch", key, default,
                      lambda: tuning.sym_candidates("patch", Dp, M, geom.groups, x.dtype, x.device), bench,
                      interpreted)
    _launch_cov(F3, x, geom, alpha, beta, ones, cfg, interpreted)


def patch_sum(x: Tensor, geom: ConvGeometry, ones: bool, dtype: torch.dtype, interpreted: bool) -> Tensor:
    """Triton path: (N, groups, Dg') sums of the patches over output locations, in ``dtype``."""
    _check_size(geom)
    Dp = geom.dp(ones)
    out = torch.empty((geom.N, geom.groups, Dp), dtype=dtype, device=x.device)
    if geom.N == 0:
        return out
    default = (16, 32, 1) if interpreted else (64, 32, 4)  # (BLOCK_D, BLOCK_T, num_warps); never autotuned
    block_d, block_t, warps = tuning.pick("patch_sum", (), default, list, None, interpreted)
    rt, ce = _geom_args(x, geom)
    grid = (geom.N, geom.groups, triton.cdiv(Dp, block_d))
    if geom.N > 2**31 - 1 or geom.groups > _MAX_GRID or grid[2] > _MAX_GRID:
        raise ValueError(f"patch_sum: grid {grid} exceeds the launch limits")
    _patch_sum_kernel[grid](x, out, *rt, geom.Cg, geom.Dg, Dp, geom.groups, **ce, ONES=bool(ones), BLOCK_D=block_d,
                            BLOCK_T=block_t, num_warps=warps)
    return out
