#!/usr/bin/env python
"""Time to a target training loss: KFC (its defaults) against tuned SGD with momentum and Adam, over seeds (issue 17).

Tasks (``--tasks``): ``digits`` (2-D conv net, batch 128, the demo), ``mnist1d`` and ``mnist1d_b1024`` (1-D conv net
at batch 128 and 1024) and ``autoencoder`` (8-layer tanh autoencoder with an 8-unit code on MNIST-1D's 40-d signals,
MSE); all data generated or bundled locally. For each task and optimizer, every learning rate of its grid is run
with every seed (same initialisation and batch order across optimizers for a seed), each run stopping at the first
evaluation of the training loss (on the whole training set, every ``eval_every`` steps, off the clock) that is ≤ the
target. The learning rate is picked by (seeds that missed the target, mean steps to target). The picked
configurations are then run again per seed *in lockstep* (``eval_every`` steps of each optimizer in turn, so that
all see the same machine load on a shared CPU) and the table gives their steps and seconds to target as mean ±
standard deviation and [min, max] over the seeds, and the test accuracy at the target. Ratios compare KFC with the
best baseline (lowest mean) separately for steps and for seconds. Seconds are process CPU time on one thread
(``time.process_time``) of the optimizer's construction (KFC instruments the model) and the training steps;
evaluation is off the clock. KFC runs ``kc.KFC``'s defaults with the demo's periods (``KFC_OPTIONS``) and only
``lr`` from its documented grid (``GRIDS["kfc"]``).

    .venv/bin/python bench/time_to_target.py                                  # all tasks, 3 seeds
    .venv/bin/python bench/time_to_target.py --quick                          # seed 0, the demo's small grids
    .venv/bin/python bench/time_to_target.py --tasks mnist1d --seeds 0 --json out/ttt.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import warnings

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from kfc_compile.tools.demo import load_task, train_lockstep, train_run  # noqa: E402
from kfc_compile.tools.demo.plot import COLORS  # noqa: E402
from kfc_compile.tools.demo.train import GRIDS as DEMO_GRIDS  # noqa: E402
from kfc_compile.tools.demo.train import KFC_OPTIONS, LABELS, OPTIMIZERS  # noqa: E402

# bench task: (demo task, model, budget in steps, batch size, target training loss, eval_every)
SETTINGS = {"digits": ("digits", "convnet", 300, 128, 1e-3, 5),
            "mnist1d": ("mnist1d", "convnet", 800, 128, 0.1, 10),
            "mnist1d_b1024": ("mnist1d", "convnet", 400, 1024, 0.1, 5),
            "autoencoder": ("mnist1d_ae", "autoencoder", 2000, 128, 0.3, 20)}
GRIDS = {"kfc": DEMO_GRIDS["kfc"], "sgd": (1.0, 0.3, 0.1, 0.03), "adam": (0.03, 0.01, 0.003, 0.001)}


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(",") if v)


def summarize(runs) -> dict:
    st = [r.steps_to_target for r in runs if r.steps_to_target is not None]
    se = [r.seconds_to_target for r in runs if r.seconds_to_target is not None]
    acc = [r.test_acc for r in runs if r.steps_to_target is not None and r.test_acc is not None]
    f = lambda v: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,  # noqa: E731
                   "min": min(v), "max": max(v)} if v else None
    return {"missed": len(runs) - len(st), "steps": f(st), "seconds": f(se), "test_acc": f(acc)}


def pick(by_lr: dict) -> float:
    def key(lr):
        s = summarize(by_lr[lr])
        return (s["missed"], s["steps"]["mean"] if s["steps"] else math.inf, -lr)

    return min(by_lr, key=key)


def fmt_stat(s, spec: str) -> str:
    if s is None:
        return "-"
    return f"{s['mean']:{spec}} ± {s['std']:{spec}} [{s['min']:{spec}}, {s['max']:{spec}}]"


def table(rows, head) -> str:
    w = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w[j]) for j, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [fmt(r) for r in rows])


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    tasks = list(results)
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 4 * len(tasks)), squeeze=False)
    for row, task in zip(axes, tasks, strict=True):
        res = results[task]
        for o, d in res["optimizers"].items():
            for i, r in enumerate(d["best_runs"]):
                lab = f"{LABELS[o]} (lr {d['lr']:g})" if i == 0 else None
                row[0].plot(r["steps"], r["train_loss"], color=COLORS.get(o), lw=1.2, alpha=0.8, label=lab)
                row[1].plot(r["seconds"], r["train_loss"], color=COLORS.get(o), lw=1.2, alpha=0.8, label=lab)
        for ax, xl in zip(row, ("steps", "CPU seconds (training only, 1 thread)"), strict=True):
            ax.axhline(res["target"], color="k", ls="--", lw=0.8)
            ax.set_yscale("log"), ax.set_xlabel(xl), ax.set_ylabel("training loss")
            ax.grid(True, which="both", alpha=0.3)
            ax.set_title(f"{task}: to training loss {res['target']:g}, {len(res['seeds'])} seeds")
        row[0].legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", default=",".join(SETTINGS))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--quick", action="store_true", help="seed 0 and the demo's smaller lr grids (a smoke run)")
    p.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    for o in OPTIMIZERS:
        p.add_argument(f"--lr-{o}", type=_floats, default=GRIDS[o], help=f"default {GRIDS[o]}")
    p.add_argument("--steps", type=int, help="override the step budget of every task")
    p.add_argument("--batch-size", type=int, help="override the batch size of every task")
    p.add_argument("--target", type=float, help="override the target of every task")
    p.add_argument("--stats-every", type=int, help=f"KFC (default {KFC_OPTIONS['stats_every']}, as the demo)")
    p.add_argument("--inverse-every", type=int, help=f"KFC (default {KFC_OPTIONS['inverse_every']}, as the demo)")
    p.add_argument("--kfc-momentum", type=float)
    p.add_argument("--kfc-options", type=json.loads, default={}, help="JSON: more kc.KFC options (a variant)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: these nets are tiny)")
    p.add_argument("--out", default="out/time_to_target.png")
    p.add_argument("--json", help="also write every run here")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-lockstep", action="store_true",
                   help="report the grid runs of the picked lr (CPU time does not need the lockstep re-run)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    tasks = [t for t in a.tasks.split(",") if t]
    seeds = [0] if a.quick else [int(s) for s in a.seeds.split(",") if s]
    opts = [o for o in a.optimizers.split(",") if o]
    for t in tasks:
        if t not in SETTINGS:
            p.error(f"unknown task {t!r}: expected a subset of {','.join(SETTINGS)}")
    for o in opts:
        if o not in OPTIMIZERS:
            p.error(f"unknown optimizer {o!r}")
    kfc_options = {**KFC_OPTIONS, **{k: v for k, v in (("stats_every", a.stats_every),
                                                       ("inverse_every", a.inverse_every),
                                                       ("momentum", a.kfc_momentum)) if v is not None},
                   **a.kfc_options}
    grids = {o: (DEMO_GRIDS[o] if a.quick and getattr(a, f"lr_{o}") == GRIDS[o] else getattr(a, f"lr_{o}"))
             for o in opts}

    print(f"# time_to_target: {datetime.datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}; KFC: kc.KFC defaults + {kfc_options or '{}'}", flush=True)
    results: dict = {}
    plan = []
    for t in tasks:
        task, model, steps, bs, target, ev = SETTINGS[t]
        steps, bs, target = a.steps or steps, a.batch_size or bs, a.target or target
        results[t] = {"task": task, "model": model, "steps": steps, "batch_size": bs, "target": target,
                      "eval_every": ev, "seeds": seeds, "optimizers": {}}
        # seeds outermost and optimizers interleaved, so a change of machine load hits every optimizer alike
        plan += [(t, o, lr, s) for s in seeds for o in opts for lr in grids[o]]
    runs: dict = {}
    with tqdm(plan, desc="time to target", unit="run", disable=a.no_progress, dynamic_ncols=True) as bar:
        for t, o, lr, s in bar:
            bar.set_postfix_str(f"{t} {o} lr={lr:g} seed={s}")
            r = results[t]
            ds = load_task(r["task"])
            runs[(t, o, lr, s)] = train_run(ds, r["model"], o, lr, steps=r["steps"], batch_size=r["batch_size"],
                                            target=r["target"], eval_every=r["eval_every"], seed=s,
                                            stop_at_target=True, kfc_options=kfc_options)
    # timing: the picked learning rates again, all optimizers in lockstep (eval_every steps of each in turn) so
    # that they see the same machine load; steps are the same as in the grid runs (each run has its own RNGs)
    picked = {t: {o: pick({lr: [runs[(t, o, lr, s)] for s in seeds] for lr in grids[o]}) for o in opts}
              for t in tasks}
    timed: dict = {}
    if a.no_lockstep:
        timed = {(t, o, s): runs[(t, o, picked[t][o], s)] for t in tasks for o in opts for s in seeds}
    with tqdm([] if a.no_lockstep else [(t, s) for t in tasks for s in seeds], desc="lockstep timing", unit="seed",
              disable=a.no_progress, dynamic_ncols=True) as bar:
        for t, s in bar:
            r = results[t]
            specs = list(picked[t].items())
            out = train_lockstep(load_task(r["task"]), r["model"], specs, steps=r["steps"], batch_size=r["batch_size"],
                                 target=r["target"], eval_every=r["eval_every"], seed=s, stop_at_target=True,
                                 kfc_options=kfc_options)
            for (o, _), run in zip(specs, out, strict=True):
                timed[(t, o, s)] = run
    for t in tasks:
        res = results[t]
        rows = []
        for o in opts:
            by_lr = {lr: [runs[(t, o, lr, s)] for s in seeds] for lr in grids[o]}
            lr = picked[t][o]
            summ = {lr_: summarize(rs) for lr_, rs in by_lr.items()}
            best = [timed[(t, o, s)] for s in seeds]
            mismatch = [(g.seed, g.steps_to_target, b.steps_to_target) for g, b in zip(by_lr[lr], best, strict=True)
                        if g.steps_to_target != b.steps_to_target]
            if mismatch:
                print(f"  note: {t} {o}: lockstep steps differ from the grid run (seed, grid, lockstep): {mismatch}")
            sm = summarize(best)
            ms = [1000 * b.seconds[-1] / b.steps[-1] for b in best if b.steps[-1]]
            sm["ms_per_step"] = statistics.fmean(ms) if ms else None
            res["optimizers"][o] = {
                "lr": lr, "summary": sm, "grid": {str(k): v for k, v in summ.items()},
                "best_runs": [{"seed": r.seed, "steps": r.steps, "seconds": r.seconds, "train_loss": r.train_loss,
                               "diverged": r.diverged} for r in best]}
            diverged = sum(r.diverged for rs in by_lr.values() for r in rs)
            rows.append([LABELS[o], f"{lr:g}", f"{len(seeds) - sm['missed']}/{len(seeds)}",
                         fmt_stat(sm["steps"], ".0f"), fmt_stat(sm["seconds"], ".2f"),
                         "-" if sm["ms_per_step"] is None else f"{sm['ms_per_step']:.1f}",
                         f"{diverged}/{sum(len(rs) for rs in by_lr.values())}",
                         fmt_stat(None if sm["test_acc"] is None else {k: 100 * v for k, v in sm["test_acc"].items()},
                                  ".1f")])
        print(f"\n{t}: {res['model']} on {res['task']}, batch {res['batch_size']}, target training loss "
              f"{res['target']:g}, budget {res['steps']} steps, seeds {seeds}\n")
        print(table(rows, ["optimizer", "lr", "reached", "steps to target", "CPU s to target", "CPU ms/step",
                           "diverged (grid runs)", "test acc at target %"]))
        for lr_o in opts:
            line = ", ".join(f"{k}: " + ("-" if v["steps"] is None else f"{v['steps']['mean']:.0f} steps") +
                             (f" ({v['missed']} missed)" if v["missed"] else "")
                             for k, v in res["optimizers"][lr_o]["grid"].items())
            print(f"  grid {LABELS[lr_o]}: {line}")
        k = res["optimizers"].get("kfc")
        base = {o: d for o, d in res["optimizers"].items() if o != "kfc" and d["summary"]["steps"]}
        if k and k["summary"]["steps"] and base:
            ratios = {}
            for what in ("steps", "seconds"):
                best = min(base, key=lambda o: base[o]["summary"][what]["mean"])
                ratios[what] = (base[best]["summary"][what]["mean"] / k["summary"][what]["mean"], best)
            res["ratios"] = {w: v[0] for w, v in ratios.items()}
            print(f"\n  KFC vs the best baseline: {ratios['steps'][0]:.2f}x fewer steps (vs "
                  f"{LABELS[ratios['steps'][1]]}), {ratios['seconds'][0]:.2f}x less time (vs "
                  f"{LABELS[ratios['seconds'][1]]})")
    if a.out:
        plot(results, a.out)
        print(f"\nwrote {a.out}")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump({"kfc_options": kfc_options, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
