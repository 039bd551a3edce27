"""Patch covariance of stride-1 convolutions from shifted channel products (the torch path on CPU).

For stride 1 the im2col matrix repeats every input value K times, and its Gram matrix Ω (per group, entries
indexed by (channel, kernel offset)) has block (k, k') equal to a sum of channel outer products
``x[:, q] x[:, q + δ]ᵀ`` with δ = (k' − k)·dilation, taken over the positions q that offset k reads. So instead of
the im2col GEMM (N·T·(Cg·K)² multiply-adds) this computes, for each of the ∏(2Kᵢ − 1)/2 shifts δ (one of each ±δ
pair), channel products summed over examples and over the cells of a grid whose lines are the window edges (a
few cells per dim: edge rows, edge columns and the interior), then every block as a box sum over cells (one
0/1 GEMM per dim). The sum over the last spatial dim's cell and the examples runs inside one GEMM per
(shift, cell), batched over the other positions; N·Q·Cg² multiply-adds per shift in all. For a 5×5 kernel that
is ~15× fewer flops than the GEMM and no unfolded buffer; zero padding needs no special case, positions outside
the input simply contribute nothing.

``patch_cov_update_cpu`` is the torch backend: it picks this or ``reference.patch_cov_update_`` (the spec:
explicit im2col) per geometry; both give the same factor up to rounding, exactly symmetric.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time

import torch
from torch import Tensor

from . import reference
from .checks import ConvGeometry

log = logging.getLogger(__name__)
METHODS = ("auto", "im2col", "shift")
_OUT_MIN = 1 << 16  # multiply-adds per batch entry from which a product is written into its slot directly
_chosen: dict[tuple, str] = {}  # geometry key -> the faster method measured on its first call


def _shifts(kernel: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Offset differences j = k' − k (per dim, in kernel units), one of each ±j pair (lexicographically ≥ 0)."""
    ranges = [range(-(k - 1), k) for k in kernel]
    return [j for j in itertools.product(*ranges) if j >= tuple(-v for v in j)]


def eligible(geom: ConvGeometry) -> bool:
    """Whether the shifted-product method may run for this geometry.

    Stride 1, a kernel with more than one offset, and a rough cost model not hopelessly against the shifts (the
    batched products and cell sums run several times slower per multiply-add than one big GEMM).
    """
    if any(s != 1 for s in geom.stride) or geom.K == 1:
        return False
    n_shift = len(_shifts(geom.kernel))
    shift_cost = 8 * n_shift * geom.N * math.prod(geom.spatial) * geom.groups * geom.Cg ** 2
    return shift_cost < 2 * geom.N * geom.T * geom.groups * geom.Dg ** 2


def method() -> str:
    """The patch covariance method ``KFC_PATCH_COV`` asks for (read at every call).

    ``auto`` (default; measure both once per geometry), ``im2col`` (always the reference) or ``shift``.
    """
    m = os.environ.get("KFC_PATCH_COV", "auto").strip().lower() or "auto"
    if m not in METHODS:
        raise ValueError(f"KFC_PATCH_COV={m!r} is not one of {METHODS}")
    return m


def patch_cov_update_cpu(F: Tensor, x: Tensor, geom: ConvGeometry, alpha: float, beta: float, ones: bool) -> Tensor:
    """The torch backend of ``kfc::patch_cov_update``.

    The shifted-product method where it is faster, else the im2col reference. ``auto`` times both on the first
    call of each geometry (like cudnn's benchmark mode) and keeps the faster; both give the same factor up to
    rounding.
    """
    m = method()
    if m == "im2col" or not eligible(geom):
        return reference.patch_cov_update_(F, x, geom, alpha, beta, ones)
    if m == "shift":
        return patch_cov_update_(F, x, geom, alpha, beta, ones)
    key = (geom, ones, F.dtype, x.dtype, F.device.type)
    choice = _chosen.get(key)
    if choice is None:  # time both: shift into a scratch copy, im2col into F itself (one extra factor-sized buffer)
        scratch = F.clone()
        t0 = time.perf_counter()
        patch_cov_update_(scratch, x, geom, alpha, beta, ones)
        t_shift = time.perf_counter() - t0
        t0 = time.perf_counter()
        reference.patch_cov_update_(F, x, geom, alpha, beta, ones)
        t_im2col = time.perf_counter() - t0
        choice = _chosen[key] = "shift" if t_shift < t_im2col else "im2col"
        log.debug("patch covariance %s: im2col %.2f ms, shift %.2f ms -> %s", geom, 1e3 * t_im2col, 1e3 * t_shift,
                  choice)
        return F.copy_(scratch) if choice == "shift" else F
    fn = patch_cov_update_ if choice == "shift" else reference.patch_cov_update_
    return fn(F, x, geom, alpha, beta, ones)


