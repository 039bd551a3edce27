#!/usr/bin/env python
"""Steps and seconds to a training-loss target on scikit-learn's digits: KFC-pre vs SGD vs Adam (issue 3).

Data: the 1797 bundled 8×8 digits (no download), standardised, float32; the whole set is the training set.
Model: conv(1→16, 3×3, pad 1) → ReLU → conv(16→32, 3×3, stride 2, pad 1) → ReLU → linear(512→10), the same
initialisation for every run. Mini-batches of ``--batch`` from one fixed shuffled order (reshuffled each epoch,
the same for every method). The target is the mean cross-entropy over all 1797 examples, evaluated every
``--eval-every`` steps (evaluation time is not counted).

1. **Tuning** (steps only, deterministic): each method runs over its learning-rate grid for at most
   ``--max-steps``; the best lr is the one reaching the target in the fewest steps.
   * SGD: momentum 0.9; Adam: default betas; KFC-pre: the paper's settings (momentum 0.9, damping 1e-3,
     clip 0.3, ν on 1/4 of the batch, MC Fisher) with ``stats_every=1, inverse_every=20``; and KFC-pre without
     momentum (μ = 0) as a second row.
2. **Timing**: the best configuration of every method is re-run *in lockstep* (one step of each method per
   round, each step timed on its own) so that all of them see the same machine load; seconds to target are the
   sums of their step times up to the target step, in wall-clock time and in process CPU time (the latter is
   what to compare on a shared machine: other processes' load inflates wall time, not CPU time).
3. **Per-step time ratio** KFC/SGD at ``stats_every=1, inverse_every=20``: from the same lockstep run, total
   KFC-pre step time / total SGD step time over steps 4 … 3 + ``--ratio-steps`` (a multiple of 20, so each
   window holds the same share of inverse steps; steps 1–3 always invert).

    .venv/bin/python bench/digits_time_to_target.py            # ~10 min on 2 loaded cores
    .venv/bin/python bench/digits_time_to_target.py --quick    # smaller grids
    .venv/bin/python bench/digits_time_to_target.py --profile --threads 1   # CPU time of a KFC step by phase
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import kfc_compile as kc  # noqa: E402


def load_digits_tensors():
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    X = (X - X.mean()) / X.std()
    return X, torch.tensor(d.target)


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4 * 4, 10))


METHODS = {
    "SGD (μ=0.9)": (lambda m, lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9),
                    [0.01, 0.03, 0.1, 0.3, 1.0]),
    "Adam": (lambda m, lr: torch.optim.Adam(m.parameters(), lr=lr), [1e-3, 3e-3, 1e-2, 3e-2]),
    "KFC-pre (μ=0.9)": (lambda m, lr: kc.KFC(m, lr=lr, momentum=0.9, stats_every=1, inverse_every=20),
                        [3e-4, 1e-3, 2e-3, 5e-3]),
    "KFC-pre (μ=0)": (lambda m, lr: kc.KFC(m, lr=lr, momentum=0.0, stats_every=1, inverse_every=20),
                      [0.01, 0.03, 0.1, 0.3]),
}
QUICK = {"SGD (μ=0.9)": [0.1, 0.3], "Adam": [3e-3, 1e-2], "KFC-pre (μ=0.9)": [1e-3, 2e-3],
         "KFC-pre (μ=0)": [0.03, 0.1]}


class Run:
    """One method's training run, advanced one step at a time."""

    def __init__(self, name: str, lr: float, data, batch: int, seed: int = 1):
        self.name, self.lr = name, lr
        self.X, self.Y = data
        self.model = make_net()
        self.opt = METHODS[name][0](self.model, lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.batch = batch
        self.perm, self.pos = torch.randperm(len(self.X), generator=self.gen), 0
        self.k = 0
        self.times: list[float] = []  # wall seconds per step
        self.cpu: list[float] = []  # process CPU seconds per step (robust to other processes' load)
        self.diverged = False

    def step(self) -> None:
        if self.pos + self.batch > len(self.X):
            self.perm, self.pos = torch.randperm(len(self.X), generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        x, y = self.X[idx], self.Y[idx]
        t0, c0 = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        if not torch.isfinite(loss) or loss.item() > 50:
            self.diverged = True
            return
        loss.backward()
        try:
            self.opt.step()
        except RuntimeError:  # e.g. non-finite probabilities in the MC sampling after a blow-up
            self.diverged = True
            return
        self.times.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)
        self.k += 1

    def train_loss(self) -> float:
        with torch.no_grad():
            return F.cross_entropy(self.model(self.X), self.Y).item()


def steps_to_target(name, lr, data, args) -> int | None:
    run = Run(name, lr, data, args.batch)
    while run.k < args.max_steps:
        run.step()
        if run.diverged:
            return None
        if run.k % args.eval_every == 0:
            loss = run.train_loss()
            if not math.isfinite(loss):
                return None
            if loss < args.target:
                return run.k
    return None


PHASES = (  # (object: the optimizer or its curvature estimator, method, label)
    ("est", "_fisher_pass", "MC Fisher backward (Γ only)"), ("est", "_collect", "moving averages"),
    ("est", "refresh_inverses", "inverses (amortised)"), ("est", "precondition", "preconditioning Γ⁻¹GΩ⁻¹"),
    ("opt", "_exact_gram", "ν: exact Fisher-vector product (JVP)"))


def profile(data, steps: int = 40) -> None:
    """CPU time per step of KFC-pre (lr 0.1, μ=0) by phase, next to SGD's whole step (same batch every step)."""
    X, Y = data
    x, y = X[:128], Y[:128]
    model = make_net()
    opt = kc.KFC(model, lr=0.1, momentum=0.0, stats_every=1, inverse_every=20)
    acc: dict[str, float] = {}
    objs = {"opt": opt, "est": opt._estimator}
    for owner, name, _ in PHASES:
        obj = objs[owner]
        fn = getattr(obj, name)

        def timed(*a, _fn=fn, _name=name, **k):
            c0 = time.process_time()
            try:
                return _fn(*a, **k)
            finally:
                acc[_name] = acc.get(_name, 0.0) + time.process_time() - c0
        setattr(obj, name, timed)
    sgd_model = make_net()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.1, momentum=0.9)
    parts = {"forward": 0.0, "backward (incl. Ω/Γ capture and the MC backward)": 0.0, "opt.step()": 0.0}
    sgd_total = 0.0
    for k in range(3 + steps):
        if k == 3:
            acc.clear()
            parts = dict.fromkeys(parts, 0.0)
            sgd_total = 0.0
        c0 = time.process_time()
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        c1 = time.process_time()
        loss.backward()
        c2 = time.process_time()
        opt.step()
        c3 = time.process_time()
        for key, v in zip(parts, (c1 - c0, c2 - c1, c3 - c2), strict=True):
            parts[key] += v
        c0 = time.process_time()
        sgd.zero_grad()
        F.cross_entropy(sgd_model(x), y).backward()
        sgd.step()
        sgd_total += time.process_time() - c0
    total = sum(parts.values())
    print(f"\nCPU ms per step over {steps} steps ({torch.get_num_threads()} threads): "
          f"KFC-pre {1e3 * total / steps:.2f}, SGD {1e3 * sgd_total / steps:.2f}, ratio {total / sgd_total:.2f}")
    print("| part of a KFC-pre step | CPU ms/step |\n|---|---:|")
    for key, v in parts.items():
        print(f"| {key} | {1e3 * v / steps:.2f} |")
    for _, name, label in PHASES:
        print(f"| ↳ {label} | {1e3 * acc.get(name, 0.0) / steps:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", type=float, default=0.05, help="training-set cross-entropy to reach")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--ratio-steps", type=int, default=60, help="steps after warm-up for the time ratio (×20)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="two learning rates per method")
    ap.add_argument("--profile", action="store_true", help="only the CPU-time breakdown of a KFC-pre step")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    data = load_digits_tensors()
    if args.profile:
        profile(data)
        return

    print(f"# digits time-to-target: target train CE < {args.target}, batch {args.batch}, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads")
    best: dict[str, tuple[float, int]] = {}
    for name, (_, grid) in METHODS.items():
        grid = QUICK[name] if args.quick else grid
        results = []
        for lr in grid:
            k = steps_to_target(name, lr, data, args)
            results.append((lr, k))
            print(f"tune  {name:16s} lr={lr:<7g} steps={k if k is not None else f'>{args.max_steps} / diverged'}",
                  flush=True)
        ok = [(k, lr) for lr, k in results if k is not None]
        if ok:
            k, lr = min(ok)
            best[name] = (lr, k)

    # lockstep timing of the best configurations
    runs = {name: Run(name, lr, data, args.batch) for name, (lr, _) in best.items()}
    if "SGD (μ=0.9)" not in runs or "KFC-pre (μ=0.9)" not in runs:  # the ratio needs both
        for name, grid_lr in (("SGD (μ=0.9)", 0.1), ("KFC-pre (μ=0.9)", 1e-3)):
            runs.setdefault(name, Run(name, grid_lr, data, args.batch))
    need = {name: max(best.get(name, (0, 0))[1], 3 + args.ratio_steps) for name in runs}
    while any(r.k < need[n] and not r.diverged for n, r in runs.items()):
        for n, r in runs.items():
            if r.k < need[n] and not r.diverged:
                r.step()

    print()
    print(f"| method | tuned lr (grid) | steps to CE < {args.target} | wall s to target | CPU s to target | "
          "CPU ms/step |")
    print("|---|---|---|---|---|---|")
    for name, (_, grid) in METHODS.items():
        grid = QUICK[name] if args.quick else grid
        g = "{" + ", ".join(f"{v:g}" for v in grid) + "}"
        if name not in best:
            print(f"| {name} | none reached ({g}) | > {args.max_steps} | – | – | – |")
            continue
        lr, k = best[name]
        r = runs[name]
        secs, cpu = sum(r.times[:k]), sum(r.cpu[:k])
        print(f"| {name} | {lr:g} {g} | {k} | {secs:.2f} | {cpu:.2f} | {1e3 * cpu / k:.1f} |")
    kfc, sgd = runs["KFC-pre (μ=0.9)"], runs["SGD (μ=0.9)"]
    window = slice(3, 3 + args.ratio_steps)
    n = args.ratio_steps
    print()
    for label, a, b in (("wall", kfc.times, sgd.times), ("CPU", kfc.cpu, sgd.cpu)):
        tk, ts = sum(a[window]), sum(b[window])
        print(f"per-step {label} time KFC-pre/SGD at stats_every=1, inverse_every=20 (steps 4–{3 + n}, lockstep): "
              f"{tk / ts:.2f}  (KFC {1e3 * tk / n:.1f} ms, SGD {1e3 * ts / n:.1f} ms)")


if __name__ == "__main__":
    main()
