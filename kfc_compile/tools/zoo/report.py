"""The zoo's report files: ``zoo.json`` and ``zoo.md``.

``zoo.json`` is ``{"schema_version": 1, "run": header, "models": rows}``; ``zoo.md`` holds the run header, totals,
one table row per model, then the failures and black boxes.
"""
from __future__ import annotations

import json
import os
import platform
import statistics

import torch

SCHEMA_VERSION = 1


def write(rows: list[dict], out: str, header: dict | None = None) -> None:
    """Write ``zoo.json`` and ``zoo.md`` for ``rows`` (and the run ``header``) into the directory ``out``."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "zoo.json"), "w") as f:
        json.dump({"schema_version": SCHEMA_VERSION, "run": header or {}, "models": rows}, f, indent=1)
    with open(os.path.join(out, "zoo.md"), "w") as f:
        f.write(render(rows, header or {}))


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for run headers."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    """The CPU, its core count and the torch version, for run headers."""
    return f"{cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def pct(v: float | None) -> str:
    """``v`` as a percentage with two decimals; empty for None."""
    return "" if v is None else f"{100 * v:.2f}%"


def num(v: float | None, fmt: str = ".3g") -> str:
    """``v`` formatted with ``fmt``; empty for None."""
    return "" if v is None else format(v, fmt)


def totals(rows: list[dict]) -> dict:
    """The totals of a sweep's rows.

    Counts by status, coverage median / minimum (and its model), the median step-time ratio, and how many models
    trained and decreased their loss.
    """
    covs = [r["coverage"] for r in rows if r["coverage"] is not None]
    ratios = [r["step_time_ratio"] for r in rows if r["step_time_ratio"] is not None]
    return {"models": len(rows), **{s: sum(r["status"] == s for r in rows) for s in ("ok", "partial", "failed")},
            "coverage_median": statistics.median(covs) if covs else None, "coverage_min": min(covs) if covs else None,
            "coverage_min_model": min((r for r in rows if r["coverage"] is not None),
                                      key=lambda r: r["coverage"])["name"] if covs else None,
            "ratio_median": statistics.median(ratios) if ratios else None,
            "loss_decreased": sum(bool(r["loss_decreased"]) for r in rows),
            "trained": sum(bool(r["trained"]) for r in rows)}


def render(rows: list[dict], header: dict) -> str:
    """The ``zoo.md`` text for ``rows`` under the run ``header``."""
    t = totals(rows)
    lines = ["# kfc-compile zoo", ""]
    for k in ("command", "date", "machine", "threads", "steps", "resolution", "batch", "lr", "damping",
              "max_factor_dim", "timing_steps", "time_limit", "wall_s"):
        if header.get(k) is not None:
            lines.append(f"* {k}: `{header[k]}`" if k == "command" else f"* {k}: {header[k]}")
    done = f"{len(rows)} of {header.get('n_models', len(rows))}"
    lines += ["", "## Totals", "",
              f"* models run: {done}; ok {t['ok']}, partial (black boxes) {t['partial']}, failed {t['failed']}",
              f"* trained {t['trained']}, loss decreased on the fixed batch {t['loss_decreased']}",
              f"* coverage (share of trainable parameter elements under KFC): median {pct(t['coverage_median'])}, "
              f"min {pct(t['coverage_min'])} ({t['coverage_min_model']})",
              f"* median KFC / SGD step-time ratio: {num(t['ratio_median'])} (steady-state KFC steps: statistics "
              "every step, the inverse refreshes every 20 steps left out; see the zoo module doc)", "",
              "| model | family | status | input | params | KFC layers | kinds | coverage | uncovered (reason: count) "
              "| loss before → after | KFC s/step | SGD s/step | ratio | factor MiB |",
              "|---|---|---|---|---:|---:|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in (r["layers_by_kind"] or {}).items())
        unc = "; ".join(f"{k}: {v['count']}" for k, v in (r["uncovered"] or {}).items())
        inp = "x".join(map(str, r["input_shape"][1:])) if r["input_shape"] else ""
        loss = f"{num(r['loss_before'])} → {num(r['loss_after'])}" if r["loss_after"] is not None else ""
        mib = num(r["factor_bytes"] / 2**20, ".1f") if r["factor_bytes"] is not None else ""
        lines.append(f"| {r['name']} | {r['family']} | {r['status']} | {inp} | {r['params'] or 0:,} | "
                     f"{num(r['kfc_layers'], 'd')} | {kinds} | {pct(r['coverage'])} | {unc} | {loss} | "
                     f"{num(r['kfc_step_s'])} | {num(r['sgd_step_s'])} | {num(r['step_time_ratio'])} | {mib} |")
    problems = [r for r in rows if r["error"] or r["black_boxes"]]
    if problems:
        lines += ["", "## Failures and black boxes", ""]
        for r in problems:
            if r["error"]:
                lines.append(f"* `{r['name']}` failed: {r['error']}")
            for b in r["black_boxes"] or []:
                lines.append(f"* `{r['name']}` black box `{b['name']}`: {b['reason'][:200]}")
    return "\n".join(lines) + "\n"
