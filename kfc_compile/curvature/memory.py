"""What the curvature of each layer will cost in memory, and a plan of factor layouts that fits a budget.

Per layer (factors in fp32, fp64 for fp64 layers; ``Layout`` says dense or diagonal blocks):

* **factors**: the running Ω and Γ, ``groups·a_blocks·b_Ω² + groups·g_blocks·b_Γ²`` entries;
* **inverses**: Ω_d⁻¹ and Γ_d⁻¹ (factored damping) or the eigenbases plus eigenvalues (eigen damping): as many
  entries again (plus one row per matrix for the eigenvalues); silent coordinates can only make it smaller;
* **workspace**: the transient memory of one layer's refresh: three float64 copies of its larger stacked side
  (the damped copy, its Cholesky factor and the inverse of an fp64 retry).

The **peak** of a statistics step with an inverse refresh is then Σ (factors + inverses) + Σ factors (one step's
batch statistics of every layer, alive together until they are averaged in) + the largest workspace.

:func:`plan_layouts` with a ``budget`` (``KFC(memory_budget=...)``) keeps ``max_factor_dim``'s layouts when the
peak fits, and otherwise halves the block size of the layer that holds the most, again and again, until it does
(down to blocks of :data:`MIN_BLOCK`); when even that cannot fit, it raises before anything is allocated, so a run
never runs out of memory halfway through its first inverse refresh.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from kfc_compile.curvature.blocks import Layout, block_size
from kfc_compile.registry import KFCLayer

MIN_BLOCK = 64  # the smallest diagonal block a budget may impose


class MemoryBudgetError(ValueError):
    """The curvature of the KFC layers cannot fit ``memory_budget`` even with the smallest diagonal blocks."""


@dataclass(frozen=True)
class LayerMemory:
    """Bytes one layer's curvature takes with a given layout (see the module docstring)."""

    name: str
    layout: Layout
    factors: int
    inverses: int
    workspace: int

    @property
    def held(self) -> int:
        """Bytes held between steps: factors plus inverses."""
        return self.factors + self.inverses


def factor_itemsize(layer: KFCLayer) -> int:
    """Bytes per factor entry: 8 for fp64 layers, else 4 (factors are fp32 for fp32, bf16 and fp16 weights)."""
    return 8 if layer.weight.dtype == torch.float64 else 4


def layer_memory(layer: KFCLayer, layout: Layout, damping_method: str = "factored") -> LayerMemory:
    """The memory of ``layer``'s curvature stored as ``layout`` under ``damping_method``."""
    (na, ba, _), (ng, bg, _) = layout.shapes()
    item = factor_itemsize(layer)
    entries = na * ba * ba + ng * bg * bg
    inverse = entries + (na * ba + ng * bg if damping_method == "eigen" else 0)
    workspace = 3 * 8 * max(na * ba * ba, ng * bg * bg)
    return LayerMemory(layer.name, layout, entries * item, inverse * item, workspace)


def peak_bytes(memories: Sequence[LayerMemory]) -> int:
    """Peak bytes of a statistics step with an inverse refresh (see the module docstring)."""
    if not memories:
        return 0
    return sum(m.held + m.factors for m in memories) + max(m.workspace for m in memories)


def plan_layouts(layers: Sequence[KFCLayer], max_factor_dim: int | None, budget: int | None,
                 damping_method: str = "factored", fixed: Mapping[str, Layout] | None = None) -> dict[str, Layout]:
    """Factor layouts for ``layers`` whose curvature peak fits ``budget`` bytes (None: ``max_factor_dim``'s).

    Args:
        layers: the KFC layers.
        max_factor_dim: the blocks cap every layer starts from (None: dense).
        budget: bytes the curvature may take at its peak, or None.
        damping_method: ``"factored"`` or ``"eigen"`` (the size of the inverses).
        fixed: layouts that may not change (layers that already hold factors); they count toward the budget.

    Returns:
        Layer name → layout.

    Raises:
        MemoryBudgetError: nothing fits, naming the budget, the smallest peak reachable and the widest layers.
    """
    fixed = dict(fixed or {})
    layouts = {layer.name: fixed.get(layer.name) or Layout.of(layer.groups, layer.a_dim, layer.g_dim,
                                                              max_factor_dim) for layer in layers}
    if budget is None:
        return layouts
    by_name = {layer.name: layer for layer in layers}

    def memories() -> list[LayerMemory]:
        return [layer_memory(by_name[n], lay, damping_method) for n, lay in layouts.items()]

    while (peak := peak_bytes(mem := memories())) > budget:
        splittable = [m for m in mem if m.name not in fixed and _largest_block(m.layout) > MIN_BLOCK]
        if not splittable:
            widest = sorted(mem, key=lambda m: -m.held)[:3]
            raise MemoryBudgetError(
                f"memory_budget={budget:,} bytes cannot hold the curvature of the KFC layers: even with diagonal "
                f"blocks of {MIN_BLOCK} the peak is {peak:,} bytes (held: "
                + ", ".join(f"{m.name!r} {m.held:,}" for m in widest)
                + "); raise memory_budget, or leave the widest layers out of KFC")
        worst = max(splittable, key=lambda m: m.held)
        lay = worst.layout
        cap = max(MIN_BLOCK, _largest_block(lay) // 2)
        layouts[worst.name] = Layout.of(lay.groups, lay.a_dim, lay.g_dim, cap)
    return layouts


def _largest_block(layout: Layout) -> int:
    return max(block_size(layout.a_dim, layout.a_blocks), block_size(layout.g_dim, layout.g_blocks))


def describe_layout(layout: Layout) -> tuple[str, str]:
    """("dense" or "k×b" blocks) for Ω and for Γ, as ``kc.report`` prints them."""
    def side(d: int, k: int) -> str:
        return "dense" if k == 1 else f"{k}×{block_size(d, k)}"

    return side(layout.a_dim, layout.a_blocks), side(layout.g_dim, layout.g_blocks)


def budget_note(layers: Sequence[KFCLayer], layouts: Mapping[str, Layout], max_factor_dim: int | None,
                budget: int | None) -> str | None:
    """A sentence naming the layers whose layout the budget changed from ``max_factor_dim``'s (None if none)."""
    changed = []
    for layer in layers:
        lay = layouts.get(layer.name)
        if lay is not None and lay != Layout.of(layer.groups, layer.a_dim, layer.g_dim, max_factor_dim):
            a, g = describe_layout(lay)
            changed.append(f"{layer.name!r} (Ω {a}, Γ {g})")
    if not changed:
        return None
    return (f"memory_budget={budget:,} bytes: {len(changed)} KFC layer(s) keep smaller diagonal blocks of their "
            f"factors than max_factor_dim={max_factor_dim} gives, to fit: " + ", ".join(changed))


def planned_layouts(layers: Sequence[KFCLayer], max_factor_dim: int | None, budget: int | None,
                    damping_method: str, fixed: Mapping[str, Layout] | None, warned: set[str]) -> dict[str, Layout]:
    """:func:`plan_layouts`, with a once-only warning (``warned``) naming the layers the budget re-blocked."""
    layouts = plan_layouts(layers, max_factor_dim, budget, damping_method, fixed)
    note = budget_note(layers, layouts, max_factor_dim, budget)
    if note is not None and note not in warned:
        warned.add(note)
        warnings.warn(note, stacklevel=5)
    return layouts
