"""``kc.report``: a readable coverage table of a transformed model, and the memory its curvature will take."""
from __future__ import annotations

from torch import nn

from kfc_compile.curvature.memory import describe_layout, layer_memory, peak_bytes, plan_layouts
from kfc_compile.registry import KFCInfo

_MIB = 2.0 ** 20


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in rows]


def report(model: nn.Module, *, max_factor_dim: int | None = 8192, memory_budget: int | None = None,
           damping_method: str = "factored") -> str:
    """A text report of what ``kc.transform`` found in ``model``, and what ``kc.KFC`` will hold for it.

    Layers under KFC (kind, Ω and Γ sizes, groups, uses), uncovered parameters with reasons, black boxes, the
    share of trainable parameter elements covered, and per layer the layout and memory of its factors and inverses
    under ``kc.KFC``'s options of the same names (dense and as stored; ``curvature/memory.py``), with the peak of
    a statistics step with an inverse refresh.

    Raises:
        MemoryBudgetError: ``memory_budget`` cannot be met (as ``kc.KFC`` would raise).
    """
    info = getattr(model, "kfc", None)
    if not isinstance(info, KFCInfo):
        raise ValueError("report expects a model returned by kfc_compile.transform (it has no .kfc registry)")
    lines = [f"KFC layers ({len(info.layers)}, approx={info.approx}):"]
    rows = [[layer.name, layer.kind, layer.a_dim, layer.g_dim, layer.groups, layer.uses,
             "yes" if layer.bias is not None else "no"] for layer in info.layers]
    lines += _table(["layer", "kind", "Ω dim", "Γ dim", "groups", "uses", "bias"], rows) if rows else ["  (none)"]
    if info.uncovered:
        lines += ["", f"Uncovered parameters ({len(info.uncovered)}, left to the fallback optimizer):"]
        lines += _table(["parameter", "shape", "reason"],
                        [[u.name, "x".join(map(str, u.shape)) or "scalar", u.reason] for u in info.uncovered])
    if info.black_boxes:
        lines += ["", "Untraceable submodules kept as black boxes (their conv/linear modules are still tapped):"]
        lines += [f"  {b.name}: {b.reason}" for b in info.black_boxes]
    if info.frozen:
        lines += ["", f"Frozen parameters (requires_grad=False, ignored): {len(info.frozen)}"]
    lines += ["", f"Covered: {info.covered_numel:,} of {info.total_numel:,} trainable parameter elements "
                  f"({100 * info.coverage:.2f}%)"]
    if info.layers:
        lines += ["", *_memory_lines(info, max_factor_dim, memory_budget, damping_method)]
    return "\n".join(lines)


def _memory_lines(info: KFCInfo, max_factor_dim: int | None, memory_budget: int | None,
                  damping_method: str) -> list[str]:
    layouts = plan_layouts(info.layers, max_factor_dim, memory_budget, damping_method)
    dense = plan_layouts(info.layers, None, None, damping_method)
    mems = [layer_memory(layer, layouts[layer.name], damping_method) for layer in info.layers]
    rows, dense_held = [], 0
    for layer, m in zip(info.layers, mems, strict=True):
        a, g = describe_layout(m.layout)
        d = layer_memory(layer, dense[layer.name], damping_method)
        dense_held += d.held
        rows.append([layer.name, a, g, f"{m.factors / _MIB:.2f}", f"{m.inverses / _MIB:.2f}", f"{d.held / _MIB:.2f}"])
    budget = "" if memory_budget is None else f", memory_budget={memory_budget:,} B"
    lines = [f"Curvature memory (kc.KFC with max_factor_dim={max_factor_dim}{budget}, "
             f"damping_method={damping_method!r}):"]
    lines += _table(["layer", "Ω blocks", "Γ blocks", "factors MiB", "inverses MiB", "dense MiB"], rows)
    lines += [f"Held: {sum(m.held for m in mems) / _MIB:.2f} MiB (dense: {dense_held / _MIB:.2f} MiB); peak of a "
              f"statistics step with an inverse refresh: {peak_bytes(mems) / _MIB:.2f} MiB"]
    return lines
