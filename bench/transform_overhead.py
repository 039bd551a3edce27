#!/usr/bin/env python
"""Overhead of ``kc.transform``: forward+backward time of the transformed model vs the original.

Three variants share the parameters and the batch, and are timed round-robin in one process (the order rotates
every repetition, so drift and thermal effects hit all of them alike):

* ``original``: ``loss_fn(model(x), y).backward()``;
* ``capture off``: the same step on ``kc.transform(model)`` (taps present, not armed: the normal training step);
* ``capture on``: the taps armed as ``kc.curvature`` arms them, the training backward recording Ω (from the
  inputs) and Γ (from the loss gradients, i.e. empirical Γ) for every layer, then ``take`` — a statistics step
  without the extra Fisher backward, for information.

Reported: the median step time of each variant and the median over repetitions of the per-repetition ratio to
the original. Models (train mode, CrossEntropyLoss): torchvision resnet18 (10 classes), batch 32 at 32x32; and
the KFC paper's CIFAR-10 net (cuda-convnet "18pct": conv5x5 32 pad2, relu, maxpool 3/2, conv5x5 32 pad2, relu,
avgpool 3/2, conv5x5 64 pad2, relu, avgpool 3/2, linear 10; pools with ceil_mode so 32 -> 16 -> 8 -> 4), batch 128.

    .venv/bin/python bench/transform_overhead.py                     # CPU, prints a markdown table
    .venv/bin/python bench/transform_overhead.py --device cuda --reps 200
    .venv/bin/python bench/transform_overhead.py --json out/o.json   # also save the numbers
    .venv/bin/python bench/transform_overhead.py --doc docs/benchmarks.md out/cpu.json out/cuda.json
        # rewrite the "## Transform overhead" section of docs/benchmarks.md from saved runs (no timing)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import torch
import torchvision
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import kfc_compile as kc  # noqa: E402
from kfc_compile.tools.zoo import cpu_name  # noqa: E402

VARIANTS = ("original", "capture off", "capture on")
SECTION = "## Transform overhead"


def cifar_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
    )


CASES = {
    "resnet18": (lambda: torchvision.models.resnet18(weights=None, num_classes=10), 32),
    "cifar10-18pct": (cifar_net, 128),
}


def make_step(model, tm, x, y, device):
    loss_fn = nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    state = tm.kfc.state
    n = x.shape[0]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(variant: str) -> float:
        for p in params:
            p.grad = None
        sync()
        t0 = time.perf_counter()
        if variant == "capture on":
            with state.armed_forward():
                loss = loss_fn(tm(x), y)
            with state.backward_pass(inputs=True, grads=True, grad_scale=float(n)):  # batch-mean loss
                loss.backward()
            factors = state.take(n)
            assert len(factors) == len(tm.kfc.layers)
        else:
            loss_fn((model if variant == "original" else tm)(x), y).backward()
        sync()
        return time.perf_counter() - t0

    return step


def bench_case(name: str, reps: int, warmup: int, device: torch.device) -> dict:
    build, batch = CASES[name]
    torch.manual_seed(0)
    model = build().to(device).train()
    tm = kc.transform(model)
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    step = make_step(model, tm, x, y, device)
    for _ in range(warmup):
        for v in VARIANTS:
            step(v)
    times = {v: [] for v in VARIANTS}
    for r in range(reps):
        order = VARIANTS[r % 3:] + VARIANTS[: r % 3]
        for v in order:
            times[v].append(step(v))
    med = {v: statistics.median(t) for v, t in times.items()}
    ratio = {v: statistics.median(a / b for a, b in zip(times[v], times["original"], strict=True))
             for v in VARIANTS[1:]}
    return {"model": name, "batch": batch, "layers": len(tm.kfc.layers), "reps": reps,
            "median_ms": {v: 1000 * t for v, t in med.items()}, "ratio": ratio}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def table(run: dict) -> list[str]:
    lines = [f"**{run['device']}** ({run['machine']}; {run['date']}; `{run['command']}`)", ""]
    if run.get("note"):
        lines += [f"Note: {run['note']}.", ""]
    lines += ["| model | batch | KFC layers | original ms | capture off ms | capture on ms | "
              "capture off / original | capture on / original |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in run["results"]:
        ms = r["median_ms"]
        lines.append(f"| {r['model']} | {r['batch']} | {r['layers']} | {ms['original']:.1f} | "
                     f"{ms['capture off']:.1f} | {ms['capture on']:.1f} | {r['ratio']['capture off']:.3f} | "
                     f"{r['ratio']['capture on']:.3f} |")
    return lines


def write_doc(path: str, runs: list[dict]) -> None:
    body = [SECTION, "",
            "Forward + backward of one training step (train mode, `CrossEntropyLoss`, fresh `.grad`), the original "
            "model vs `kc.transform(model)` with capture off (taps present, not armed: every ordinary step) and with "
            "capture on (taps armed as `kc.curvature` arms them; the training backward records Ω and empirical Γ for "
            "every layer, then `take()`; for information). The three variants are timed round-robin in one process "
            "with a rotating order; times are medians over the repetitions and ratios are medians of per-repetition "
            "ratios. Produced by `bench/transform_overhead.py` (see its docstring for the models).", ""]
    for run in runs:
        body += table(run) + [""]
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    start = text.find(SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + "\n".join(body)
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        text = text[:start] + "\n".join(body) + ("\n" + text[nxt + 1:] if nxt >= 0 else "")
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=list(CASES))
    ap.add_argument("--json", help="save the run here")
    ap.add_argument("--doc", nargs="+", metavar=("MARKDOWN", "JSON"),
                    help="rewrite the overhead section of MARKDOWN from saved JSON runs, then exit")
    args = ap.parse_args(argv)
    if args.doc:
        runs = []
        for p in args.doc[1:]:
            with open(p) as f:
                runs.append(json.load(f))
        write_doc(args.doc[0], runs)
        return 0
    device = torch.device(args.device)
    run = {"device": device.type, "machine": machine(device), "date": datetime.date.today().isoformat(),
           "command": "python bench/transform_overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "results": []}
    load_start = os.getloadavg()
    for name in args.models:
        res = bench_case(name, args.reps, args.warmup, device)
        run["results"].append(res)
        print(f"{name}: {res['median_ms']} ratios {res['ratio']}", file=sys.stderr)
    if device.type == "cpu":  # a busy machine inflates absolute times; the interleaved ratios hold up better
        run["note"] = (f"load average (1 min) {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, "
                       f"on {os.cpu_count()} cores")
    print("\n".join(table(run)))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(run, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