def _edges(geom: ConvGeometry, dim: int) -> tuple[list[int], list[int], list[int]]:
    """Window [lo, hi) read by each kernel offset along ``dim`` (clipped to the input) and the sorted cell edges."""
    size = geom.spatial[dim]
    lo, hi = [], []
    for k in range(geom.kernel[dim]):
        start = k * geom.dilation[dim] - geom.pad_lo[dim]
        lo.append(min(max(start, 0), size))
        hi.append(min(max(start + geom.out[dim], 0), size))
    return lo, hi, sorted(set(lo) | set(hi) | {0, size})


def _window_sums(t: Tensor, geom: ConvGeometry, cells2: list[int]) -> Tensor:
    """Sums of ``t`` (S0, S1, cells of dim 2, *rest) over the window box of every kernel offset: (K, *rest).

    Per dim one GEMM with the 0/1 matrix (offsets × positions, or × cells for dim 2) of the windows: no gathers
    and no signed corners. A dim of size 1 that every window covers (the leading dims of a 1-d/2-d conv) is
    skipped.
    """
    rest = t.shape[3:]
    lead = 1  # offsets of the dims done so far
    for dim in range(3):
        lo, hi, edges = _edges(geom, dim)
        if dim == 2 and edges != cells2:
            raise AssertionError("cells of the last spatial dim do not match its window edges")
        starts = torch.tensor(edges[:-1]) if dim == 2 else torch.arange(geom.spatial[dim])  # row / cell starts
        inside = (starts[None, :] >= torch.tensor(lo)[:, None]) & (starts[None, :] < torch.tensor(hi)[:, None])
        t = t.reshape(lead, starts.numel(), -1)
        if inside.shape != (1, 1) or not bool(inside):
            t = torch.matmul(inside.to(dtype=t.dtype, device=t.device), t)  # (lead, offsets of dim, ...)
        lead *= geom.kernel[dim]
    return t.reshape(geom.K, *rest)


