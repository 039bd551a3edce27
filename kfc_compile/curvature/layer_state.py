"""What ``kc.KFC`` keeps for one KFC layer: its factor layout, moving averages, damped inverse and flags."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kfc_compile.curvature.blocks import Layout
from kfc_compile.curvature.factors import Factors, RunningFactors, public_view
from kfc_compile.curvature.inverses import LayerInverse
from kfc_compile.registry import KFCLayer


@dataclass(eq=False)
class LayerState:
    """What the optimizer keeps for one KFC layer.

    Attributes:
        layer: the layer (its weight, bias, group and factor sizes).
        layout: how its factors are stored (dense, or diagonal blocks with ``max_factor_dim``).
        running: the moving averages of Ω and Γ; None before any statistics (or after a non-finite restart).
        inverse: the damped inverses / eigendecompositions; None before the first refresh.
        frozen: statistics are not collected (``KFC.set_factors(..., frozen=True)``).
        stale: the factors were replaced since the last refresh: the next one recomputes the inverse.
    """

    layer: KFCLayer
    layout: Layout
    running: RunningFactors | None = None
    inverse: LayerInverse | None = None
    frozen: bool = False
    stale: bool = False

    @property
    def name(self) -> str:
        """The layer's name."""
        return self.layer.name

    def nbytes(self) -> int:
        """Bytes of the tensors held for this layer: the moving averages plus the inverse."""
        tensors = [] if self.running is None else [self.running.A, self.running.G]
        if self.inverse is not None:
            tensors += self.inverse.tensors()
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    def dense_factors(self) -> Factors | None:
        """Copies of the moving averages (Ω, Γ) as dense matrices; None before any statistics.

        2-D for an ungrouped layer, else stacked per group; blocked factors as the block-diagonal matrices they
        stand for.
        """
        if self.running is None:
            return None
        A, G = self.running.A, self.running.G
        if self.layout.blocked:
            A, G = self.layout.to_dense(A, G)
        return Factors(public_view(A).clone(), public_view(G).clone())

    def replace_factors(self, A: torch.Tensor, G: torch.Tensor, frozen: bool) -> None:
        """Set the moving averages to dense (Ω, Γ); the inverse is recomputed at the next refresh.

        Args:
            A: Ω, ``(groups, a_dim, a_dim)`` or 2-D for an ungrouped layer (a blocked layout keeps its diagonal
                blocks).
            G: Γ, ``(groups, g_dim, g_dim)`` or 2-D.
            frozen: stop collecting statistics for this layer.

        Raises:
            ValueError: a factor has the wrong shape.
        """
        layer = self.layer
        dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        shapes = ((layer.groups, layer.a_dim, layer.a_dim), (layer.groups, layer.g_dim, layer.g_dim))
        out = []
        for t, shape, what in ((A, shapes[0], "A"), (G, shapes[1], "G")):
            t = torch.as_tensor(t)
            if t.dim() == 2:
                t = t.unsqueeze(0)
            if tuple(t.shape) != shape:
                raise ValueError(f"{what} for layer {layer.name!r} must have shape {shape} (or 2-D when ungrouped), "
                                 f"got {tuple(t.shape)}")
            out.append(t.detach().to(dtype=dtype, device=layer.weight.device).clone())
        if self.layout.blocked:
            out = list(self.layout.to_blocks(*out))
        self.running = RunningFactors(out[0], out[1], updates=1)
        self.frozen = bool(frozen)
        self.stale = True


def fold_into(states: Sequence[LayerState], batch: dict[int, Factors], decay: float) -> None:
    """Fold batch factors (layer index → Factors) into the moving averages of ``states[i]``, all layers at once.

    A layer's first batch becomes its average (ε = 0: no copy); the others are averaged in by one
    :meth:`RunningFactors.fold` (a few foreach ops for all layers instead of two ops per factor).
    """
    averaged = []
    for i, f in batch.items():
        s = states[i]
        if s.running is None:
            s.running = RunningFactors(f.A, f.G, updates=1)
        else:
            averaged.append((s.running, f))
    RunningFactors.fold(averaged, decay)
