"""The preconditioner's own damped curvature F̂ as a quadratic form: vec(P)ᵀ F̂ vec(P) per layer, per bucket.

KFC-pre's factored trust region on the applied step (``clip_curvature="factored"``, ``clip_on="step"``,
docs/algorithm.md §6.2) needs pᵀF̂p for the momentum buffer p, where F̂ is exactly the operator whose inverse the
preconditioner applies (``inverses.py``), so that for d = v the factored ν is today's lr²·⟨F̂⁻¹∇h, ∇h⟩:

* **eigen** damping: F̂ = (Q_Γ ⊗ Q_Ω) diag(l_Γ l_Ωᵀ + η) (Q_Γ ⊗ Q_Ω)ᵀ, so pᵀF̂p = Σ (l_Γ l_Ωᵀ + η) ⊙ (Q_Γᵀ P Q_Ω)²
  from the stored eigenbases (``scale`` folded into l_Ω; silent coordinates: η‖P_silent‖²; blocked: per tile).
* **factored** damping: F̂ = Γ_d ⊗ Ω_d, pᵀF̂p = Σ P ⊙ (Γ_d P Ω_d). The damped factors Γ_d, Ω_d are not kept (the
  inverses are, and the running factors have moved on since the refresh), so they are taken as the inverses of
  the stored Γ_d⁻¹, Ω_d⁻¹ (Cholesky in their dtype, as the refresh itself; float64 for fp64 models; a failure
  redone in float64): the curvature whose inverse is applied, whatever built it (a refresh, a rescale, the damped
  identity, a checkpoint). One inversion per factor per new inverse, the refresh's own cost again, memoised on the
  bucket's inverse object (:func:`damped`); a silent coordinate's Ω_d is 1/``silent_scale``.

Layers with a gradient but no inverse yet are preconditioned by the identity (``estimator.precondition``), so their
F̂ is I. Every sum is in float64.
"""
from __future__ import annotations

import weakref
from dataclasses import replace

import torch

from kfc_compile.curvature.inverses import EigenInverse, FactoredInverse, LayerInverse

_DAMPED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _inverted(M: torch.Tensor) -> torch.Tensor:
    """The inverses of stacked SPD matrices by Cholesky in M's dtype; a failure is redone by LU in float64."""
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info == 0).all()):
        return torch.cholesky_inverse(L)
    X = torch.linalg.inv(M.double())
    return (0.5 * (X + X.mT)).to(M.dtype)


def damped(inv: FactoredInverse) -> FactoredInverse:
    """The same layout holding Ω_d, Γ_d (in the places of Ω_d⁻¹, Γ_d⁻¹): its ``solve`` multiplies by F̂.

    Memoised per inverse object (inverses are replaced, never changed in place).
    """
    out = _DAMPED.get(inv)
    if out is None:
        out = replace(inv, Ainv=_inverted(inv.Ainv), Ginv=_inverted(inv.Ginv),
                      silent_scale=None if inv.silent_scale is None else 1.0 / inv.silent_scale)
        _DAMPED[inv] = out
    return out


def product_tensors(inv: LayerInverse) -> tuple[torch.Tensor, ...]:
    """A dense (bucketable) inverse's tensors for :func:`dense_quadratic`: (Γ_d, Ω_d) or (Q_Γ, l_Γ, Q_Ω, l_Ω)."""
    if inv.method == "factored":
        d = damped(inv)
        return d.Ginv, d.Ainv
    inv = inv.folded()
    return inv.QG, inv.lG, inv.QA, inv.lA


def dense_quadratic(method: str, tensors: tuple[torch.Tensor, ...], eta: torch.Tensor | float,
                    P: torch.Tensor) -> torch.Tensor:
    """Σ over the stacked matrices P ``(groups, g, a)`` of vec(P)ᵀ F̂ vec(P) (fp64 0-d), plain torch ops.

    ``tensors`` are :func:`product_tensors`'; ``eta`` (eigen only) may be a 0-d tensor, so that ``torch.compile``
    traces it as an input.
    """
    if method == "factored":
        Gd, Ad = tensors
        return (P * (Gd @ P @ Ad)).sum(dtype=torch.float64)
    QG, lG, QA, lA = tensors
    W = QG.mT @ P @ QA
    return ((lG[:, :, None] * lA[:, None, :] + eta) * W * W).sum(dtype=torch.float64)


def _sq(t: torch.Tensor) -> torch.Tensor:
    return (t * t).sum(dtype=torch.float64)


def quadratic(inv: LayerInverse, P: torch.Tensor) -> torch.Tensor:
    """vec(P)ᵀ F̂ vec(P) for one (stacked) inverse of any layout: dense, live block, blocked (fp64 0-d).

    P are the stacked matrices ``(groups, g, a)`` in the inverse's layout (``precondition.grad_matrix``).
    """
    P = P.to(inv.dtype)
    if isinstance(inv, FactoredInverse):
        return (P * damped(inv).solve(P)).sum(dtype=torch.float64)
    if not isinstance(inv, EigenInverse):
        raise TypeError(f"no curvature product for inverse kind {type(inv).__name__}")
    inv = inv.folded()
    if inv.layout is not None:
        lay = inv.layout
        ga, gg = P.shape[-1], P.shape[-2]
        ba, bg = inv.QA.shape[-1], inv.QG.shape[-1]
        M = torch.nn.functional.pad(P, (0, lay.a_blocks * ba - ga, 0, lay.g_blocks * bg - gg))
        n, kg, ka = lay.groups, lay.g_blocks, lay.a_blocks
        M = M.reshape(n, kg, bg, ka, ba)
        V = torch.einsum("nidc,nidjb->nicjb", inv.QG.reshape(n, kg, bg, bg), M)
        V = torch.einsum("nicjb,njbe->nicje", V, inv.QA.reshape(n, ka, ba, ba))
        w = inv.lG.reshape(n, kg, bg)[:, :, :, None, None] * inv.lA.reshape(n, ka, ba)[:, None, None] + inv.eta
        return (w * V * V).sum(dtype=torch.float64)
    if inv.live is None:
        return dense_quadratic("eigen", (inv.QG, inv.lG, inv.QA, inv.lA), inv.eta, P)
    live = dense_quadratic("eigen", (inv.QG, inv.lG, inv.QA, inv.lA), inv.eta, P.index_select(-1, inv.live))
    return live + inv.eta * _sq(P.index_select(-1, inv.silent))


def bucket_quadratic(buckets: list, mats: dict[int, torch.Tensor]) -> torch.Tensor:
    """Σ vec(P_i)ᵀ F̂_i vec(P_i) over the layers i in ``mats`` (layer index → ``(groups, g, a)``), fp64 0-d.

    ``buckets`` are the estimator's (``precondition.Bucket``); a bucket's members outside ``mats`` count as zero
    matrices, and a layer in no bucket (no inverse yet: preconditioned by the identity) contributes ‖P_i‖².
    """
    total = torch.zeros((), dtype=torch.float64)
    seen = set()
    for b in buckets:
        present = [i for i in b.members if i in mats]
        if not present:
            continue
        seen.update(present)
        inv = b.inverse
        parts = []
        for i, c in zip(b.members, b.counts, strict=True):
            m = mats.get(i)
            parts.append(m.to(inv.dtype) if m is not None else torch.zeros((c,) + mats[present[0]].shape[1:],
                                                                            dtype=inv.dtype,
                                                                            device=mats[present[0]].device))
        total = total + quadratic(inv, torch.cat(parts) if len(parts) > 1 else parts[0])
    for i, m in mats.items():
        if i not in seen:
            total = total + _sq(m)
    return total
