#!/usr/bin/env python
"""Seed sweeps of KFC variants on the time-to-target tasks: steps to target per lr, best and divergences (issue 17).

Each variant is a JSON object of ``kc.KFC`` options on top of the demo's (``KFC_OPTIONS``); every variant runs every
task with every lr of its grid (``"lr"`` in the variant overrides ``--lr``) and the given seeds, stopping at the
target or at the task's sweep budget. Steps are exact (the evaluation every ``--eval-every`` steps is their
resolution); this is how the evidence table of docs/benchmarks.md "Time to target (issue 17)" is made. The key
``"min_subset"`` in a variant is not a ``kc.KFC`` option: it sets the statistics / ν subsets' floor
(both ``MIN_STATS_SUBSET`` and ``MIN_CLIP_SUBSET`` of ``runtime/subsets.py``) for that variant's runs, to measure it.

    .venv/bin/python bench/ttt_sweep.py '{}' '{"damping": 1e-2}' --seeds 0
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from kfc_compile.runtime import subsets  # noqa: E402
from kfc_compile.tools.demo import load_task, train_run  # noqa: E402
from kfc_compile.tools.demo.train import GRIDS, KFC_OPTIONS  # noqa: E402

# task: (demo task, model, sweep budget in steps, batch size, target training loss)
TASKS = {"digits": ("digits", "convnet", 150, 128, 1e-3),
         "mnist1d": ("mnist1d", "convnet", 400, 128, 0.1),
         "mnist1d_b1024": ("mnist1d", "convnet", 200, 1024, 0.1),
         "autoencoder": ("mnist1d_ae", "autoencoder", 400, 128, 0.3),
         # small batches (not in --tasks' default): docs/benchmarks.md "Small batches"
         "digits_b16": ("digits", "convnet", 600, 16, 1e-2),
         "digits_b32": ("digits", "convnet", 400, 32, 1e-2),
         "digits_b64": ("digits", "convnet", 300, 64, 1e-2),
         "mnist1d_b16": ("mnist1d", "convnet", 1200, 16, 0.2),
         "mnist1d_b32": ("mnist1d", "convnet", 800, 32, 0.2)}
DEFAULT_TASKS = ("digits", "mnist1d", "mnist1d_b1024", "autoencoder")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("variants", nargs="+", type=json.loads, help="JSON objects of kc.KFC options")
    p.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"a subset of {','.join(TASKS)}")
    p.add_argument("--seeds", default="0")
    p.add_argument("--lr", default=",".join(str(v) for v in GRIDS["kfc"]))
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--optimizer", default="kfc", help="kfc (default), sgd or adam (then variants must be {})")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    tasks = [t for t in a.tasks.split(",") if t]
    seeds = [int(s) for s in a.seeds.split(",") if s]
    floors = subsets.MIN_STATS_SUBSET, subsets.MIN_CLIP_SUBSET
    for v in a.variants:
        opts = {k: x for k, x in v.items() if k not in ("lr", "min_subset")}
        subsets.MIN_STATS_SUBSET, subsets.MIN_CLIP_SUBSET = (v["min_subset"],) * 2 if "min_subset" in v else floors
        grid = v.get("lr", [float(x) for x in a.lr.split(",") if x])
        cells = []
        for t in tasks:
            task, model, budget, bs, target = TASKS[t]
            ds = load_task(task)
            per_lr, div, t0 = {}, 0, time.process_time()
            for lr in grid:
                steps = []
                for s in seeds:
                    r = train_run(ds, model, a.optimizer, lr, steps=budget, batch_size=bs, target=target,
                                  eval_every=a.eval_every, seed=s, stop_at_target=True,
                                  kfc_options={**KFC_OPTIONS, **opts}, test=False)
                    div += r.diverged
                    steps.append(r.steps_to_target)
                per_lr[lr] = steps
            ok = {lr: sum(st) / len(st) for lr, st in per_lr.items() if None not in st}
            best = min(ok, key=ok.get) if ok else None
            grid_s = " ".join(f"{lr:g}:" + ",".join("-" if x is None else str(x) for x in st)
                              for lr, st in per_lr.items())
            cells.append(f"{t}: " + (f"{ok[best]:.0f}@{best:g}" if best is not None else "miss") + f" [{grid_s}]"
                         + (f" div {div}" if div else "") + f" ({time.process_time() - t0:.0f}s)")
        print(json.dumps(v), "|", " | ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