def patch_cov_update_(F: Tensor, x: Tensor, geom: ConvGeometry, alpha: float, beta: float, ones: bool,
                      chunk_bytes: int = 64 << 20) -> Tensor:
    """Same contract as ``reference.patch_cov_update_``; requires stride 1."""
    if any(s != 1 for s in geom.stride):
        raise ValueError("shift_cov handles stride 1 only")
    with reference._no_autocast(F.device):
        G, Cg, N, S = geom.groups, geom.Cg, geom.N, geom.spatial
        Kn, dil, K = geom.kernel, geom.dilation, geom.K
        r = [(Kn[i] - 1) * dil[i] for i in range(3)]  # the largest |shift| per dim
        # (S0, S1, G, Cg, S2, N), zero-padded by r so that every shifted window is in range (zeros outside the
        # input); with (S2, N) adjacent a cell of dim 2 times the examples is one GEMM dimension, and (S1, G)
        # merge into one batch dimension
        xp = torch.nn.functional.pad(x.to(F.dtype).reshape(N, G, Cg, *S), [v for e in reversed(r) for v in (e, e)])
        xp = xp.permute(3, 4, 1, 2, 5, 0).contiguous()
        cells = _edges(geom, 2)[2]
        offsets = list(itertools.product(*[range(k) for k in Kn]))
        flat = {k: n for n, k in enumerate(offsets)}
        W = F.new_zeros(K, K, G, Cg, Cg)  # block (k, k') of Ω, before the (channel, offset) interleave
        st = xp.stride()

        def window(j0: int, j1: int, j2: range, a: int, b: int) -> Tensor:
            """``x`` at q + shift for q in the cell [a, b) of dim 2 and every j2: (S0, S1, G, len(j2), Cg, cell·N)."""
            base = ((r[0] + j0 * dil[0]) * st[0] + (r[1] + j1 * dil[1]) * st[1]
                    + (r[2] + j2.start * dil[2] + a) * st[4])
            return xp.as_strided((S[0], S[1], G, len(j2), Cg, (b - a) * N),
                                 (st[0], st[1], st[2], dil[2] * st[4], st[3], 1), xp.storage_offset() + base)

        # shifts grouped by (j0, j1): the j2 range of a group is one strided operand, so one GEMM per (group, cell)
        shifts = _shifts(Kn)
        groups = [(j01, range(min(j[2] for j in grp), max(j[2] for j in grp) + 1))
                  for j01, grp in ((k, list(g)) for k, g in itertools.groupby(shifts, key=lambda j: j[:2]))]
        per_shift = math.prod(S[:2]) * (len(cells) - 1) * G * Cg * Cg * F.element_size()
        cap = max(1, chunk_bytes // max(1, per_shift))
        chunk: list = []
        for n, grp in enumerate(groups):
            chunk.append(grp)
            if n + 1 < len(groups) and sum(len(g[1]) for g in chunk) + len(groups[n + 1][1]) <= cap:
                continue
            # the products of every (shift, cell), written in place: (S0, S1, cells, G, shifts·Cg, Cg)
            prod = F.new_empty(S[0], S[1], len(cells) - 1, G, sum(len(g[1]) for g in chunk) * Cg, Cg)
            for c, (a, b) in enumerate(itertools.pairwise(cells)):
                here = window(0, 0, range(1), a, b)[:, :, :, 0]  # (S0, S1, G, Cg, cell·N)
                at = 0
                for j01, j2 in chunk:
                    rows = len(j2) * Cg
                    lhs, dst = window(j01[0], j01[1], j2, a, b).flatten(3, 4), prod[:, :, c, :, at:at + rows]
                    if rows * Cg * (b - a) * N >= _OUT_MIN:  # big products: straight into the strided slot
                        torch.matmul(lhs, here.mT, out=dst)
                    else:  # small ones: bmm into a strided out loops over the batch, a copy is cheaper
                        dst.copy_(torch.matmul(lhs, here.mT))
                    at += rows
            # window sums over cells; block (k, k + j) is the transpose: x_{q+δ} x_qᵀ was computed
            sums = _window_sums(prod, geom, cells).unflatten(2, (-1, Cg))  # (K, G, shifts, Cg, Cg)
            del prod
            si, kf, kpf = [], [], []
            for sn, j in enumerate((j01 + (j2,) for j01, rng in chunk for j2 in rng)):
                for k in offsets:
                    kj = tuple(u + v for u, v in zip(k, j, strict=True))
                    if kj in flat:
                        si.append(sn), kf.append(flat[k]), kpf.append(flat[kj])
            si, kf, kpf = torch.tensor(si), torch.tensor(kf), torch.tensor(kpf)
            blocks = sums[kf, :, si].mT  # (pairs, G, Cg, Cg)
            same = kf == kpf  # diagonal blocks: x xᵀ from a GEMM, symmetrised so that Ω is exactly symmetric
            blocks[same] = 0.5 * (blocks[same] + blocks[same].mT)
            W[kf, kpf] = blocks
            W[kpf, kf] = blocks.mT
            chunk = []
        D = Cg * K
        # Ω is exactly symmetric by construction (mirrored blocks), so the update is elementwise: no symmetrising
        # pass and no full-size temporary besides W
        target = F[:, :D, :D]
        if beta == 0:
            target.copy_(W.permute(2, 3, 0, 4, 1).reshape(G, D, D)).mul_(alpha)
        else:
            target.mul_(beta).add_(W.permute(2, 3, 0, 4, 1).reshape(G, D, D), alpha=alpha)
        del W
        if ones:
            real = xp[r[0]:r[0] + S[0], r[1]:r[1] + S[1], :, :, r[2]:r[2] + S[2]].sum(-1)  # (S0, S1, G, Cg, S2)
            per_cell = torch.stack([real[..., a:b].sum(-1) for a, b in itertools.pairwise(cells)], dim=2)
            row = _window_sums(per_cell, geom, cells).permute(1, 2, 0).reshape(G, D)  # patch sums
            corner = torch.full((G,), float(N * geom.T), dtype=F.dtype, device=F.device)
            for part, value in ((F[:, D, :D], row), (F[:, :D, D], row), (F[:, D, D], corner)):
                if beta == 0:
                    part.copy_(value).mul_(alpha)
                else:
                    part.mul_(beta).add_(value, alpha=alpha)
        return F
