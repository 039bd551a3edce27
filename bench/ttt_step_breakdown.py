#!/usr/bin/env python
"""Where a KFC step's CPU time goes on the time-to-target tasks (issue 17): differences of configurations.

On one task's model and batches, in one process, 1 thread, process CPU time over ``--steps`` steps after 3 warm-up
steps (which take statistics and invert), each configuration timed in turns (round-robin) with the same batches:

* ``sgd``: SGD with momentum (forward, backward, update);
* ``plain``: KFC with no statistics and no inverse refresh after warm-up: forward, backward, preconditioning, the
  exact-ν forward-mode pass and the update;
* ``no-clip``: the same with ``clip=None``, so ``plain − no-clip`` is the ν pass;
* ``stats``: statistics every step, so ``stats − plain`` is a statistics step's extra (subset forward + sampled
  backward + moving averages);
* ``inverse``: inverses every step, so ``inverse − plain`` is an inverse refresh.

The defaults' average step at the demo's periods (5, 10) is then ≈ plain + (stats − plain)/5 + (inverse − plain)/10.
``--extra NAME=JSON`` adds a configuration (``kc.KFC`` options on top of ``stats``' own, e.g. a larger statistics
subset: ``--extra 'subset 32={"stats_fraction": 0.25}'``), timed in the same turns and printed against ``stats``.
``--before`` also times every KFC configuration with ``overhead_baseline.PATCHES`` (the per-call overheads before
issue 17's dispatch work), in the same round-robin, and prints both columns.

    .venv/bin/python bench/ttt_step_breakdown.py --task autoencoder
    .venv/bin/python bench/ttt_step_breakdown.py --task autoencoder --before
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # overhead_baseline
from overhead_baseline import PATCHES, applied  # noqa: E402

import kfc_compile as kc  # noqa: E402
from kfc_compile.tools.demo import build_model, load_task  # noqa: E402
from kfc_compile.tools.demo.train import task_loss  # noqa: E402

TASKS = {"digits": ("digits", "convnet", 128), "mnist1d": ("mnist1d", "convnet", 128),
         "mnist1d_b1024": ("mnist1d", "convnet", 1024), "autoencoder": ("mnist1d_ae", "autoencoder", 128)}
NEVER = 10 ** 9
CONFIGS = {"plain": {"stats_every": NEVER, "inverse_every": NEVER},
           "no-clip": {"stats_every": NEVER, "inverse_every": NEVER, "clip": None},
           "stats": {"stats_every": 1, "inverse_every": NEVER},
           "inverse": {"stats_every": NEVER, "inverse_every": 1}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", choices=TASKS, default="autoencoder")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--before", action="store_true", help="also time each KFC configuration with the per-call "
                   "overheads before issue 17's dispatch work (bench/overhead_baseline.py)")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                   help="another configuration: kc.KFC options on top of the statistics-every-step one")
    a = p.parse_args(argv)
    extra = {}
    for spec in a.extra:
        name, _, options = spec.partition("=")
        extra[f"extra:{name}"] = {**CONFIGS["stats"], **json.loads(options)}
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)
    task, model_name, bs = TASKS[a.task]
    ds = load_task(task)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(ds.y_train), (bs,), generator=gen) for _ in range(a.steps + 3)]
    runs = {}
    names = ["sgd", *CONFIGS, *extra] + ([f"before:{n}" for n in CONFIGS] if a.before else [])
    for name in names:
        torch.manual_seed(0)
        model = build_model(model_name, task, ds.input_shape, ds.num_classes)
        config = extra.get(name) or CONFIGS.get(name.removeprefix("before:"))
        opt = (torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if name == "sgd" else
               kc.KFC(model, lr=1e-3, loss=ds.loss, generator=torch.Generator().manual_seed(2), **config))
        runs[name] = [model, opt, 0.0]
    for k, idx in enumerate(batches):
        x, y = ds.prepare(ds.x_train[idx]), ds.y_train[idx]
        for name, run in runs.items():
            model, opt, _ = run
            with applied(PATCHES) if name.startswith("before:") else contextlib.nullcontext():
                t0 = time.process_time()
                task_loss(ds, model(x), y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if k >= 3:
                    run[2] += time.process_time() - t0
    ms = {n: 1000 * r[2] / a.steps for n, r in runs.items()}
    print(f"{a.task} (batch {bs}), CPU ms per step over {a.steps} steps, 1 thread:")
    for prefix in ("", "before:") if a.before else ("",):
        if prefix:
            print("before issue 17's dispatch work (bench/overhead_baseline.py):")
        m = {n: ms[prefix + n] for n in CONFIGS} | {"sgd": ms["sgd"]}
        avg = m["plain"] + (m["stats"] - m["plain"]) / 5 + (m["inverse"] - m["plain"]) / 10
        rows = [("SGD step (forward + backward + update)", m["sgd"]),
                ("KFC plain step", m["plain"]),
                ("  of which the exact-nu forward-mode pass", m["plain"] - m["no-clip"]),
                ("  of which instrumented pass, preconditioning, update, Python", m["no-clip"] - m["sgd"]),
                ("a statistics step's extra", m["stats"] - m["plain"]),
                ("an inverse refresh's extra", m["inverse"] - m["plain"]),
                ("=> average KFC step at (stats 5, inverses 10)", avg)]
        for label, v in rows:
            print(f"  {label:<62} {v:7.2f}  ({v / m['sgd']:.2f}x SGD)")
    for name in extra:
        v = ms[name]
        print(f"  {name.removeprefix('extra:') + ': statistics step':<62} {v:7.2f}  ({v / ms['sgd']:.2f}x SGD, "
              f"{v / ms['stats']:.3f}x the stats step, extra {v - ms['plain']:.2f} vs {ms['stats'] - ms['plain']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
