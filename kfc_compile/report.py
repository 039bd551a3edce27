"""``kc.report``: a readable coverage table of a transformed model."""
from __future__ import annotations

from torch import nn

from kfc_compile.registry import KFCInfo


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*map(str, r)) for r in rows]


def report(model: nn.Module) -> str:
    """A text report of what ``kc.transform`` found in ``model``.

    Layers under KFC (kind, Ω and Γ sizes, groups, uses), uncovered parameters with reasons, black boxes, and the
    share of trainable parameter elements covered.
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
    return "\n".join(lines)
