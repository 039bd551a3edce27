#!/usr/bin/env python
"""Where a KFC step's time goes, phase by phase, as ratios against an SGD step measured in the same run (issue 17).

Models (synthetic inputs):

* ``paper``: the KFC paper's CIFAR-10 net, batch 128, 3×32×32, cross-entropy;
* ``digits``: the demo's digits conv net (conv 1→16→32, 3×3, max-pool, linear 512→10), batch 128, 1×8×8;
* ``autoenc``: an 8-layer tanh autoencoder on 40-d signals (40-64-32-16-8-16-32-64-40, 8-unit code), batch 128,
  MSE.

Variants: ``pre`` (KFC-pre, the defaults: momentum 0.9, clip 0.3 with exact ν on 1/4 of the batch), ``pre-fact``
(the same with ``clip_curvature="factored"``: ν of v alone), ``pre-fact-step`` (the factored ν of the applied step,
``clip_on="step"``) and ``adaptive`` (``mode="adaptive"``; lr 0.5, damping 1e-2 and
min_damping 1e-3 so that random labels never diverge; ``step(closure)`` every ``lm_interval`` = 5 steps, so the
Levenberg–Marquardt rule re-evaluates the loss there). For each model, variant and
(stats_every, inverse_every) the KFC and SGD (momentum 0.9) steppers alternate windows of P = lcm(stats,
inverses) steps after 3 warm-up steps; times are process CPU time on one thread. The phases are exclusive timers
around the estimator's and the update's functions:

* user forward + backward (what SGD also does), statistics (the subset forward + sampled-target backward, the
  taps' Ω/Γ accumulation, the moving averages), inverses, ∇h matrices + preconditioning, the Fisher products
  (forward-mode JVPs for ν or α/μ), the Levenberg–Marquardt closure, the update (momentum / α·Δ+μ·δ₀ / apply),
  and the rest of ``opt.step()`` (Python, checks, bookkeeping).

    OMP_NUM_THREADS=1 .venv/bin/python bench/step_breakdown.py                       # everything (~10 min)
    OMP_NUM_THREADS=1 .venv/bin/python bench/step_breakdown.py --models autoenc,digits --variants adaptive
    OMP_NUM_THREADS=1 .venv/bin/python bench/step_breakdown.py --ab --baseline overhead   # now vs before issue 17's
                                                                                          # dispatch work
    OMP_NUM_THREADS=1 .venv/bin/python bench/step_breakdown.py --ab --baseline fixed-cost  # vs before the
                                                                                    # small-layer fixed-cost cuts
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.append(os.path.dirname(os.path.abspath(__file__)))  # overhead_baseline
from fixed_cost_baseline import PATCHES as FIXED_COST  # noqa: E402
from overhead_baseline import FVP_WALK, PER_CALL, RECORD_AUTOCAST  # noqa: E402
from overhead_baseline import PATCHES as OVERHEAD  # noqa: E402
from stats_baseline import PATCHES as STATS  # noqa: E402

import kfc_compile as kc  # noqa: E402
import kfc_compile.optim.kfc as kfc_mod  # noqa: E402
import kfc_compile.optim.updates as updates_mod  # noqa: E402
from kfc_compile.curvature.guard import finite_flags  # noqa: E402
from kfc_compile.optim import rules  # noqa: E402
from kfc_compile.tools.demo.models import conv2d_net, paper_cifar_net  # noqa: E402

WARMUP = 3


def autoencoder() -> nn.Sequential:
    widths = (40, 64, 32, 16, 8, 16, 32, 64, 40)
    layers: list[nn.Module] = []
    for j, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if j < len(widths) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


MODELS = {  # name -> (builder, input shape, batch, loss kind)
    "paper": (paper_cifar_net, (3, 32, 32), 128, "ce"),
    "digits": (lambda: conv2d_net(1, 10, (8, 8)), (1, 8, 8), 128, "ce"),
    "autoenc": (autoencoder, (40,), 128, "mse"),
}
VARIANTS = {
    "pre": dict(lr=1e-3),  # the default: the factored ν of the applied step (before 2026-12-02 08:00: the exact ν)
    "pre-exact": dict(lr=1e-3, clip_curvature="exact"),  # the exact ν of the applied step (the JVP pass)
    "pre-fact": dict(lr=1e-3, clip_curvature="factored", clip_on="update"),  # the factored ν of v alone
    "pre-fact-step": dict(lr=1e-3, clip_curvature="factored", clip_on="step"),
    "adaptive": dict(lr=0.5, damping=1e-2, min_damping=1e-3, mode="adaptive"),  # timing only: random labels
}


def batches(model: str, n: int = 4):
    _, shape, b, kind = MODELS[model]
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randn(b, *shape, generator=g)
        y = torch.tanh(x) if kind == "mse" else torch.randint(0, 10, (b,), generator=g)
        out.append((x, y))
    return out


def loss_fn(model: str):
    return F.mse_loss if MODELS[model][3] == "mse" else F.cross_entropy


class Timer:
    """Exclusive CPU time per phase (a nested timed phase is charged to the inner one only)."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.stack: list[list] = []
        self.on = False

    def wrap(self, fn, phase: str):
        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            self.stack.append([time.process_time(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                t0, child = self.stack.pop()
                dt = time.process_time() - t0
                self.total[phase] += dt - child
                if self.stack:
                    self.stack[-1][1] += dt

        return timed

    def patch(self, obj, attr: str, phase: str) -> None:
        setattr(obj, attr, self.wrap(getattr(obj, attr), phase))


def instrument(opt: kc.KFC, timer: Timer) -> None:
    est = opt._estimator
    timer.patch(est, "_statistics_pass", "statistics: subset pass")
    timer.patch(est, "_fisher_pass", "statistics: subset pass")
    timer.patch(est.capture, "record", "statistics: Ω/Γ in the taps")
    timer.patch(est, "_fold", "statistics: moving averages")
    timer.patch(est, "refresh_inverses", "inverses")
    timer.patch(est, "precondition", "preconditioning (∇h matrices, Γ⁻¹GΩ⁻¹)")
    opt._exact_gram = timer.wrap(opt._exact_gram, "Fisher products (JVPs)")
    for name in ("momentum_step_", "adaptive_step_"):
        if hasattr(updates_mod, name):
            setattr(updates_mod, name, timer.wrap(getattr(updates_mod, name), "update (momentum, apply)"))
    timer.patch(kfc_mod, "group_parts", "preconditioning (∇h matrices, Γ⁻¹GΩ⁻¹)")
    timer.patch(opt._fused, "step", "fused preconditioning + update (fused_update.py)")


#: --baseline scalars: the step's scalars term by term, one Fisher-product pass per direction and the
#: per-tensor update path (optim/fused_update.py switched off): the baseline of the issue-17 sessions
BEFORE = ((updates_mod, "quadratic_model", rules.quadratic_model), (updates_mod, "factored_nu", rules.factored_nu),
          (updates_mod, "sum_squares", rules.sum_squares),
          (kfc_mod, "all_finite_", lambda ts: finite_flags([ts])[0]))
#: what --before / --ab compare against: (patches, whether the Fisher products run one pass per direction)
BASELINES = {"scalars": (BEFORE, True),
             "overhead": (OVERHEAD, False),  # bench/overhead_baseline.py: dispatcher, finite checks, averages
             "percall": (PER_CALL, False),  # its last two items (PER_CALL), and each alone:
             "fvp-walk": (FVP_WALK, False), "record-autocast": (RECORD_AUTOCAST, False),
             "stats": (STATS, False),  # bench/stats_baseline.py: the statistics step before its cost work
             "fixed-cost": (FIXED_COST, False)}  # bench/fixed_cost_baseline.py: Fisher-product swap, guard read


class Stepper:
    def __init__(self, model, opt, data, lossf, closure: bool, timer: Timer | None = None, patches=()):
        self.model, self.opt, self.data, self.lossf, self.closure, self.timer = model, opt, data, lossf, closure, timer
        self.patches = patches
        self.i = 0
        self.fwbw = 0.0  # the user's forward + backward, less timed phases inside it (in-pass capture)
        self.step_t = 0.0  # opt.step(), less timed phases inside it
        self.lm = 0.0  # the Levenberg–Marquardt rule's closure call (the loss at θ + δ)

    def _lm_step(self, x, y):
        """``opt.step(closure)``: the closure's first call is the step's forward + backward, the second the rule's."""
        calls, losses = [], []

        def closure():
            t0 = time.process_time()
            self.opt.zero_grad(set_to_none=True)
            out = self.lossf(self.model(x), y)
            out.backward()
            dt = time.process_time() - t0
            calls.append(dt)
            losses.append(out.detach())
            if len(calls) == 1:
                self.fwbw += dt
            else:
                self.lm += dt
            return out

        t0, p0 = time.process_time(), self._timed()
        self.opt.step(closure)
        self.opt.zero_grad(set_to_none=True)
        self.step_t += (time.process_time() - t0) - (self._timed() - p0) - sum(calls)
        return losses[0]

    def _timed(self) -> float:
        return sum(self.timer.total.values()) if self.timer else 0.0

    def run(self, n: int) -> float:
        saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in self.patches]
        for obj, attr, value in self.patches:
            setattr(obj, attr, value)
        try:
            return self._run(n)
        finally:
            for obj, attr, value in saved:
                setattr(obj, attr, value)

    def _run(self, n: int) -> float:
        t = time.process_time()
        for _ in range(n):
            x, y = self.data[self.i % len(self.data)]
            self.i += 1
            if self.closure and self.opt.steps % 5 == 4:  # a Levenberg–Marquardt step: opt.step(closure)
                loss = self._lm_step(x, y)
                continue
            t0, p0 = time.process_time(), self._timed()
            loss = self.lossf(self.model(x), y)
            loss.backward()
            t1, p1 = time.process_time(), self._timed()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            t2, p2 = time.process_time(), self._timed()
            self.fwbw += (t1 - t0) - (p1 - p0)
            self.step_t += (t2 - t1) - (p2 - p1)
        if not math.isfinite(float(loss)):
            raise RuntimeError(f"non-finite loss after {self.i} steps")
        return time.process_time() - t


def measure(model_name: str, variant: str, s: int, i: int, rounds: int, options: dict, before: bool,
            baseline: str = "scalars") -> dict:
    build = MODELS[model_name][0]
    torch.manual_seed(0)
    m = build()
    km, bm = copy.deepcopy(m), copy.deepcopy(m)
    data, lossf = batches(model_name), loss_fn(model_name)
    loss = "mse" if MODELS[model_name][3] == "mse" else "cross_entropy"
    kw = dict(momentum=0.9, stats_every=s, inverse_every=i, loss=loss, **VARIANTS[variant], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kc.KFC(km, **kw)
        bopt = kc.KFC(bm, **kw)
    patches, unbatched = BASELINES[baseline]
    if unbatched:
        bopt._exact_gram.products.batched = False
        bopt._fused._off = "bench: the baseline's per-tensor path"
    old = Stepper(bm, bopt, data, lossf, variant == "adaptive", patches=patches) if before else None
    timer = Timer()
    instrument(opt, timer)
    sgd = Stepper(m, torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9), data, lossf, False)
    kfc = Stepper(km, opt, data, lossf, variant == "adaptive", timer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kfc.run(WARMUP), sgd.run(WARMUP)
        if old is not None:
            old.run(WARMUP)
        kfc.fwbw = kfc.step_t = kfc.lm = sgd.fwbw = sgd.step_t = 0.0
        P = math.lcm(s, i)
        tk = ts = tb = 0.0
        for _ in range(rounds):
            timer.on = True
            tk += kfc.run(P)
            timer.on = False
            ts += sgd.run(P)
            if old is not None:
                tb += old.run(P)
    n = rounds * P
    ms = lambda t: 1e3 * t / n  # noqa: E731
    phases = {"user forward + backward": ms(kfc.fwbw)}
    phases.update({k: ms(v) for k, v in timer.total.items()})
    if kfc.lm:
        phases["Levenberg–Marquardt closure"] = ms(kfc.lm)
    phases["rest of opt.step (Python, checks)"] = ms(kfc.step_t)
    return {"model": model_name, "variant": variant, "s": s, "i": i, "steps": n, "kfc_ms": ms(tk), "sgd_ms": ms(ts),
            "sgd_fwbw_ms": ms(sgd.fwbw), "phases": phases, "before_ms": ms(tb) if before else None}


def _count_statistics(opt: kc.KFC) -> list[float]:
    """Wrap the estimator's statistics pass (subset forward, backward, taps, averages): [CPU seconds, calls]."""
    est, acc = opt._estimator, [0.0, 0]
    inner = est._statistics_pass

    def timed():
        t0 = time.process_time()
        try:
            return inner()
        finally:
            acc[0] += time.process_time() - t0
            acc[1] += 1

    est._statistics_pass = timed
    return acc


def ab(model_name: str, variant: str, s: int, i: int, rounds: int, options: dict, baseline: str = "scalars",
       sgd: bool = False) -> dict:
    """``--ab``: this code against ``--before``'s baseline, both uninstrumented, in alternating order per window.

    Also the statistics pass's CPU time per statistics step of each (one timer around it, no phases inside), and
    with ``sgd`` an SGD (momentum 0.9) arm in the same rotation for the KFC ÷ SGD ratios.
    """
    torch.manual_seed(0)
    m = MODELS[model_name][0]()
    data, lossf = batches(model_name), loss_fn(model_name)
    loss = "mse" if MODELS[model_name][3] == "mse" else "cross_entropy"
    kw = dict(momentum=0.9, stats_every=s, inverse_every=i, loss=loss, **VARIANTS[variant], **options)
    models = [copy.deepcopy(m), copy.deepcopy(m), copy.deepcopy(m)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = [kc.KFC(mm, **kw) for mm in models[:2]]
        patches, unbatched = BASELINES[baseline]
        if unbatched:
            opts[1]._exact_gram.products.batched = False
            opts[1]._fused._off = "bench: the baseline's per-tensor path"
        stats = [_count_statistics(o) for o in opts]
        steppers = [Stepper(models[0], opts[0], data, lossf, variant == "adaptive"),
                    Stepper(models[1], opts[1], data, lossf, variant == "adaptive", patches=patches)]
        if sgd:
            steppers.append(Stepper(models[2], torch.optim.SGD(models[2].parameters(), lr=1e-3, momentum=0.9), data,
                                    lossf, False))
        for st in steppers:
            st.run(WARMUP)
        for acc in stats:
            acc[:] = [0.0, 0]
        P = math.lcm(s, i)
        t = [0.0] * len(steppers)
        for r in range(rounds):
            order = list(range(len(steppers)))
            for j in (order if r % 2 == 0 else order[::-1]):
                t[j] += steppers[j].run(P)
    n = rounds * P
    stats_ms = [1e3 * a / max(c, 1) for a, c in stats]
    return {"model": model_name, "variant": variant, "s": s, "i": i, "steps": n, "after_ms": 1e3 * t[0] / n,
            "before_ms": 1e3 * t[1] / n, "sgd_ms": 1e3 * t[2] / n if sgd else None, "after_stats_ms": stats_ms[0],
            "before_stats_ms": stats_ms[1]}


ORDER = ("user forward + backward", "statistics: subset pass", "statistics: Ω/Γ in the taps",
         "statistics: moving averages", "inverses", "preconditioning (∇h matrices, Γ⁻¹GΩ⁻¹)",
         "fused preconditioning + update (fused_update.py)", "Fisher products (JVPs)", "Levenberg–Marquardt closure",
         "update (momentum, apply)",
         "rest of opt.step (Python, checks)")


def _before(r: dict) -> str:
    b = r["before_ms"]
    return "" if b is None else f" (before: {b:.2f} ms, {b / r['sgd_ms']:.2f}x)"


def report(results: list[dict]) -> None:
    for r in results:
        sgd = r["sgd_ms"]
        print(f"\n{r['model']} {r['variant']} (stats {r['s']}, inverses {r['i']}), {r['steps']} steps: "
              f"KFC {r['kfc_ms']:.2f} ms, SGD {sgd:.2f} ms (its forward+backward {r['sgd_fwbw_ms']:.2f}) -> "
              f"KFC/SGD {r['kfc_ms'] / sgd:.2f}x" + _before(r))
        for ph in ORDER:
            if ph in r["phases"]:
                v = r["phases"][ph]
                print(f"  {ph:45s} {v:9.3f} ms  {v / sgd:6.3f} x SGD")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--configs", default="1:20,10:100")
    p.add_argument("--rounds", type=int, default=2, help="windows of P steps per optimizer")
    p.add_argument("--paper-rounds", type=int, default=1, help="windows for the paper net (slow)")
    p.add_argument("--before", action="store_true", help="also time a KFC with --baseline's older code")
    p.add_argument("--baseline", choices=BASELINES, default="scalars", help="scalars: the term-by-term scalars and "
                   "one Fisher-product pass per direction (the issue-15 step-cost table's baseline); overhead: "
                   "bench/overhead_baseline.py (dispatcher, finite checks, moving averages; issue 17); "
                   "percall: its PER_CALL alone (the Fisher products' module walks, the taps' autocast context); "
                   "fvp-walk, record-autocast: each of the two; stats: bench/stats_baseline.py (the statistics "
                   "step's symmetrisation, accumulators and moving averages before issue 17's statistics work); "
                   "fixed-cost: bench/fixed_cost_baseline.py (the Fisher products' functional_call and make_dual, "
                   "the guard's 0-d flags; issue 17 item 3)")
    p.add_argument("--ab", action="store_true", help="only this code against --before's baseline, uninstrumented, "
                   "in alternating order (no SGD, no phases)")
    p.add_argument("--sgd", action="store_true", help="with --ab: an SGD arm in the same rotation (KFC/SGD ratios)")
    p.add_argument("--kfc-options", default="{}", help="extra kc.KFC arguments as a Python dict literal")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    options = eval(a.kfc_options)  # noqa: S307 - a benchmark's command line
    results = []
    for model_name in a.models.split(","):
        for variant in a.variants.split(","):
            for cfg in a.configs.split(","):
                s, i = map(int, cfg.split(":"))
                rounds = a.paper_rounds if model_name == "paper" else a.rounds
                if a.ab:
                    r = ab(model_name, variant, s, i, rounds, options, a.baseline, a.sgd)
                    sgd = "" if r["sgd_ms"] is None else (
                        f"; SGD {r['sgd_ms']:.2f} ms, KFC/SGD now {r['after_ms'] / r['sgd_ms']:.2f}x before "
                        f"{r['before_ms'] / r['sgd_ms']:.2f}x")
                    print(f"{model_name:8s} {variant:9s} ({s}, {i}), {r['steps']} steps each: now "
                          f"{r['after_ms']:.2f} ms, before {r['before_ms']:.2f} ms, now/before "
                          f"{r['after_ms'] / r['before_ms']:.3f}; statistics pass now {r['after_stats_ms']:.2f} ms, "
                          f"before {r['before_stats_ms']:.2f} ms{sgd}", flush=True)
                    continue
                r = measure(model_name, variant, s, i, rounds, options, a.before, a.baseline)
                results.append(r)
                report([r])
                sys.stdout.flush()
    if a.ab:
        return 0
    print("\nsummary: KFC / SGD per step")
    for r in results:
        print(f"  {r['model']:8s} {r['variant']:9s} ({r['s']}, {r['i']}): {r['kfc_ms'] / r['sgd_ms']:.2f}x "
              f"(KFC {r['kfc_ms']:.2f} ms, SGD {r['sgd_ms']:.2f} ms)" + _before(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
