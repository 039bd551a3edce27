"""Independent float64 references for the kernel tests (no code shared with triton_kernels.reference).

* ``loop_patches``: pure Python loops over every (example, location, channel, offset); the brute force.
* ``gather_patches``: the same by explicit index arithmetic and masking (vectorised), validated against the loops.
"""
from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


def draw_spatial(draw, ks, dil, pad, slack: int) -> list[int]:
    """Hypothesis: input sizes per dim that fit the dilated kernel after padding, up to ``slack`` larger."""
    from hypothesis import strategies as st

    out = []
    for i in range(len(ks)):
        span = dil[i] * (ks[i] - 1) + 1
        lo = max(1, span - pad[2 * i] - pad[2 * i + 1])
        out.append(draw(st.integers(lo, lo + slack)))
    return out


def out_sizes(S, ks, st, pad, dil) -> list[int]:
    return [(S[i] + pad[2 * i] + pad[2 * i + 1] - dil[i] * (ks[i] - 1) - 1) // st[i] + 1 for i in range(len(S))]


def loop_patches(x: Tensor, ks, st, pad, dil, groups: int, ones: bool) -> Tensor:
    """(N, G, Dg', T) float64 by brute force."""
    x = x.double()
    N, C, *S = x.shape
    d = len(S)
    To = out_sizes(S, ks, st, pad, dil)
    Cg = C // groups
    K = math.prod(ks)
    Dp = Cg * K + int(ones)
    T = math.prod(To)
    out = torch.zeros(N, groups, Dp, T, dtype=torch.float64)
    for n in range(N):
        for t, o in enumerate(itertools.product(*[range(v) for v in To])):
            for g in range(groups):
                col = 0
                for c in range(Cg):
                    for q in itertools.product(*[range(k) for k in ks]):
                        pos = [o[i] * st[i] - pad[2 * i] + q[i] * dil[i] for i in range(d)]
                        if all(0 <= pos[i] < S[i] for i in range(d)):
                            out[n, g, col, t] = x[(n, g * Cg + c, *pos)]
                        col += 1
                if ones:
                    out[n, g, col, t] = 1.0
    return out


def gather_patches(x: Tensor, ks, st, pad, dil, groups: int, ones: bool) -> Tensor:
    """(N, G, Dg', T) float64 by index arithmetic: coordinate = o*stride - pad_lo + q*dilation, masked."""
    x = x.double()
    N, C, *S = x.shape
    d = len(S)
    To = out_sizes(S, ks, st, pad, dil)
    T, K = math.prod(To), math.prod(ks)
    o = torch.cartesian_prod(*[torch.arange(v) for v in To]).reshape(T, d)      # (T, d) row-major
    q = torch.cartesian_prod(*[torch.arange(k) for k in ks]).reshape(K, d)      # (K, d) row-major
    pos = [o[:, None, i] * st[i] - pad[2 * i] + q[None, :, i] * dil[i] for i in range(d)]   # each (T, K)
    valid = torch.ones(T, K, dtype=torch.bool)
    for i in range(d):
        valid &= (pos[i] >= 0) & (pos[i] < S[i])
    idx = [p.clamp(0, S[i] - 1) for i, p in enumerate(pos)]
    vals = x[(slice(None), slice(None), *idx)] * valid                        # (N, C, T, K)
    Cg = C // groups
    cols = vals.reshape(N, groups, Cg, T, K).permute(0, 1, 2, 4, 3).reshape(N, groups, Cg * K, T)
    if ones:
        cols = torch.cat([cols, torch.ones(N, groups, 1, T, dtype=torch.float64)], dim=2)
    return cols


def patch_cov(x: Tensor, ks, st, pad, dil, groups: int, ones: bool) -> Tensor:
    """(G, Dg', Dg') float64: sum over examples and locations of pbar pbar^T."""
    P = gather_patches(x, ks, st, pad, dil, groups, ones)
    return torch.einsum("ngdt,nget->gde", P, P)


def patch_sum(x: Tensor, ks, st, pad, dil, groups: int, ones: bool) -> Tensor:
    return gather_patches(x, ks, st, pad, dil, groups, ones).sum(-1)


def syrk(X: Tensor, ones: bool) -> Tensor:
    """Xbar^T Xbar in float64 for (M, D) or (B, M, D)."""
    Xd = X.double()
    if ones:
        Xd = torch.cat([Xd, torch.ones(*Xd.shape[:-1], 1, dtype=torch.float64)], dim=-1)
    return torch.einsum("...md,...me->...de", Xd, Xd)


def eigen(grad: Tensor, QG: Tensor, lG: Tensor, QA: Tensor, lA: Tensor, damping: float) -> Tensor:
    g, qg, qa = grad.double(), QG.double(), QA.double()
    inner = torch.einsum("...ki,...kl,...lj->...ij", qg, g, qa)
    inner = inner / (lG.double()[..., :, None] * lA.double()[..., None, :] + damping)
    return torch.einsum("...ik,...kl,...jl->...ij", qg, inner, qa)


def kron(grad: Tensor, Ginv: Tensor, Ainv: Tensor) -> Tensor:
    return torch.einsum("...ik,...kl,...lj->...ij", Ginv.double(), grad.double(), Ainv.double())


def rel_err(got: Tensor, ref: Tensor) -> float:
    """Max |got - ref| / max |ref| (0 for an all-zero ref matched exactly)."""
    diff = (got.double() - ref.double()).abs().max().item() if got.numel() else 0.0
    scale = ref.double().abs().max().item() if ref.numel() else 0.0
    return diff / scale if scale > 0 else diff


def tol(dtype: torch.dtype) -> float:
    """Relative tolerance for results accumulated in ``dtype`` (fp32 sums of a few hundred terms)."""
    return 1e-12 if dtype == torch.float64 else 2e-5


def assert_symmetric(F: Tensor) -> None:
    assert not torch.isnan(F).any(), "NaN in the result (poisoned output leaked?)"
    assert torch.equal(F, F.mT), "result is not exactly symmetric"


def random_sym(shape, dtype) -> Tensor:
    A = torch.randn(*shape, dtype=torch.float64)
    return (A + A.mT).to(dtype)
