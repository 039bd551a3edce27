"""Factor state: one (Ω, Γ) pair per weight parameter, in the paper's scaling (docs/algorithm.md §2.3).

``Factors`` is the (Ω, Γ) record of one layer (the batch statistics of ``statistics.py`` normalise into it);
``RunningFactors`` keeps the moving average with ε = min(1 − 1/k, decay) (K-FAC). Factors are stored stacked per
group, ``(groups, d, d)``, or as diagonal blocks per group (``blocks.py``).
"""
from __future__ import annotations

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
        eps = self.next_eps(decay)
        self.updates += 1
        if batch.A is not self.A:
            self.A.mul_(eps).add_(batch.A, alpha=1.0 - eps)
        self.G.mul_(eps).add_(batch.G, alpha=1.0 - eps)

    def nbytes(self) -> int:
        """Bytes held by the two running factors."""
        return self.A.numel() * self.A.element_size() + self.G.numel() * self.G.element_size()
