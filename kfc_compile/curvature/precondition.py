"""Per-layer gradient matrices and their preconditioning in buckets: Γ⁻¹ [∇W | ∇b] Ω⁻¹ for all KFC layers.

A layer's gradient matrix is ``[∇W | ∇b]`` per group, ``(groups, g_dim, a_dim)``, bias column last; for a grouped
conv, group g is output rows ``g·Cout/groups .. (g+1)·Cout/groups`` of ``weight.flatten(1)``. The inverses
(``inverses.py``) of layers with the same kind, shapes, dtype, device and η are stacked into one :class:`Bucket`,
applied in one batched kernel call.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from kfc_compile.curvature.inverses import LayerInverse
from kfc_compile.registry import KFCLayer


def regularised_grad(param: torch.Tensor, grad: torch.Tensor, weight_decay: float) -> torch.Tensor:
    """∇h = grad + wd·θ: the gradient of the objective with its ℓ2 term.

    Args:
        param: θ (read detached).
        grad: the loss gradient for ``param`` (returned as is when ``weight_decay`` is 0).
        weight_decay: the ℓ2 coefficient wd.

    Returns:
        A new tensor, or ``grad`` itself without weight decay.
    """
    return grad + weight_decay * param.detach() if weight_decay else grad


def grad_matrix(layer: KFCLayer, weight_decay: float = 0.0, grads: tuple | None = None) -> torch.Tensor | None:
    """``[∇W + wd·W | ∇b + wd·b]`` per group, ``(groups, g_dim, a_dim)``; None if the layer has no gradient.

    ``grads`` overrides ``(weight.grad, bias.grad)``. A missing bias gradient (while the weight has one) is zero.
    The weight block is the site kind's view of the parameter (``weight_matrix``: ``weight.flatten(1)`` per group
    for linear and conv layers).
    """
    W, b = layer.weight, layer.bias
    gW, gb = grads if grads is not None else (W.grad, None if b is None else b.grad)
    if gW is None and gb is None:
        return None
    if gW is None:
        gW = torch.zeros_like(W)
    gW = layer.sites[0].weight_matrix(regularised_grad(W, gW, weight_decay))
    if b is None:
        return gW
    if gb is None:
        gb = torch.zeros_like(b)
    gb = regularised_grad(b, gb, weight_decay).reshape(layer.groups, layer.g_dim, 1)
    return torch.cat([gW.to(torch.promote_types(gW.dtype, gb.dtype)), gb.to(gW.dtype)], dim=-1)


def split_matrix(layer: KFCLayer, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`grad_matrix`'s layout: (update of W in the parameter's layout, update of b or None)."""
    a_in = layer.a_dim - (layer.bias is not None)
    dW = layer.sites[0].weight_from_matrix(U[..., :a_in], layer.weight.shape)
    db = U[..., a_in].reshape(layer.bias.shape) if layer.bias is not None else None
    return dW, db


@dataclass(eq=False)
class Bucket:
    """Same-shape groups of several layers, applied in one batched kernel call."""

    members: list[int]  # layer indices
    counts: list[int]  # groups per member
    inverse: LayerInverse  # stacked over all members' groups, scales folded in


def build_buckets(inverses: dict[int, LayerInverse]) -> list[Bucket]:
    """Stack the inverses of layers with equal :attr:`LayerInverse.bucket_key`.

    The key is (kind, shapes, dtype, device, η); live-block and blocked layers get a bucket of their own.
    """
    keyed: dict[tuple, list[int]] = defaultdict(list)
    for i, inv in inverses.items():
        key = inv.bucket_key
        keyed[("alone", i) if key is None else key].append(i)
    buckets = []
    for members in keyed.values():
        invs = [inverses[i] for i in members]
        first = invs[0]
        stacked = first.folded() if first.bucket_key is None else type(first).concatenate(invs)
        buckets.append(Bucket(members, [v.groups for v in invs], stacked))
    return buckets


def apply_buckets(buckets: list[Bucket], mats: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Preconditioned matrices for every layer in ``mats`` (layer index → (groups, g, a)).

    One kernel call per bucket whose members all have a gradient, per-layer calls otherwise.
    """
    out: dict[int, torch.Tensor] = {}
    for b in buckets:
        present = [i for i in b.members if i in mats]
        if not present:
            continue
        dtype = b.inverse.dtype
        if len(present) == len(b.members):
            parts = [mats[i].to(dtype) for i in b.members]
            U = b.inverse.solve(torch.cat(parts) if len(parts) > 1 else parts[0])
            for i, part in zip(b.members, torch.split(U, b.counts), strict=True):
                out[i] = part
            continue
        offsets = [0]
        for c in b.counts:
            offsets.append(offsets[-1] + c)
        for pos, i in enumerate(b.members):
            if i in mats:
                out[i] = b.inverse.part(slice(offsets[pos], offsets[pos + 1])).solve(mats[i].to(dtype))
    return out


def bucket_tensors(bucket: Bucket) -> tuple[str, tuple[torch.Tensor, ...]] | None:
    """A dense bucket's inverse as (method, tensors): ``("factored", (Ginv, Ainv))``, ``("eigen", (QG, lG, QA, lA))``.

    None for a bucket :func:`dense_solve` cannot apply (live-block or blocked inverses, whose products need index
    gathers or block tiles: :meth:`LayerInverse.solve`).
    """
    inv = bucket.inverse
    if inv.bucket_key is None:
        return None
    if inv.method == "factored":
        return "factored", (inv.Ginv, inv.Ainv)
    if inv.method == "eigen":
        return "eigen", (inv.QG, inv.lG, inv.QA, inv.lA)
    return None


def dense_solve(method: str, tensors: tuple[torch.Tensor, ...], eta: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The dense bucket product of :func:`bucket_tensors`' inverse on stacked matrices ``g`` (in the inverse's dtype).

    The same arithmetic as ``triton_kernels``' torch reference (``Ginv g Ainv``; ``QG [(QGᵀ g QA) / (lG lAᵀ + η)]
    QAᵀ``) in plain torch ops, so that ``torch.compile`` traces it whole; ``eta`` is a 0-d tensor (a damping
    change does not recompile).
    """
    if method == "factored":
        Ginv, Ainv = tensors
        return Ginv @ g @ Ainv
    QG, lG, QA, lA = tensors
    den = lG[:, :, None] * lA[:, None, :] + eta
    return QG @ ((QG.mT @ g @ QA) / den) @ QA.mT
