"""``triton_kernels/shift_cov.py``'s shifted-product patch covariance before issue 17's statistics-cost work.

Its products concatenated per cell and stacked, its window sums by prefix sums and signed corner gathers; for
``stats_baseline.py`` (the same contract, the same factors up to rounding).
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from triton_kernels import reference
from triton_kernels.checks import ConvGeometry


def _shifts(kernel: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Offset differences j = k' − k (per dim, in kernel units), one of each ±j pair (lexicographically ≥ 0)."""
    ranges = [range(-(k - 1), k) for k in kernel]
    return [j for j in itertools.product(*ranges) if j >= tuple(-v for v in j)]


def _edges(geom: ConvGeometry, dim: int) -> tuple[list[int], list[int], list[int]]:
    """Window [lo, hi) read by each kernel offset along ``dim`` (clipped to the input) and the sorted cell edges."""
    size = geom.spatial[dim]
    lo, hi = [], []
    for k in range(geom.kernel[dim]):
        start = k * geom.dilation[dim] - geom.pad_lo[dim]
        lo.append(min(max(start, 0), size))
        hi.append(min(max(start + geom.out[dim], 0), size))
    return lo, hi, sorted(set(lo) | set(hi) | {0, size})


def _box_sums(t: Tensor, geom: ConvGeometry, cells2: list[int]) -> Tensor:
    """Sums of ``t`` (S0, S1, cells of dim 2, *rest) over the window box of every kernel offset: (K, *rest).

    Per dim one small GEMM with a 0/1 matrix gives the prefix sums at the window edges (edge 0 is a zero row),
    then each box is up to 2^3 signed corners of that grid.
    """
    rest = t.shape[3:]
    sizes = [geom.spatial[0], geom.spatial[1], len(cells2) - 1]
    corners, n_edges = [], []  # per dim: (index of each offset's lower edge or None if 0, of its upper edge)
    for dim in range(3):
        lo, hi, edges = _edges(geom, dim)
        if dim == 2 and edges != cells2:
            raise AssertionError("cells of the last spatial dim do not match its window edges")
        if sizes[dim] == 1 and not any(lo) and all(hi):  # every window is the whole size-1 dim: nothing to sum
            t = t.reshape(*t.shape[:dim], 1, -1)
            corners.append((None, [0] * len(hi)))
            n_edges.append(1)
            continue
        starts = torch.tensor(edges[:-1]) if dim == 2 else torch.arange(sizes[dim])  # where each row/cell begins
        below = (starts[None, :] < torch.tensor(edges)[:, None]).to(t.dtype)  # (edges, sizes[dim])
        t = torch.matmul(below, t.reshape(*t.shape[:dim], sizes[dim], -1))
        lo_pos = [edges.index(v) for v in lo]
        corners.append((lo_pos if any(lo_pos) else None, [edges.index(v) for v in hi]))
        n_edges.append(len(edges))
    t = t.reshape(*n_edges, *rest)
    offsets = list(itertools.product(*[range(v) for v in geom.kernel]))
    out = torch.zeros(len(offsets), *rest, dtype=t.dtype, device=t.device)
    for corner in itertools.product((1, 0), repeat=3):
        idx = [corners[dim][1] if use_hi else corners[dim][0] for dim, use_hi in enumerate(corner)]
        if any(i is None for i in idx):
            continue  # every lower edge of that dim is 0: the prefix there is zero
        term = t[tuple(torch.tensor([i[k[dim]] for k in offsets]) for dim, i in enumerate(idx))]
        out = out.sub_(term) if (3 - sum(corner)) % 2 else out.add_(term)
    return out


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
            parts = []
            for a, b in itertools.pairwise(cells):
                here = window(0, 0, range(1), a, b)[:, :, :, 0]  # (S0, S1, G, Cg, cell·N)
                parts.append(torch.cat([torch.matmul(window(j01[0], j01[1], j2, a, b).flatten(3, 4), here.mT)
                                        for j01, j2 in chunk], dim=3))  # (S0, S1, G, shifts·Cg, Cg)
            # box sums over cells; block (k, k + j) is the transpose: x_{q+δ} x_qᵀ was computed
            sums = _box_sums(torch.stack(parts, dim=2), geom, cells).unflatten(2, (-1, Cg))  # (K, G, shifts, Cg, Cg)
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
            row = _box_sums(per_cell, geom, cells).permute(1, 2, 0).reshape(G, D)  # patch sums
            corner = torch.full((G,), float(N * geom.T), dtype=F.dtype, device=F.device)
            for part, value in ((F[:, D, :D], row), (F[:, :D, D], row), (F[:, D, D], corner)):
                if beta == 0:
                    part.copy_(value).mul_(alpha)
                else:
                    part.mul_(beta).add_(value, alpha=alpha)
        return F
