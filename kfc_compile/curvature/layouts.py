"""Which factor layout each KFC layer gets, and the layout its statistics are recorded in.

A layout (``blocks.Layout``) is dense, or diagonal blocks for factors wider than ``max_factor_dim``, or smaller
blocks a ``memory_budget`` asks for (``memory.plan_layouts``). The statistics of a layer must be recorded in the
layout its running factors get. With a live registry (``torch.compile(m, backend="kfc")``) a layer may join after
the plan was made (the subset pass's forward may compile a graph): its statistics start before the estimator
follows it, so the plan is extended for it then, and that layout is kept when the estimator does follow it.
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Sequence

from kfc_compile.curvature.blocks import Layout, block_count
from kfc_compile.curvature.memory import planned_layouts
from kfc_compile.registry import KFCLayer


class LayoutPlan:
    """The layouts of a model's KFC layers under ``max_factor_dim`` and a ``memory_budget`` (see the module doc)."""

    def __init__(self, layers: Sequence[KFCLayer], max_factor_dim: int | None, memory_budget: int | None,
                 damping_method: str, warned: set[str]):
        self.max_factor_dim = max_factor_dim
        self.memory_budget = memory_budget
        self.damping_method = damping_method
        self.warned = warned  # once-only warnings (the budget's re-blocking), shared with the optimizer
        self.planned = planned_layouts(layers, max_factor_dim, memory_budget, damping_method, None, warned)
        self.recorded: dict[str, Layout] = {}  # layouts given to statistics of layers not yet followed

    def layout_of(self, layer: KFCLayer) -> Layout:
        """The layer's planned layout (``max_factor_dim``'s for a layer the plan does not know)."""
        return self.planned.get(layer.name) or Layout.of(layer.groups, layer.a_dim, layer.g_dim, self.max_factor_dim)

    def replan(self, layers: Sequence[KFCLayer], kept: dict[str, Layout]) -> None:
        """Plan ``layers`` again, keeping the layouts in ``kept`` and those statistics were already recorded in."""
        names = {la.name for la in layers}
        kept = kept | {n: lay for n, lay in self.recorded.items() if n in names and n not in kept}
        self.planned = planned_layouts(layers, self.max_factor_dim, self.memory_budget, self.damping_method, kept,
                                       self.warned)

    def blocks_of(self, layer: KFCLayer, layers: Sequence[KFCLayer], followed: Iterable[tuple[str, Layout]]
                  ) -> tuple[int, int]:
        """(Ω blocks, Γ blocks) the layer's statistics are recorded in: those of its layout.

        A layer not planned yet is planned with the registry's ``layers``, keeping the ``followed`` layers'
        (name, layout) pairs, and its layout is remembered for :meth:`replan`.
        """
        lay = self.planned.get(layer.name) or self.recorded.get(layer.name)
        if lay is None:
            kept = dict(followed) | self.recorded
            plan = planned_layouts(layers, self.max_factor_dim, self.memory_budget, self.damping_method, kept,
                                   self.warned)
            lay = plan.get(layer.name) or Layout.of(layer.groups, layer.a_dim, layer.g_dim, self.max_factor_dim)
            self.recorded[layer.name] = lay
        return lay.a_blocks, lay.g_blocks


def weak_blocks(ref: weakref.ref, max_factor_dim: int | None) -> Callable[[KFCLayer], tuple[int, int]]:
    """The blocks function the capture state asks (``ref()``'s ``blocks_of``); ``max_factor_dim``'s once it is gone.

    By weak reference: the capture state outlives the optimizer in dynamo's caches and must not keep it (and the
    model) alive.
    """
    def blocks(layer: KFCLayer) -> tuple[int, int]:
        estimator = ref()
        if estimator is None:
            return block_count(layer.a_dim, max_factor_dim), block_count(layer.g_dim, max_factor_dim)
        return estimator.blocks_of(layer)

    return blocks
