"""Factor state: one (Ω, Γ) pair per weight parameter, in the paper's scaling (docs/algorithm.md §2.3).

``Factors`` is the (Ω, Γ) record of one layer (the batch statistics of ``statistics.py`` normalise into it);
``RunningFactors`` keeps the moving average with ε = min(1 − 1/k, decay) (K-FAC). Factors are stored stacked per
group, ``(groups, d, d)``, or as diagonal blocks per group (``blocks.py``).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch


class Factors(NamedTuple):
    """Ω (``A``) and Γ (``G``) of one layer; 2-D for ungrouped layers, stacked ``(groups, d, d)`` otherwise.

    ``kron(G, A)`` is the approximate Fisher block of the per-example loss for the row-major ``[W | b]``.
    """

    A: torch.Tensor
    G: torch.Tensor


def public_view(t: torch.Tensor) -> torch.Tensor:
    """Drop the group dimension of an ungrouped layer's factor."""
    return t[0] if t.shape[0] == 1 else t


@dataclass
class RunningFactors:
    """Exponential moving average of a layer's factors: F ← ε F + (1 − ε) F_batch, ε = min(1 − 1/k, decay)."""

    A: torch.Tensor
    G: torch.Tensor
    updates: int = 0

    def next_eps(self, decay: float) -> float:
        """ε of the next update."""
        return min(1.0 - 1.0 / (self.updates + 1), decay)

    def update(self, batch: Factors, decay: float) -> None:
        """Fold a batch in; a batch Ω that *is* this average was already folded in the kernel's epilogue."""
        RunningFactors.fold([(self, batch)], decay)

    @staticmethod
    def fold(pairs: Sequence[tuple[RunningFactors, Factors]], decay: float) -> None:
        """:meth:`update` of many layers at once: two ``torch._foreach_*`` ops per distinct ε, not two per factor.

        The same arithmetic as ``F.mul_(ε).add_(F_batch, alpha=1 − ε)`` per factor (bitwise: foreach ops compute
        elementwise like their per-tensor forms); a batch Ω that *is* its running Ω (averaged in the kernel
        epilogue) is skipped.
        """
        by_eps: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for running, batch in pairs:
            eps = running.next_eps(decay)
            running.updates += 1
            old, new = by_eps.setdefault(eps, ([], []))
            for r, b in ((running.A, batch.A), (running.G, batch.G)):
                if b is not r:
                    old.append(r)
                    new.append(b)
        for eps, (old, new) in by_eps.items():
            if old:
                torch._foreach_mul_(old, eps)
                torch._foreach_add_(old, new, alpha=1.0 - eps)

    def nbytes(self) -> int:
        """Bytes held by the two running factors."""
        return self.A.numel() * self.A.element_size() + self.G.numel() * self.G.element_size()
