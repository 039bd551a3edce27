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


def _spread(rows: list[dict], key: str) -> dict:
    """Median and minimum (with its model) of ``key`` over the rows that have it, under ``key_median`` etc."""
    have = [r for r in rows if r.get(key) is not None]
    low = min(have, key=lambda r: r[key]) if have else None
    return {f"{key}_median": statistics.median(r[key] for r in have) if have else None,
            f"{key}_min": low[key] if low else None, f"{key}_min_model": low["name"] if low else None}


def totals(rows: list[dict]) -> dict:
    """The totals of a sweep's rows.

    Counts by status, coverage median / minimum (and its model), the median step-time ratio, and how many models
    trained and decreased their loss; for detail rows also the conv/linear shares, eager and compiled
    (``linear_coverage_median`` ...), and the models with tied weights.
    """
    ratios = [r["step_time_ratio"] for r in rows if r["step_time_ratio"] is not None]
    out = {"models": len(rows), **{s: sum(r["status"] == s for r in rows) for s in ("ok", "partial", "failed")},
           **_spread(rows, "coverage"),
           "ratio_median": statistics.median(ratios) if ratios else None,
           "loss_decreased": sum(bool(r["loss_decreased"]) for r in rows),
           "trained": sum(bool(r["trained"]) for r in rows)}
    if any("linear_coverage" in r for r in rows):
        out.update(**_spread(rows, "linear_coverage"), **_spread(rows, "compiled_linear_coverage"),
                   tied=sum(bool(r.get("tied")) for r in rows),
                   compiled=sum(r.get("compiled_linear_coverage") is not None for r in rows))
    return out


def render(rows: list[dict], header: dict) -> str:
    """The ``zoo.md`` text for ``rows`` under the run ``header``."""
    t = totals(rows)
    lines = ["# kfc-compile zoo", ""]
    for k in ("command", "date", "started", "machine", "commit", "source", "threads", "steps", "resolution",
              "batch", "lr", "damping", "max_factor_dim", "timing_steps", "time_limit", "compiled", "resumed",
              "wall_s_before", "wall_s"):
        if header.get(k) is not None:
            lines.append(f"* {k}: `{header[k]}`" if k == "command" else f"* {k}: {header[k]}")
    done = f"{len(rows)} of {header.get('n_models', len(rows))}"
    lines += ["", "## Totals", "",
              f"* models run: {done}; ok {t['ok']}, partial (black boxes) {t['partial']}, failed {t['failed']}",
              f"* trained {t['trained']}, loss decreased on the fixed batch {t['loss_decreased']}",
              f"* coverage (share of trainable parameter elements under KFC): median {pct(t['coverage_median'])}, "
              f"min {pct(t['coverage_min'])} ({t['coverage_min_model']})",
              f"* median KFC / SGD step-time ratio: {num(t['ratio_median'])} (steady-state KFC steps: statistics "
              "every step, the inverse refreshes every 20 steps left out; see the zoo module doc)"]
    if "linear_coverage_median" in t:
        lines += [f"* conv/linear share under KFC (weights tied to embeddings left out): eager median "
                  f"{pct(t['linear_coverage_median'])}, min {pct(t['linear_coverage_min'])} "
                  f"({t['linear_coverage_min_model']}); compiled ({t['compiled']} models) median "
                  f"{pct(t['compiled_linear_coverage_median'])}, min {pct(t['compiled_linear_coverage_min'])} "
                  f"({t['compiled_linear_coverage_min_model']}); models with tied weights: {t['tied']}", ""]
        lines += detail_table(rows)
    else:
        lines += ["", *_table(rows)]
    problems = [r for r in rows if r["error"] or r["black_boxes"] or r.get("compiled_error")]
    if problems:
        lines += ["", "## Failures and black boxes", ""]
        for r in problems:
            if r["error"]:
                lines.append(f"* `{r['name']}` failed: {r['error']}")
            if r.get("compiled_error"):
                lines.append(f"* `{r['name']}` compiled coverage not measured: {r['compiled_error']}")
            for b in r["black_boxes"] or []:
                lines.append(f"* `{r['name']}` black box `{b['name']}`: {b['reason'][:200]}")
    return "\n".join(lines) + "\n"


def _cells(r: dict) -> tuple[str, str, str, str]:
    """(input, loss before → after, layers by kind, factor MiB) cells of a row."""
    inp = "x".join(map(str, r["input_shape"][1:])) if r["input_shape"] else ""
    loss = f"{num(r['loss_before'])} → {num(r['loss_after'])}" if r["loss_after"] is not None else ""
    kinds = ", ".join(f"{k} {v}" for k, v in (r["layers_by_kind"] or {}).items())
    mib = num(r["factor_bytes"] / 2**20, ".1f") if r["factor_bytes"] is not None else ""
    return inp, loss, kinds, mib


def _table(rows: list[dict]) -> list[str]:
    lines = ["| model | family | status | input | params | KFC layers | kinds | coverage | uncovered (reason: count) "
             "| loss before → after | KFC s/step | SGD s/step | ratio | factor MiB |",
             "|---|---|---|---|---:|---:|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        inp, loss, kinds, mib = _cells(r)
        unc = "; ".join(f"{k}: {v['count']}" for k, v in (r["uncovered"] or {}).items())
        lines.append(f"| {r['name']} | {r['family']} | {r['status']} | {inp} | {r['params'] or 0:,} | "
                     f"{num(r['kfc_layers'], 'd')} | {kinds} | {pct(r['coverage'])} | {unc} | {loss} | "
                     f"{num(r['kfc_step_s'])} | {num(r['sgd_step_s'])} | {num(r['step_time_ratio'])} | {mib} |")
    return lines


def _misses(d: dict | None) -> str:
    return "; ".join(f"{k}: {v['count']} ({', '.join(f'`{p}`' for p in v['params'][:2])}"
                     f"{', ...' if v['count'] > 2 else ''})" for k, v in (d or {}).items())


def detail_table(rows: list[dict]) -> list[str]:
    """The per-model table of a detail sweep: conv/linear shares eager and compiled, their misses, tied weights."""
    lines = ["| model | family | status | front end | input | params | KFC layers | kinds | conv/linear eager | "
             "conv/linear compiled | all params | conv/linear outside KFC (reason: count) | tied to embeddings | "
             "trained | loss before → after | KFC/SGD step time |",
             "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---|---|---|---|---:|"]
    for r in rows:
        inp, loss, kinds, _ = _cells(r)
        trained = "yes" if r["trained"] and r["loss_decreased"] else ("finite, not decreasing" if r["trained"]
                                                                       else "no")
        misses = _misses(r.get("linear_uncovered"))
        comp = r.get("compiled_linear_uncovered")
        if comp and comp != r.get("linear_uncovered"):
            misses += f" — compiled: {_misses(comp)}"
        tied = ", ".join(f"`{t}`" for t in r.get("tied") or [])
        lines.append(f"| {r['name']} | {r['family']} | {r['status']} | {r.get('frontend') or ''} | {inp} | "
                     f"{r['params'] or 0:,} | {num(r['kfc_layers'], 'd')} | {kinds} | {pct(r.get('linear_coverage'))} "
                     f"| {pct(r.get('compiled_linear_coverage'))} | {pct(r['coverage'])} | {misses} | {tied} | "
                     f"{trained} | {loss} | {num(r['step_time_ratio'])} |")
    return lines
