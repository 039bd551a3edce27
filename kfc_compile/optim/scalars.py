"""The per-step scalars of the update rules over all parameters at once: a few fused ops, one host sync each.

``rules.py`` states the rules term by term (one fp64 reduction and one host sync per tensor and pair); on a model
with many small layers that Python loop, not the arithmetic, was a KFC step's cost (docs/benchmarks.md, "Step
cost"). The functions here compute the same quantities over the parameters flattened into one fp64 vector per
direction: one matrix product for every inner product among the directions and with ∇h. They equal the
term-by-term values up to the order of the fp64 summation (≤ 1e-15 relative; tests/test_step_cost.py).

Sharded ``DTensor`` parameters (FSDP2) cannot be flattened into one vector (their shards may be uneven); for them
each function is ``rules.py``'s term-by-term version, whose sums run over all ranks' shards.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from kfc_compile.curvature.guard import all_finite
from kfc_compile.optim import rules

#: tensors up to this many entries are checked for inf/NaN together (one copy into one buffer); larger ones alone
SMALL_NUMEL = 1 << 16


def sharded(tensors: Sequence[torch.Tensor | None]) -> bool:
    """Whether any of the tensors is a ``DTensor`` (one shard of a parameter per rank)."""
    return any(hasattr(t, "to_local") for t in tensors if t is not None)


def flat64(tensors: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors as one fp64 vector, in order; a None stands for zeros of the shape of ``like`` at its place."""
    parts = [(t if t is not None else torch.zeros_like(ref)).reshape(-1) for t, ref in zip(tensors, like,
                                                                                        strict=True)]
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    return (torch.cat(parts) if len(parts) > 1 else parts[0]).to(torch.float64)  # cat promotes mixed dtypes


def quadratic_model(fisher_gram: torch.Tensor, directions: Sequence[Sequence[torch.Tensor | None]],
                    grads: Sequence[torch.Tensor], eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``rules.quadratic_model`` (C = fisher_gram + η·⟨xᵢ, xⱼ⟩, d = ⟨∇h, xᵢ⟩, fp64) from one fp64 matrix product.

    The arguments are ``rules.quadratic_model``'s.
    """
    if sharded(grads):
        return rules.quadratic_model(fisher_gram, directions, grads, eta)
    g = flat64(grads, grads)
    X = torch.stack([flat64(x, grads) for x in directions])  # (k, n)
    G = torch.cat([X, g[None]]) @ X.T  # rows: the directions, then ∇h
    k = len(directions)
    return fisher_gram + eta * G[:k], G[k].clone()


def factored_nu(naturals: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float) -> float:
    """``rules.factored_nu``: ν = lr²·Σ⟨F̂⁻¹∇h, ∇h⟩ (fp64) with one dot product."""
    if sharded(grads):
        return rules.factored_nu(naturals, grads, lr)
    return lr ** 2 * float(flat64(naturals, grads) @ flat64(grads, grads))


def sum_squares(tensors: Sequence[torch.Tensor]) -> float:
    """``rules.sum_squares``: Σ‖t‖² (fp64) with one dot product."""
    if sharded(tensors):
        return rules.sum_squares(tensors)
    v = flat64(tensors, tensors)
    return float(v @ v)


def all_finite_(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one host sync (one per device on several devices).

    The small tensors of a device are copied into one buffer and read by one ``aminmax`` (a per-tensor check costs
    more in dispatch than in reading); larger ones are read in place.
    """
    small: dict[torch.device, list[torch.Tensor]] = {}
    flags = []
    for t in tensors:
        if t.numel() > SMALL_NUMEL or hasattr(t, "to_local"):  # a DTensor: its own check over all shards
            flags.append(all_finite(t))
        else:
            small.setdefault(t.device, []).append(t.detach().reshape(-1))
    for ts in small.values():
        flags.append(all_finite(torch.cat(ts) if len(ts) > 1 else ts[0]))
    if not flags:
        return True
    if len({f.device for f in flags}) > 1:  # one sync per device
        return all(bool(f) for f in flags)
    return bool(torch.stack(flags).all())
