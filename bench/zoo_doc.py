"""Build docs/zoo.md from the ``zoo.json`` files of ``kfc-compile zoo`` runs (one per family group).

    .venv/bin/python bench/zoo_doc.py /tmp/zoo-cls/zoo.json /tmp/zoo-other/zoo.json --out docs/zoo.md \
        [--rerun /tmp/zoo-one/zoo.json]

Writes the totals of every run and of all runs together, each run's command, date, machine and wall time, and
each run's per-model table (``zoo.render``); prints the summary table for README.md's "Model zoo" section.
``--rerun`` files hold single models run again on their own (e.g. after a failure caused by the machine): each of
their rows replaces the row of the same name in the runs, and the document lists them with their command.
"""
from __future__ import annotations

import argparse
import json
import sys

from kfc_compile.tools import zoo


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


def _num(v, fmt=".3g") -> str:
    return "" if v is None else format(v, fmt)


def _family_order(family: str) -> tuple[int, str]:
    """The sort key of a family: torchvision's in their order, then any other (timm, HF) by name."""
    return (zoo.FAMILIES.index(family) if family in zoo.FAMILIES else len(zoo.FAMILIES), family)


def summary_table(groups: list[tuple[str, list[dict], dict]]) -> str:
    lines = ["| models | run | ok | partial | failed | trained (finite loss) | loss decreased | coverage median | "
             "coverage min | median KFC/SGD step time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, rows, header in groups:
        t = zoo.totals(rows)
        lines.append(f"| {label} | {len(rows)} of {header.get('n_models', len(rows))} | {t['ok']} | {t['partial']} | "
                     f"{t['failed']} | {t['trained']} | {t['loss_decreased']} | {_pct(t['coverage_median'])} | "
                     f"{_pct(t['coverage_min'])} ({t['coverage_min_model']}) | {_num(t['ratio_median'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="zoo.json files")
    ap.add_argument("--out", default="docs/zoo.md")
    ap.add_argument("--note", default="", help="a paragraph added under the title")
    ap.add_argument("--rerun", nargs="*", default=[], help="zoo.json files whose rows replace same-name rows")
    args = ap.parse_args(argv)
    reruns: dict[str, tuple[dict, dict]] = {}
    for path in args.rerun:
        with open(path) as f:
            doc = json.load(f)
        reruns.update({r["name"]: (r, doc.get("run", {})) for r in doc["models"]})
    groups = []
    for path in args.runs:
        with open(path) as f:
            doc = json.load(f)
        rows, header = [reruns.get(r["name"], (r, None))[0] for r in doc["models"]], doc.get("run", {})
        fams = sorted({r["family"] for r in rows}, key=_family_order)
        groups.append((", ".join(fams), rows, header))
    all_rows = [r for _, rows, _ in groups for r in rows]
    unknown = set(reruns) - {r["name"] for r in all_rows}
    if unknown:
        ap.error(f"--rerun models not in any run: {sorted(unknown)}")
    table = summary_table(groups + ([("all", all_rows, {"n_models": sum(h.get("n_models", len(r))
                                                                          for _, r, h in groups)})]
                                    if len(groups) > 1 else []))
    lines = ["# Model zoo: `kfc-compile zoo` over torchvision", "",
             "Produced by `kfc-compile zoo` (one run per family group below) and `bench/zoo_doc.py`; do not edit the "
             "tables by hand.", ""]
    if args.note:
        lines += [args.note, ""]
    lines += ["## Totals", "", table, "",
              "*ok*: trained with finite losses (and no black box); *partial*: the same with untraceable submodules "
              "kept as black boxes; *failed*: an error or the per-model time limit before the training steps "
              "finished (the row keeps what was measured, e.g. coverage). A model stopped by the limit during the "
              "step timing keeps its status and has no ratio. Detection models are transformed and reported only.",
              ""]
    if reruns:
        lines += ["## Re-runs", "", "These rows replace the rows of the same models in the runs below (and in the "
                  "totals):", ""]
        for name, (row, header) in reruns.items():
            lines.append(f"* `{name}`: {row['status']}, {header.get('date', '')}, `{header.get('command', '')}`")
        lines.append("")
    for label, rows, header in groups:
        body = zoo.render(rows, header).split("\n", 2)[2]  # drop render's title
        lines += [f"## Run: {label}", "", body.replace("\n## ", "\n### ")]
    with open(args.out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
