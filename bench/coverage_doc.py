"""Build docs/coverage.md from the coverage sweeps of torchvision, timm and HF.

    .venv/bin/python bench/coverage_sweep.py --detail --jsonl /tmp/cov.jsonl --out /tmp/cov.md
    kfc-compile zoo --source timm --threads 1 --time-limit 120 --timing-steps 0 --out /tmp/zoo-timm
    kfc-compile zoo --source hf --threads 1 --time-limit 120 --compiled --out /tmp/zoo-hf
    .venv/bin/python bench/coverage_doc.py --torchvision /tmp/cov.jsonl --timm /tmp/zoo-timm/zoo.json \
        --hf /tmp/zoo-hf/zoo.json [--timm-compiled /tmp/zoo-timm-c/zoo.json ...] [--notes NOTES.md] \
        --out docs/coverage.md

``--timm-compiled``: a zoo.json of a (sub)set of the timm models run with ``--compiled``; its compiled columns fill
the rows of the same models. ``--notes``: a markdown file whose text goes under "Notes" (diagnoses of misses and
failures). Prints the summary table for README.md. The JSON inputs are not committed; the markdown is.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

from kfc_compile.tools import zoo
from kfc_compile.tools.zoo.report import pct

GOAL_HF_FAMILIES = ("causal-lm", "encoder", "vision")
COMPILED_KEYS = ("compiled_coverage", "compiled_linear_coverage", "compiled_linear_uncovered", "compiled_error")


def _load_zoo(path: str) -> tuple[list[dict], dict]:
    """Rows and run header of a zoo.json; ``PATH=COMMIT`` names the commit that measured them (header ``commit``)."""
    path, _, commit = path.partition("=")
    with open(path) as f:
        doc = json.load(f)
    header = doc.get("run", {})
    if commit:
        header = {**header, "commit": commit}
    return doc["models"], header


def _load_jsonl(path: str) -> tuple[list[dict], dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    header = rows[0] if rows and "model" not in rows[0] else {}
    return [r for r in rows if "model" in r], header


def _time_limited(row: dict) -> bool:
    return "time limit" in (row.get("error") or "")


def _spread(values: list[float]) -> str:
    return f"{pct(statistics.median(values))} / {pct(min(values))}" if values else ""


def _trained(r: dict) -> bool:
    return bool(r["trained"] and r["loss_decreased"])


def summary_table(tv: list[dict], groups: list[tuple[str, list[dict]]]) -> str:
    """One line per source: models, trained, conv/linear share eager and compiled, all-parameter coverage, tied."""
    lines = ["| source | models | trained (finite, decreasing loss) | conv/linear eager: median / min | "
             "conv/linear compiled: measured, median / min | all parameters eager: median | tied to embeddings |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    if tv:
        lin = [r["linear_coverage"] for r in tv if r.get("linear_coverage") is not None]
        comp = [r["compiled_linear_coverage"] for r in tv if r.get("compiled_linear_coverage") is not None]
        cov = [r["coverage"] for r in tv if "coverage" in r]
        lines.append(f"| torchvision classification (transform only) | {len(tv)} | 80 of 80 in docs/zoo.md | "
                     f"{_spread(lin)} | {len(comp)}, {_spread(comp)} | {pct(statistics.median(cov))} | "
                     f"{sum(bool(r.get('tied')) for r in tv)} |")
    for label, rows in groups:
        lin = [r["linear_coverage"] for r in rows if r.get("linear_coverage") is not None]
        comp = [r["compiled_linear_coverage"] for r in rows if r.get("compiled_linear_coverage") is not None]
        cov = [r["coverage"] for r in rows if r.get("coverage") is not None]
        lines.append(f"| {label} | {len(rows)} | {sum(map(_trained, rows))} | {_spread(lin)} | "
                     f"{len(comp)}, {_spread(comp)} | {pct(statistics.median(cov)) if cov else ''} | "
                     f"{sum(bool(r.get('tied')) for r in rows)} |")
    return "\n".join(lines)


def goals(timm_rows: list[dict], hf_rows: list[dict]) -> list[str]:
    """The issue's coverage goals, each with what was measured."""
    out = []
    if hf_rows:
        rows = [r for r in hf_rows if r["family"] in GOAL_HF_FAMILIES]
        low = [r for r in rows if (r.get("linear_coverage") or 0) < 0.99]
        out.append(f"* HF, conv/linear share ≥ 99% on every causal LM, encoder and vision model (tied weights "
                   f"excepted): {'met' if not low else 'missed'} — {len(rows) - len(low)} of {len(rows)}"
                   + ("" if not low else "; below: " + ", ".join(f"{r['name']} {pct(r.get('linear_coverage'))}"
                                                                   for r in low)))
    if timm_rows:
        n = len(timm_rows)
        trained = sum(map(_trained, timm_rows))
        lin = [r["linear_coverage"] for r in timm_rows if r.get("linear_coverage") is not None]
        med, low = (statistics.median(lin), min(lin)) if lin else (None, None)
        low_models = ", ".join(f"{r['name']} {pct(r['linear_coverage'])}" for r in timm_rows
                               if r.get("linear_coverage") is not None and r["linear_coverage"] < 0.95)
        out += [f"* timm, ≥ 95% of the families train with a finite decreasing loss: "
                f"{'met' if trained >= 0.95 * n else 'missed'} — {trained} of {n} ({pct(trained / n)})",
                f"* timm, conv/linear share median ≥ 99%: {'met' if med is not None and med >= 0.99 else 'missed'} "
                f"— {pct(med)} over the {len(lin)} models whose layers were found",
                f"* timm, minimum ≥ 95%: {'met' if low is not None and low >= 0.95 else 'missed'} — {pct(low)}"
                + (f"; below 95%: {low_models}" if low_models else "")]
    return out


