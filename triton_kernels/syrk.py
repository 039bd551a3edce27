"""Triton symmetric rank-k update: F <- beta*F + alpha*Xbar^T Xbar, Xbar = [X | 1] (implicit ones column).

Grid = (upper tiles, reduction slices, batch). Each program reduces its slice of rows for one upper tile
(ti <= tj) of the output; with one slice it applies the mirrored epilogue directly, with several it writes a raw
partial into a [SPLIT, B, D', D'] workspace that ``symstore.finalize`` sums in a fixed order (deterministic, no
atomics). Any strides for X and F; int64 address arithmetic.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning
from .symstore import finalize, n_upper_tiles, split_finalize_kernel, store_partial, sym_store, upper_tile

_MAX_GRID_Z = 65535
_INT32_MAX = 2**31 - 1


@triton.jit
def _syrk_kernel(x_ptr, f_ptr, ws_ptr, M, D, Dp, s_xb, s_xm, s_xd, s_fb, s_fr, s_fc, ws_s_split, ws_s_b,
                 m_per_split, alpha, beta,
                 ONES: tl.constexpr, BETA_ZERO: tl.constexpr, USE_WS: tl.constexpr, CAST: tl.constexpr,
                 PREC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    t = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2)
    ti, tj = upper_tile(t)
    acc_dt = f_ptr.dtype.element_ty
    offs_i = ti * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_j = tj * BLOCK_D + tl.arange(0, BLOCK_D)
    col_i = offs_i.to(tl.int64) * s_xd
    col_j = offs_j.to(tl.int64) * s_xd
    in_i = offs_i < D
    in_j = offs_j < D
    xb = x_ptr + b.to(tl.int64) * s_xb
    m_lo = s * m_per_split
    m_hi = tl.minimum(m_lo + m_per_split, M)
    acc = tl.full((BLOCK_D, BLOCK_D), 0, acc_dt)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_hi
        rows = offs_m.to(tl.int64) * s_xm
        a_i = tl.load(xb + rows[:, None] + col_i[None, :], mask=m_ok[:, None] & in_i[None, :], other=0.0)
        a_j = tl.load(xb + rows[:, None] + col_j[None, :], mask=m_ok[:, None] & in_j[None, :], other=0.0)
        if CAST:
            a_i = a_i.to(acc_dt)
            a_j = a_j.to(acc_dt)
        if ONES:  # the bias column D is 1 on valid rows; the masked load left 0 there
            a_i += (m_ok[:, None] & (offs_i[None, :] == D)).to(a_i.dtype)
            a_j += (m_ok[:, None] & (offs_j[None, :] == D)).to(a_j.dtype)
        acc = tl.dot(tl.trans(a_i), a_j, acc, input_precision=PREC, out_dtype=acc_dt)
    if USE_WS:
        store_partial(ws_ptr, ws_s_split, ws_s_b, Dp, s, b, acc, offs_i, offs_j)
    else:
        sym_store(f_ptr + b.to(tl.int64) * s_fb, s_fr, s_fc, acc, offs_i, offs_j, Dp, alpha, beta, BETA_ZERO)


KERNELS = (_syrk_kernel, split_finalize_kernel, upper_tile, sym_store, store_partial)


def dot_mode(x_dtype: torch.dtype, acc_dtype: torch.dtype, interpreted: bool) -> tuple[bool, str]:
    """(cast operands to the accumulator dtype?, tl.dot input precision) for these dtypes.

    bf16/fp16 operands go to the tensor cores natively with fp32 accumulation (products are exact in fp32). The
    interpreter's dot mishandles bf16 (it multiplies the raw bits), so there they are upcast first.
    """
    if acc_dtype == torch.float64:
        return x_dtype != torch.float64, "ieee"
    if x_dtype in (torch.bfloat16, torch.float16):
        return interpreted, "ieee"
    return x_dtype != torch.float32, tuning.fp32_precision()


def _launch(F3: Tensor, X3: Tensor, alpha: float, beta: float, ones: bool, cfg: tuning.SymConfig,
            interpreted: bool) -> None:
    B, M, D = X3.shape
    Dp = F3.shape[-1]
    split = cfg.split or tuning.choose_split(n_upper_tiles(Dp, cfg.block_d) * B, M, cfg.block_m, X3.device,
                                             interpreted)
    m_per_split = triton.cdiv(max(triton.cdiv(M, split), 1), cfg.block_m) * cfg.block_m
    split = max(1, triton.cdiv(M, m_per_split))
    cast, prec = dot_mode(X3.dtype, F3.dtype, interpreted)
    use_ws = split > 1
    for b0 in range(0, B, _MAX_GRID_Z):
        Fb, Xb = F3[b0:b0 + _MAX_GRID_Z], X3[b0:b0 + _MAX_GRID_Z]
        nb = Fb.shape[0]
        ws = torch.empty((split, nb, Dp, Dp), dtype=F3.dtype, device=F3.device) if use_ws else Fb
        grid = (n_upper_tiles(Dp, cfg.block_d), split, nb)
        _syrk_kernel[grid](Xb, Fb, ws, M, D, Dp, Xb.stride(0), Xb.stride(1), Xb.stride(2), Fb.stride(0),
                           Fb.stride(1), Fb.stride(2), ws.stride(0) if use_ws else 0, ws.stride(1) if use_ws else 0,
                           m_per_split, float(alpha), float(beta),
                           ONES=bool(ones), BETA_ZERO=(beta == 0), USE_WS=use_ws, CAST=cast, PREC=prec,
                           BLOCK_D=cfg.block_d, BLOCK_M=cfg.block_m, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)
        if use_ws:
            finalize(ws, Fb, split, alpha, beta, cfg.block_d, num_warps=cfg.num_warps)


def syrk_update_(F3: Tensor, X3: Tensor, alpha: float, beta: float, ones: bool, interpreted: bool) -> None:
    """Triton path on validated batched views F3 (B, D', D') and X3 (B, M, D)."""
    B, M, D = X3.shape
    Dp = F3.shape[-1]
    if M > _INT32_MAX // 2:
        raise ValueError(f"syrk: M={M} rows is too large for the Triton kernel (row indices are int32)")
    default = tuning.sym_default("syrk", Dp, M, B, X3.dtype, X3.device, interpreted)
    key = (B, M, D, bool(ones), X3.dtype, F3.dtype, str(X3.device), tuning.fp32_precision(), beta == 0)

    def bench(cfg: tuning.SymConfig) -> float:
        scratch = F3.clone()
        return triton.testing.do_bench(lambda: _launch(scratch, X3, alpha, beta, ones, cfg, interpreted))

    cfg = tuning.pick("syrk", key, default,
                      lambda: tuning.sym_candidates("syrk", Dp, M, B, X3.dtype, X3.device), bench, interpreted)
    _launch(F3, X3, alpha, beta, ones, cfg, interpreted)
