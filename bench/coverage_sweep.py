#!/usr/bin/env python
"""Coverage sweep: ``kc.transform`` on every torchvision classification model.

For each model of ``torchvision.models.list_models(module=torchvision.models)`` (``weights=None``, eval mode,
float32, ``torch.no_grad``): find the smallest resolution the original model accepts, transform it, and compare
the outputs of the original and the transformed model on the same random input. A model counts as handled when
the transform succeeds and ``max |out_tm - out| <= 1e-5 * max(1, max |out|)`` (most are bitwise equal).
Records the number of KFC layers, the share of parameter elements covered, the number of black boxes and the
transform time; one JSON line per model goes to ``--jsonl`` as soon as it is done (so an interrupted run keeps
its results), and the markdown table to ``--out``.

With ``--detail`` each record also has the share of conv/linear parameter elements under KFC (``kc.transform``,
and under ``torch.compile(model, backend="kfc")`` after one forward: ``kfc_compile.tools.zoo.detail``) and the
weights tied to embeddings; ``bench/coverage_doc.py`` puts these records into docs/coverage.md.

    .venv/bin/python bench/coverage_sweep.py                      # all 80 models, writes out/coverage.md
    .venv/bin/python bench/coverage_sweep.py --models resnet18 vit_b_16 --out /tmp/c.md
    .venv/bin/python bench/coverage_sweep.py --render-only        # rebuild the table from the JSON lines
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
import warnings

import torch
import torchvision
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import kfc_compile as kc  # noqa: E402

# Model construction, input sizes and the main output are shared with ``kfc-compile zoo`` (kfc_compile/tools/zoo/).
from kfc_compile.frontend.dynamo.backend import registry_for  # noqa: E402
from kfc_compile.tools.zoo import build, first_output, linear_share, resolutions  # noqa: E402
from kfc_compile.tools.zoo import machine as zoo_machine  # noqa: E402
from kfc_compile.tools.zoo.detail import COMPILED_INNER  # noqa: E402

BATCH = 2
RTOL = 1e-5


def _reason(reason: str) -> str:
    return re.sub(r" '[^']*'", "", reason).split(" (only")[0]


def _detail(rec: dict, model, tm, x) -> None:
    """The conv/linear share eager (``tm``) and compiled (``model`` under the kfc backend, one forward of ``x``)."""
    share = linear_share(model, tm.kfc, _reason)
    rec.update(linear_coverage=share["linear_coverage"], tied=share["tied"],
               linear_uncovered={k: v["count"] for k, v in share["linear_uncovered"].items()})
    try:
        cm = torch.compile(model, backend="kfc", options={"inner": COMPILED_INNER})
        info = registry_for(cm)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm(x)
        comp = linear_share(model, info, _reason)
        rec.update(compiled_coverage=info.coverage, compiled_linear_coverage=comp["linear_coverage"],
                   compiled_linear_uncovered={k: v["count"] for k, v in comp["linear_uncovered"].items()})
    except Exception as e:  # noqa: BLE001 - recorded
        rec["compiled_error"] = f"{type(e).__name__}: {e}"[:300]
    finally:
        torch._dynamo.reset()


def sweep_one(name: str, detail: bool = False) -> dict:
    rec: dict = {"model": name}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    try:
        model = build(name).eval()
    except Exception as e:  # noqa: BLE001 - record and move on
        rec.update(status="build failed", error=f"{type(e).__name__}: {e}"[:300])
        return rec
    rec["params"] = sum(p.numel() for p in model.parameters())
    x = out = None
    with torch.no_grad():
        for res in resolutions(name):
            x = torch.randn(BATCH, 3, res, res, generator=torch.Generator().manual_seed(1))
            try:
                out = first_output(model(x))
                rec["res"] = res
                break
            except Exception as e:  # noqa: BLE001 - try the next resolution
                rec["error"] = f"original model at {res}: {type(e).__name__}: {e}"[:300]
    if out is None:
        rec["status"] = "no resolution"
        return rec
    rec.pop("error", None)
    try:
        t1 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tm = kc.transform(model)
        rec["transform_s"] = time.perf_counter() - t1
        info = tm.kfc
        rec.update(layers=len(info.layers), coverage=info.coverage, black_boxes=len(info.black_boxes),
                   black_box_names=[b.name for b in info.black_boxes], uncovered=len(info.uncovered))
        by_reason: dict[str, int] = {}
        for u in info.uncovered:  # group reasons without the parameter's own name
            key = re.sub(r" '[^']*'", "", u.reason).split(" (only")[0]
            by_reason[key] = by_reason.get(key, 0) + math.prod(u.shape)
        if by_reason and info.total_numel:
            key = max(by_reason, key=by_reason.get)
            rec["top_uncovered"] = [key, by_reason[key] / info.total_numel]
        with torch.no_grad():
            out_tm = first_output(tm(x))
        diff = (out_tm - out).abs().max().item()
        scale = max(1.0, out.abs().max().item())
        rec.update(max_abs_diff=diff, exact=bool(torch.equal(out_tm, out)))
        rec["status"] = "ok" if diff <= RTOL * scale else "outputs differ"
        if detail:
            _detail(rec, model, tm, x)
    except Exception as e:  # noqa: BLE001 - a failed transform is a result, not a crash
        rec.update(status="transform failed", error=f"{type(e).__name__}: {e}"[:300],
                   trace=traceback.format_exc(limit=-3))
    rec["total_s"] = time.perf_counter() - t0
    return rec


def machine() -> str:
    return f"{zoo_machine()}, torchvision {torchvision.__version__}"


def commit() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "kfc_compile"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
        return head + (" (kfc_compile/ modified)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def render(records: list[dict], command: str, header: dict) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    covs = [r["coverage"] for r in records if "coverage" in r]
    lines = [
        "# Coverage of torchvision classification models",
        "",
        "Produced by `bench/coverage_sweep.py`; do not edit by hand.",
        "",
        f"* command: `{command}`",
        f"* date: {header['date']}",
        f"* machine: {header['machine']}",
        f"* code: commit {header.get('commit', 'unknown')}",
        f"* models: every name in `torchvision.models.list_models(module=torchvision.models)` "
        f"({header['n_models']}), `weights=None`, eval mode, float32, batch {BATCH}, under `torch.no_grad()`",
        "* equal outputs: `max |transformed - original| <= 1e-5 * max(1, max |original|)`; "
        "column *exact* says whether they are bitwise identical",
        "* coverage: share of trainable parameter elements under KFC (`tm.kfc.coverage`); the rest "
        "(norms, embeddings, class tokens, position biases, biases passed into opaque functions, ...) goes to the "
        "fallback optimizer; attention projections count as covered (tapped inside the attention call)",
        "* seconds: `kc.transform` wall time (2 CPU cores shared with other work, so indicative only)",
        "",
        "## Totals",
        "",
        f"* models handled with equal outputs: **{len(ok)} / {len(records)}**",
    ]
    if covs:
        lines += [f"* coverage: median **{100 * statistics.median(covs):.2f}%**, min {100 * min(covs):.2f}% "
                  f"({min((r for r in records if 'coverage' in r), key=lambda r: r['coverage'])['model']}), "
                  f"max {100 * max(covs):.2f}%"]
    lines += [f"* models with black boxes: {sum(1 for r in records if r.get('black_boxes'))}", ""]
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        lines += ["Not handled:", ""] + [f"* `{r['model']}`: {r.get('status')}: {r.get('error', '')}" for r in failed]
        lines += [""]
    lines += ["## Per model", "",
              "| model | result | exact | input | params | KFC layers | coverage | largest uncovered group (share) | "
              "black boxes | max abs diff | seconds |",
              "|---|---|---|---|---:|---:|---:|---|---:|---:|---:|"]
    for r in records:
        cov = f"{100 * r['coverage']:.2f}%" if "coverage" in r else ""
        diff = f"{r['max_abs_diff']:.1e}" if "max_abs_diff" in r else ""
        res = f"{r['res']}x{r['res']}" if "res" in r else ""
        secs = f"{r['transform_s']:.2f}" if "transform_s" in r else ""
        exact = ("yes" if r.get("exact") else "no") if "exact" in r else ""
        bb = str(r.get("black_boxes", ""))
        if r.get("black_box_names"):
            names = r["black_box_names"]
            bb += " (" + ", ".join(f"`{n}`" for n in names[:3]) + (", ..." if len(names) > 3 else "") + ")"
        top = f"{r['top_uncovered'][0]} ({100 * r['top_uncovered'][1]:.2f}%)" if r.get("top_uncovered") else ""
        lines.append(f"| {r['model']} | {r.get('status')} | {exact} | {res} | {r.get('params', 0):,} | "
                     f"{r.get('layers', '')} | {cov} | {top} | {bb} | {diff} | {secs} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="subset of model names (default: all)")
    ap.add_argument("--out", default="out/coverage.md")
    ap.add_argument("--jsonl", default="out/coverage_sweep.jsonl")
    ap.add_argument("--render-only", action="store_true", help="rebuild --out from --jsonl without running")
    ap.add_argument("--detail", action="store_true",
                    help="also the conv/linear share under KFC, eager and compiled, and tied weights")
    args = ap.parse_args(argv)
    command = "python " + " ".join(sys.argv) if argv is None else "coverage_sweep " + " ".join(argv)
    names = args.models or torchvision.models.list_models(module=torchvision.models)
    header = {"date": datetime.date.today().isoformat(), "machine": machine(), "n_models": len(names),
              "commit": commit()}
    os.makedirs(os.path.dirname(args.jsonl) or ".", exist_ok=True)
    if args.render_only:
        with open(args.jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if rows and "date" in rows[0]:
            header.update(rows[0])
        records = [r for r in rows if "model" in r]
        command = rows[0].get("command", command) if rows else command
    else:
        records = []
        with open(args.jsonl, "w") as f:
            f.write(json.dumps({**header, "command": command}) + "\n")
            bar = tqdm(names, file=sys.stderr, unit="model")
            for name in bar:
                bar.set_postfix_str(name)
                rec = sweep_one(name, args.detail)
                records.append(rec)
                f.write(json.dumps({k: v for k, v in rec.items() if k != "trace"}) + "\n")
                f.flush()
                tqdm.write(f"{name}: {rec.get('status')} layers={rec.get('layers')} "
                           f"coverage={rec.get('coverage', 0):.4f} t={rec.get('total_s', 0):.1f}s "
                           f"{rec.get('error', '')}", file=sys.stderr)
                gc.collect()
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write(render(records, command, header))
    ok = sum(r.get("status") == "ok" for r in records)
    print(f"{ok}/{len(records)} models with equal outputs; table in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