def torchvision_table(rows: list[dict]) -> list[str]:
    lines = ["| model | result | input | params | KFC layers | conv/linear eager | conv/linear compiled | "
             "all params | largest uncovered group (share of all) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        top = f"{r['top_uncovered'][0]} ({pct(r['top_uncovered'][1])})" if r.get("top_uncovered") else ""
        res = f"{r['res']}x{r['res']}" if "res" in r else ""
        lines.append(f"| {r['model']} | {r.get('status')} | {res} | {r.get('params', 0):,} | {r.get('layers', '')} | "
                     f"{pct(r.get('linear_coverage'))} | {pct(r.get('compiled_linear_coverage'))} | "
                     f"{pct(r.get('coverage'))} | {top} |")
    return lines


def _short_command(command: str | None) -> str:
    """``command`` with a long ``--models`` list shortened to its first and last names and their count."""
    parts = (command or "").split(" ")
    if "--models" in parts:
        i = parts.index("--models") + 1
        names = parts[i].split(",") if i < len(parts) else []
        if len(names) > 4:
            parts[i] = f"{names[0]},{names[1]},...,{names[-1]} ({len(names)} names)"
    return " ".join(parts)


def _header(header: dict) -> list[str]:
    return [f"* {k}: `{_short_command(header[k])}`" if k == "command" else f"* {k}: {header[k]}"
            for k in ("command", "date", "machine", "commit", "threads", "steps", "batch", "time_limit",
                      "timing_steps", "wall_s") if header.get(k) is not None]


def _source_section(title: str, rows: list[dict], header: dict, extra: str = "") -> list[str]:
    body = zoo.render(rows, header).split("## Totals", 1)[1]  # the run header is printed above
    return [f"## {title}", "", *_header(header), *([extra] if extra else []), "", "### Totals" + body.replace(
        "\n## ", "\n### ")]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torchvision", nargs="+", default=[],
                    help="JSON lines of bench/coverage_sweep.py --detail (several: a model's row comes from the first "
                         "file that has it)")
    ap.add_argument("--timm", nargs="+", default=[],
                    help="zoo.json files of kfc-compile zoo --source timm (several: a model's row comes from the "
                         "first file that has it); "
                         "PATH=COMMIT (here and below) names the commit that measured them")
    ap.add_argument("--timm-rerun", nargs="*", default=[],
                    help="zoo.json files of timm models run again on their own (e.g. with a longer --time-limit); "
                         "their rows replace the rows of the same models")
    ap.add_argument("--timm-compiled", nargs="*", default=[],
                    help="zoo.json files of timm models run with --compiled (fill their columns; a later file's "
                         "rows win)")
    ap.add_argument("--hf", help="zoo.json of kfc-compile zoo --source hf")
    ap.add_argument("--notes", help="markdown file for the Notes section")
    ap.add_argument("--out", default="docs/coverage.md")
    args = ap.parse_args(argv)
    tv, tv_headers = [], []
    for path in args.torchvision:  # a model in several files: the first file's row
        rows, header = _load_jsonl(path)
        seen = {r["model"] for r in tv}
        used = [r for r in rows if r["model"] not in seen]
        tv += used
        tv_headers.append({**header, "rows_used": len(used)})
    timm_rows, timm_headers = [], []
    limited: list[str] = []  # rows stopped by the time limit, replaced by a later file's completed row
    for path in args.timm:  # a model in several files: the first file's row, unless time-limited
        rows, header = _load_zoo(path)
        index = {r["name"]: k for k, r in enumerate(timm_rows)}
        used = [r for r in rows if r["name"] not in index]
        for r in rows:
            k = index.get(r["name"])
            if k is not None and _time_limited(timm_rows[k]) and not _time_limited(r):
                timm_rows[k] = r
                limited.append(r["name"])
        timm_rows += used
        timm_headers.append({**header, "rows_used": len(used), "rows_in_file": len(rows)})
    hf_rows, hf_header = _load_zoo(args.hf) if args.hf else ([], {})
    extra = ""
    reruns: dict[str, tuple[dict, dict]] = {}
    for path in args.timm_rerun:
        rows, header = _load_zoo(path)
        reruns.update({r["name"]: (r, header) for r in rows})
    if reruns:
        unknown = set(reruns) - {r["name"] for r in timm_rows}
        if unknown:
            ap.error(f"--timm-rerun models not in the timm runs: {sorted(unknown)}")
        timm_rows = [reruns[r["name"]][0] if r["name"] in reruns else r for r in timm_rows]
        extra = "\n".join(f"* re-run: `{n}` ({r['status']}, {r['seconds']:.0f} s), {h.get('date')}, commit "
                           f"{h.get('commit', '?')}, `{_short_command(h.get('command'))}`; its row replaces the "
                           "sweep's" for n, (r, h) in reruns.items())
    compiled: dict[str, dict] = {}
    for path in args.timm_compiled:
        comp_rows, comp_header = _load_zoo(path)
        by = {r["name"]: r for r in comp_rows if r.get("compiled_linear_coverage") is not None}
        compiled.update(by)
        extra += (("\n" if extra else "") + f"* compiled columns: {len(by)} models, from "
                  f"`{_short_command(comp_header.get('command'))}` ({comp_header.get('date')}, commit "
                  f"{comp_header.get('commit', '?')}, {comp_header.get('wall_s')} s wall, stopped after "
                  f"{len(comp_rows)} models)")
    for r in timm_rows:
        if r["name"] in compiled and r.get("compiled_linear_coverage") is None:
            r.update({k: compiled[r["name"]].get(k) for k in COMPILED_KEYS})
    groups = [(lbl, rows) for lbl, rows in (("timm (one model per family)", timm_rows), ("HF (the project's list)",
                                                                                       hf_rows)) if rows]
    table = summary_table(tv, groups)
    lines = ["# Coverage: which conv/linear parameters KFC preconditions", "",
             "Produced by `bench/coverage_sweep.py --detail` (torchvision), `kfc-compile zoo --source timm|hf` "
             "and `bench/coverage_doc.py`; do not edit the tables by hand.", "",
             "* **conv/linear share**: the share of conv/linear parameter elements under KFC. The conv/linear "
             "parameters are found from the modules, independently of KFC's matching: weights and biases of "
             "`nn.Linear`, `nn.Conv*d`/`nn.ConvTranspose*d` (and subclasses, e.g. timm's `StdConv2d`), HF "
             "`Conv1D`, `nn.MultiheadAttention` projections, plus any other parameter KFC takes as a layer. A "
             "weight tied to an `nn.Embedding` (an LM head) is an embedding matrix too and stays outside KFC: it "
             "is left out of the share with its layer's bias and listed as *tied*.",
             "* **eager**: `kc.transform(model)` (torch.fx where it traces the whole forward, dynamo capture "
             "otherwise: column *front end*), after the first forward for captured models. **compiled**: "
             "`torch.compile(model, backend=\"kfc\")` of a fresh build after one forward (inner backend "
             "`eager`: the same graph scan as with inductor, without its compile time).",
             "* **all params**: the share of every trainable parameter element (norms, embeddings, position "
             "tables ... included), what `tm.kfc.coverage` reports; the rest is trained by the fallback.",
             "* **trained**: `kc.KFC` (lr 0.003, damping 0.1, `max_factor_dim=1024`) took 2 steps on one fixed "
             "synthetic batch (8 examples, the same dropout masks in every step) with finite losses, and the loss "
             "after them is below the loss before.", "",
             "## Summary", "", table, "", "## Goals (issue 14)", "", *goals(timm_rows, hf_rows), ""]
    if args.notes:
        with open(args.notes) as f:
            lines += ["## Notes", "", f.read().strip(), ""]
    if tv:
        lines += ["## torchvision classification", ""]
        for h in tv_headers:
            lines += [f"* run: {h['rows_used']} rows used of its {h.get('n_models')} models, {h.get('date')}, "
                      f"commit {h.get('commit')}, "
                      f"`{_short_command(h.get('command'))}`"]
        lines += [f"* machine: {tv_headers[0].get('machine')}",
                  "* transform only (eval mode, batch 2, outputs compared with the original model); training: "
                  "every classification model trained with a finite decreasing loss in the `kfc-compile zoo` "
                  "sweep of [zoo.md](zoo.md)", "", *torchvision_table(tv), ""]
    if timm_rows:
        runs = [f"* run {i + 1} of {len(timm_headers)}: {h['rows_used']} rows used of the {h['rows_in_file']} it "
                f"measured (of {h.get('n_models')} models), {h.get('date')}, commit "
                f"{h.get('commit', '?')}, {h.get('wall_s')} s wall"
                + (f" (+ {h['wall_s_before']} s before a --resume)" if h.get("wall_s_before") else "")
                + f", `{_short_command(h.get('command'))}`" for i, h in enumerate(timm_headers)]
        if limited:
            runs.append(f"* stopped by the time limit in an earlier run, completed in a later one (that row is "
                        f"used): {', '.join(f'`{n}`' for n in limited)}")
        header = {k: v for k, v in timm_headers[0].items() if k not in ("command", "date", "wall_s", "commit")}
        header["n_models"] = len(timm_rows)
        lines += _source_section("timm: the smallest model of every family", timm_rows, header,
                                 "\n".join(runs + ([extra] if extra else [])))
    if hf_rows:
        lines += _source_section("HF: the project's list of small configs", hf_rows, hf_header)
    with open(args.out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
