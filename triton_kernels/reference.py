"""Torch reference twins of the Triton kernels.

These are the CPU path in production (``KFC_KERNELS=auto`` on CPU tensors) and the spec the Triton kernels are
tested against. They are written to be obviously right, not fast: explicit im2col through ``F.pad`` +
``Tensor.unfold``, plain matmuls, and an explicit symmetrisation from the upper triangle (the same rule the Triton
kernels follow, so both backends return exactly symmetric factors). Inputs are validated by the callers
(``ops.py``); these functions assume valid arguments.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as tF
from torch import Tensor

from .checks import ConvGeometry


def _no_autocast(device: torch.device):
    """Statistics must not be computed in the autocast dtype (bf16 X^T X would lose the factor's precision).

    Outside autocast nothing to switch off: no context object (its set-up costs more than a small layer's product).
    """
    if not torch.is_autocast_enabled(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


_WHERE_MAX = 640  # up to this width one ``where`` over the whole factor beats the block loop (CPU, measured)


@functools.lru_cache(maxsize=64)
def _upper_mask(d: int, device: torch.device) -> Tensor:
    """(d, d) bool, True on and above the diagonal (cached: the statistics reuse a few widths every step)."""
    return torch.ones(d, d, dtype=torch.bool, device=device).triu_()


def _mirror_upper_(F: Tensor) -> None:
    """F's lower triangle <- its upper triangle's mirror, in place (F square in its last two dims)."""
    F.copy_(torch.where(_upper_mask(F.shape[-1], F.device), F, F.mT))


def sym_axpby_(F: Tensor, G: Tensor, alpha: float, beta: float) -> Tensor:
    """F <- sym(beta*F + alpha*G) in place, built from the upper triangle; beta == 0 never reads F (NaN-safe).

    ``G`` must not overlap ``F``. Up to ``_WHERE_MAX`` wide, beta*F + alpha*G in one temporary and one ``where``
    into F (two to four ops: this runs for every small layer at every statistics step; with beta == 0 the product
    by alpha comes after the mirror, which it commutes with exactly); wider factors in place, block by block
    (small temporaries: factors can be thousands wide). A product by 1 is skipped (exact either way).
    """
    d, bs = F.shape[-1], 256
    if d <= _WHERE_MAX:
        if beta == 0:
            T = G
        else:
            T = torch.add(F if beta == 1 else F.mul_(beta), G, alpha=alpha)
        torch.where(_upper_mask(d, F.device), T, T.mT, out=F)
        if beta == 0 and alpha != 1:
            F.mul_(alpha)
        return F
    if beta == 0:
        F.copy_(G)
        if alpha != 1:
            F.mul_(alpha)
    else:
        if beta != 1:
            F.mul_(beta)
        F.add_(G, alpha=alpha)
    for a in range(0, d, bs):  # block rows: the part left of the diagonal block from the columns above it
        b = min(a + bs, d)
        if a:
            F[..., a:b, :a] = F[..., :a, a:b].mT
        _mirror_upper_(F[..., a:b, a:b])
    return F


def syrk_update_(F: Tensor, X: Tensor, alpha: float, beta: float, ones: bool) -> Tensor:
    """F <- beta*F + alpha*Xbar^T Xbar with Xbar = [X | 1] if ones; batched views (B, D', D'), (B, M, D)."""
    with _no_autocast(F.device):
        Xc = X.to(F.dtype)
        if ones:
            Xc = torch.cat([Xc, Xc.new_ones(*Xc.shape[:-1], 1)], dim=-1)
        return sym_axpby_(F, Xc.mT @ Xc, alpha, beta)


def _windows(x: Tensor, geom: ConvGeometry) -> Tensor:
    """The zero-padded input's windows as a view (N, C, To_0..To_{d-1}, k_0..k_{d-1})."""
    d = geom.d
    lo, hi = geom.pad_lo[3 - d:], geom.pad_hi[3 - d:]
    pad: list[int] = []
    for i in reversed(range(d)):                      # F.pad wants the last dim first
        pad += [lo[i], hi[i]]
    xp = tF.pad(x, pad)
    for i in range(d):
        k, s, dl = geom.kernel[3 - d + i], geom.stride[3 - d + i], geom.dilation[3 - d + i]
        xp = xp.unfold(2 + i, dl * (k - 1) + 1, s)[..., ::dl]     # appends the window dim last
    return xp


def im2col(x: Tensor, geom: ConvGeometry, ones: bool = False) -> Tensor:
    """Explicit patches (N, groups, Dg', T), ordered like ``weight.flatten(1)`` (channel-major, offset-minor)."""
    d = geom.d
    xp = _windows(x, geom)
    # (N, C, To_0..To_{d-1}, k_0..k_{d-1}) -> (N, C, k..., To...)
    perm = [0, 1] + list(range(2 + d, 2 + 2 * d)) + list(range(2, 2 + d))
    cols = xp.permute(perm).reshape(geom.N, geom.groups, geom.Dg, geom.T)
    if ones:
        cols = torch.cat([cols, cols.new_ones(geom.N, geom.groups, 1, geom.T)], dim=2)
    return cols


def patch_matrix(x: Tensor, geom: ConvGeometry, ones: bool) -> Tensor:
    """The patches as (groups, Dg', N·T) rows ``weight.flatten(1)``-ordered, written in one copy from ``x``'s windows.

    The same matrix as :func:`im2col`'s patches permuted to (G, Dg', N·T) (with a row of ones for ``ones``).
    """
    d = geom.d
    xp = _windows(x, geom)  # (N, C, To..., k...)
    G, Cg, N = geom.groups, geom.Cg, geom.N
    kern, outs = geom.kernel[3 - d:], geom.out[3 - d:]
    P = xp.new_empty(G, geom.dp(ones), N * geom.T)
    src = xp.unflatten(1, (G, Cg)).permute(1, 2, *range(3 + d, 3 + 2 * d), 0, *range(3, 3 + d))
    P[:, :geom.Dg].view(G, Cg, *kern, N, *outs).copy_(src)
    if ones:
        P[:, geom.Dg].fill_(1)
    return P


def patch_cov_update_(F: Tensor, x: Tensor, geom: ConvGeometry, alpha: float, beta: float, ones: bool) -> Tensor:
    """F[g] <- beta*F[g] + alpha*sum_{n,t} pbar pbar^T for each group g; F is (groups, Dg', Dg')."""
    with _no_autocast(F.device):
        P = patch_matrix(x.to(F.dtype), geom, ones)  # (G, Dg', N·T)
        return sym_axpby_(F, P @ P.mT, alpha, beta)


def patch_sum(x: Tensor, geom: ConvGeometry, ones: bool, dtype: torch.dtype) -> Tensor:
    """(N, groups, Dg') sum over output locations of the patches; per kernel offset a strided window sum."""
    with _no_autocast(x.device):
        d = geom.d
        xp = x.to(dtype)
        pad: list[int] = []
        for i in reversed(range(d)):
            pad += [geom.pad_lo[3 - d + i], geom.pad_hi[3 - d + i]]
        xp = tF.pad(xp, pad)
        kern = geom.kernel[3 - d:]
        sums = []
        for off in torch.cartesian_prod(*[torch.arange(k) for k in kern]).reshape(-1, d).tolist():
            idx = [slice(None), slice(None)]
            for i in range(d):
                s, dl, o = geom.stride[3 - d + i], geom.dilation[3 - d + i], geom.out[3 - d + i]
                start = off[i] * dl
                idx.append(slice(start, start + (o - 1) * s + 1, s))
            sums.append(xp[tuple(idx)].sum(dim=tuple(range(2, 2 + d))))         # (N, C)
        out = torch.stack(sums, dim=-1).reshape(geom.N, geom.groups, geom.Dg)    # (N, C, K) -> channel-major
        if ones:
            out = torch.cat([out, out.new_full((geom.N, geom.groups, 1), float(geom.T))], dim=-1)
        return out


def _axpby_out(out: Tensor, U: Tensor, alpha: float, beta: float) -> Tensor:
    val = alpha * U if beta == 0 else beta * out.to(U.dtype) + alpha * U
    return out.copy_(val)


def eigen_precondition(grad: Tensor, QG: Tensor, lG: Tensor, QA: Tensor, lA: Tensor, damping: float,
                       out: Tensor | None, alpha: float, beta: float, dtype: torch.dtype) -> Tensor:
    """U = QG [(QG^T grad QA) / (lG lA^T + damping)] QA^T on batched inputs; optionally out <- beta*out + alpha*U."""
    with _no_autocast(grad.device):
        g, QGc, QAc = grad.to(dtype), QG.to(dtype), QA.to(dtype)
        den = lG.to(dtype)[:, :, None] * lA.to(dtype)[:, None, :] + damping
        U = QGc @ ((QGc.mT @ g @ QAc) / den) @ QAc.mT
        return U if out is None else _axpby_out(out, U, alpha, beta)


def kron_precondition(grad: Tensor, Ginv: Tensor, Ainv: Tensor, out: Tensor | None, alpha: float, beta: float,
                      dtype: torch.dtype) -> Tensor:
    """U = Ginv grad Ainv on batched inputs; optionally out <- beta*out + alpha*U."""
    with _no_autocast(grad.device):
        U = Ginv.to(dtype) @ grad.to(dtype) @ Ainv.to(dtype)
        return U if out is None else _axpby_out(out, U, alpha, beta)
