"""The package structure holds.

The import graph of ``kfc_compile`` and ``triton_kernels`` has no cycle, internal imports are at module level (none
hidden in functions to dodge a cycle), the core never imports the tools, and no module grows past the size at which
it stops holding one concept.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("kfc_compile", "triton_kernels")
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str, module: str, path: Path, level: int) -> str:
    if level == 0:
        return name
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _internal(target: str) -> str | None:
    """The internal module an import of ``target`` loads (the longest known prefix), or None."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in MODULES:
            return name
    return None


def _imports(module: str, path: Path) -> list[tuple[str, bool]]:
    """(internal module imported, whether at module level) for every import statement of a module."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body} | {id(n) for s in tree.body if isinstance(s, ast.If) for n in s.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):  # `from pkg import mod` loads pkg.mod; `from pkg import name`, pkg
            base = _resolve(node.module or "", module, path, node.level)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            dep = _internal(t)
            if dep is not None and dep != module:
                out.append((dep, id(node) in top))
    return out


GRAPH = {m: {d for d, _ in _imports(m, p)} for m, p in MODULES.items()}


def test_import_graph_has_no_cycle():
    """The module-level import graph is acyclic.

    ``from pkg import mod`` is an edge to ``pkg.mod``, ``from pkg import name`` to ``pkg`` (its ``__init__``); the
    implicit import of a module's parent packages is not an edge (an ``__init__`` that re-exports its children is
    the usual layout, not a cycle).
    """
    try:
        order = list(graphlib.TopologicalSorter(GRAPH).static_order())
    except graphlib.CycleError as e:
        pytest.fail(f"import cycle: {' -> '.join(e.args[1])}")
    assert set(order) == set(MODULES)


def test_internal_imports_are_at_module_level():
    local = [(m, d) for m, p in MODULES.items() for d, top in _imports(m, p) if not top]
    assert not local, f"function-local imports of internal modules (hidden cycles?): {local}"


def test_core_never_imports_tools():
    core = [m for m in MODULES if not m.startswith("kfc_compile.tools")]
    bad = [(m, d) for m in core for d in GRAPH[m] if d.startswith("kfc_compile.tools")]
    assert not bad, bad


CURVATURE_MATH = tuple(f"kfc_compile.curvature.{m}" for m in
                       ("statistics", "factors", "blocks", "losses", "inverses", "decompositions", "precondition"))
UPPER = ("kfc_compile.frontend", "kfc_compile.optim", "kfc_compile.step", "kfc_compile.transform",
         "kfc_compile.tools", "kfc_compile.curvature.estimator", "kfc_compile.curvature.estimate")


def test_lower_layers_do_not_import_upper_ones():
    """The layers of docs/architecture.md §4 (maths and kernels at the bottom; the tools on top).

    The curvature maths and the kernels at the bottom, then sites and runtime (below both front ends), then the
    front ends, then the drivers (estimator, kc.curvature) and the optimizer.
    """
    rules = {
        "triton_kernels": ("kfc_compile",),
        CURVATURE_MATH: ("kfc_compile.sites", "kfc_compile.runtime", *UPPER),
        "kfc_compile.sites": ("kfc_compile.runtime", *UPPER),
        "kfc_compile.runtime": UPPER,
        "kfc_compile.frontend": ("kfc_compile.optim", "kfc_compile.step", "kfc_compile.tools",
                                 "kfc_compile.curvature.estimator", "kfc_compile.curvature.estimate"),
    }
    bad = [(m, d) for m in MODULES for low, uppers in rules.items() if m.startswith(low)
           for d in GRAPH[m] if d.startswith(uppers)]
    assert not bad, bad
    assert all(m in MODULES for m in CURVATURE_MATH), "a curvature module was renamed: update the layer table"


def test_modules_stay_small():
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines (split them by concept): {big}"


def test_the_checks_see_the_package(tmp_path):
    """Guards the tests above against passing vacuously (a moved root, a broken walk, a blind detector)."""
    assert "kfc_compile.optim.kfc" in MODULES and "kfc_compile.sites.kinds" in MODULES
    assert "kfc_compile.sites.geometry" in GRAPH["kfc_compile.sites.kinds"]
    probe = tmp_path / "probe.py"
    probe.write_text("import torch\nfrom kfc_compile.sites import kinds\n\n\ndef f():\n"
                     "    from ..optim import kfc\n    return kfc\n")
    found = set(_imports("kfc_compile.runtime.probe", probe))
    assert found == {("kfc_compile.sites.kinds", True), ("kfc_compile.optim.kfc", False)}
