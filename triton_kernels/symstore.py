"""Shared pieces of the symmetric kernels (syrk, patch covariance).

Upper-tile enumeration, the mirrored alpha/beta epilogue, and the deterministic split-reduction finaliser.

Exact symmetry: each element (r, c) with r <= c is owned by exactly one upper tile, which computes it once and
writes it to both (r, c) and (c, r). ``beta*F`` reads only the upper triangle of the old factor (the lower one is
ignored; the torch reference applies the same rule). With ``BETA_ZERO`` the old factor is never read, so stale
NaNs cannot leak into the result.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def upper_tile(t):
    """Tile index t -> (ti, tj), ti <= tj, enumerating upper tiles column by column (t = tj*(tj+1)/2 + ti)."""
    tj = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    tj = tl.where((tj + 1) * (tj + 2) // 2 <= t, tj + 1, tj)      # fix approximate sqrt, both directions
    tj = tl.where(tj * (tj + 1) // 2 > t, tj - 1, tj)
    ti = t - tj * (tj + 1) // 2
    return ti, tj


@triton.jit
def sym_store(f_ptr, s_r, s_c, acc, offs_i, offs_j, Dp, alpha, beta, BETA_ZERO: tl.constexpr):
    """F[i, j] <- alpha*acc + beta*F[i, j] on the upper part of the tile, mirrored into F[j, i]."""
    oi = offs_i.to(tl.int64)
    oj = offs_j.to(tl.int64)
    inb = (offs_i[:, None] < Dp) & (offs_j[None, :] < Dp)
    upper = inb & (offs_i[:, None] <= offs_j[None, :])
    ptr = f_ptr + oi[:, None] * s_r + oj[None, :] * s_c
    val = acc * alpha
    if not BETA_ZERO:
        old = tl.load(ptr, mask=upper, other=0.0).to(acc.dtype)
        val = val + beta * old
    val = val.to(f_ptr.dtype.element_ty)
    tl.store(ptr, val, mask=upper)
    # mirror: element (j, i) for i < j, written from the transposed tile so the store stays row-contiguous
    lower_t = (offs_j[:, None] < Dp) & (offs_i[None, :] < offs_j[:, None])
    ptr_t = f_ptr + oj[:, None] * s_r + oi[None, :] * s_c
    tl.store(ptr_t, tl.trans(val), mask=lower_t)


@triton.jit
def store_partial(ws_ptr, s_split, s_b, Dp, split, b, acc, offs_i, offs_j):
    """Write a raw partial tile into the [SPLIT, B, Dp, Dp] workspace (contiguous)."""
    base = ws_ptr + split.to(tl.int64) * s_split + b.to(tl.int64) * s_b
    mask = (offs_i[:, None] < Dp) & (offs_j[None, :] < Dp)
    ptr = base + offs_i.to(tl.int64)[:, None] * Dp + offs_j.to(tl.int64)[None, :]
    tl.store(ptr, acc, mask=mask)


@triton.jit
def split_finalize_kernel(ws_ptr, f_ptr, Dp, SPLIT, s_split, s_b, s_fb, s_fr, s_fc, alpha, beta,
                          BETA_ZERO: tl.constexpr, BLOCK: tl.constexpr):
    """Sum the split partials of one upper tile in a fixed order (deterministic), then the mirrored epilogue."""
    t = tl.program_id(0)
    b = tl.program_id(1)
    ti, tj = upper_tile(t)
    offs_i = ti * BLOCK + tl.arange(0, BLOCK)
    offs_j = tj * BLOCK + tl.arange(0, BLOCK)
    mask = (offs_i[:, None] < Dp) & (offs_j[None, :] < Dp)
    base = ws_ptr + b.to(tl.int64) * s_b + offs_i.to(tl.int64)[:, None] * Dp + offs_j.to(tl.int64)[None, :]
    acc = tl.load(base, mask=mask, other=0.0)
    for _ in range(1, SPLIT):             # pointer steps are 64-bit; slices are summed in order 0, 1, 2, ...
        base += s_split
        acc += tl.load(base, mask=mask, other=0.0)
    sym_store(f_ptr + b.to(tl.int64) * s_fb, s_fr, s_fc, acc, offs_i, offs_j, Dp, alpha, beta, BETA_ZERO)


FINALIZE_MAX_BLOCK = 64


def n_upper_tiles(Dp: int, block: int) -> int:
    """Number of ``block``-sized tiles on and above the diagonal of a (Dp, Dp) matrix."""
    n = triton.cdiv(Dp, block)
    return n * (n + 1) // 2


def finalize(ws, F3, split: int, alpha: float, beta: float, block: int, num_warps: int = 4) -> None:
    """Launch the finaliser on workspace ``ws`` (SPLIT, B, Dp, Dp) into the batched factor ``F3`` (B, Dp, Dp).

    ``block`` is the main kernel's tile. The finaliser may use any divisor of it: each of its upper sub-tiles lies
    inside one upper tile of the main kernel, which wrote it completely. 64 keeps it free of register spills.
    """
    if block > FINALIZE_MAX_BLOCK:
        block, num_warps = FINALIZE_MAX_BLOCK, 4
    B, Dp = F3.shape[0], F3.shape[-1]
    grid = (n_upper_tiles(Dp, block), B)
    split_finalize_kernel[grid](ws, F3, Dp, split, ws.stride(0), ws.stride(1), F3.stride(0), F3.stride(1),
                                F3.stride(2), float(alpha), float(beta), BETA_ZERO=(beta == 0), BLOCK=block,
                                num_warps=num_warps)
