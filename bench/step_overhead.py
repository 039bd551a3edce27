#!/usr/bin/env python
"""KFC step time and peak memory relative to SGD with momentum (issue 7).

Models (synthetic inputs, 10 classes, cross-entropy):

* ``paper``: the KFC paper's CIFAR-10 net (``kfc_compile.tools.demo.models.paper_cifar_net``), batch 128, 3×32×32;
* ``resnet18-b32`` / ``resnet18-b128``: torchvision's resnet18 (``num_classes=10``), 32×32, batch 32 / 128.

For each (stats_every, inverse_every) in ``--configs`` (default 1:1, 1:20, 10:100) a KFC model and an SGD model
with the same initialisation train in the same process. After 3 warm-up steps each (KFC inverts at steps 1–3),
they alternate windows of P = lcm(stats_every, inverse_every) consecutive steps, so every KFC window holds exactly
P/stats_every statistics steps and P/inverse_every inverse steps; the ratio is total KFC time / total SGD time
over the same number of windows (at least ``--min-rounds``, more while under ``--budget`` seconds).

Peak memory: one subprocess per (model, optimizer) runs 5 steps (step 1 takes statistics, inverts and clips,
so it is the peak for every config) and reports the rise of its peak RSS over its RSS just before the model was
built (VmHWM − VmRSS from /proc/self/status), plus the raw peak RSS (which includes ~0.7 GB of imported
libraries, the same in both processes).

``--profile``: where a KFC step's time goes (exclusive timers around the optimizer's phases, amortised per step):
statistics (Ω/Γ accumulation in the taps, the sampled-target backward, moving averages), inverses,
preconditioning, clipping ν (exact Fisher-vector products), and the rest (forward + backward, the update,
Python), shown next to the SGD step. ``bench/step_breakdown.py`` has the finer breakdown of issue 17.

``--compiled`` also times ``kc.compile_step`` (the kfc backend + inductor for forward/backward, the KFC update
eager) against SGD on ``torch.compile(model)``, each after its warm-up (compile time excluded); otherwise that
column says n/a. ``--kfc-options`` passes extra ``kc.KFC`` arguments (e.g. a smaller ``clip_fraction``).

    .venv/bin/python bench/step_overhead.py                          # everything (~15 min on 2 cores)
    .venv/bin/python bench/step_overhead.py --models paper           # the paper net only
    .venv/bin/python bench/step_overhead.py --models paper --profile --no-memory
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from collections import defaultdict

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import kfc_compile as kc  # noqa: E402
from kfc_compile.tools.demo.models import build_model as demo_model  # noqa: E402
from kfc_compile.tools.demo.models import paper_cifar_net  # noqa: E402

CASES = {"paper": 128, "resnet18-b32": 32, "resnet18-b128": 128}  # the default set: model -> batch
EXTRA = {"digits": 128, "mnist1d": 128}  # the demo's convnets (--models digits,mnist1d): explain time to target
SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40)}  # default 3×32×32
BATCH = {**CASES, **EXTRA}
CONFIGS = ((1, 1), (1, 20), (10, 100))
LR = 1e-3  # timing only: small enough that synthetic labels never blow anything up
WARMUP = 3


def build_model(case: str, seed: int = 0):
    torch.manual_seed(seed)
    if case == "paper":
        return paper_cifar_net()
    if case.startswith("resnet18"):
        from torchvision.models import resnet18

        return resnet18(num_classes=10)
    if case in SHAPES:
        return demo_model("convnet", case, SHAPES[case], 10)
    raise SystemExit(f"unknown model {case!r}: expected one of {', '.join(BATCH)}")


def build_batches(case: str, seed: int = 0):
    b = BATCH[case]
    g = torch.Generator().manual_seed(seed + 1)
    shape = SHAPES.get(case, (3, 32, 32))
    return [(torch.randn(b, *shape, generator=g), torch.randint(0, 10, (b,), generator=g)) for _ in range(4)]


def build(case: str, seed: int = 0):
    return build_model(case, seed), build_batches(case, seed)


CLOCK = {"fn": time.perf_counter}  # --cpu-time: time.process_time (this process only; robust on a shared machine)


def clock() -> float:
    return CLOCK["fn"]()


KFC_OPTIONS: dict = {}  # --kfc-options: extra kc.KFC keyword arguments (default: the optimizer's defaults)


def make_opt(kind: str, model, stats_every: int = 1, inverse_every: int = 20):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kc.KFC(model, lr=LR, momentum=0.9, stats_every=stats_every, inverse_every=inverse_every,
                      **KFC_OPTIONS)


class Stepper:
    def __init__(self, model, opt, batches):
        self.model, self.opt, self.batches, self.i = model, opt, batches, 0

    def run(self, n: int) -> float:
        t = clock()
        for _ in range(n):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            loss = F.cross_entropy(self.model(x), y)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss after {self.i} steps")
        return clock() - t


class CompiledStepper(Stepper):
    """``kc.compile_step`` (forward/backward compiled by the kfc backend, KFC update eager) as a stepper."""

    def __init__(self, step, batches):
        super().__init__(step.model, step.optimizer, batches)
        self.step = step

    def run(self, n: int) -> float:
        t = clock()
        for _ in range(n):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            loss = self.step(x, y)
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"non-finite loss after {self.i} steps")
        return clock() - t


COMPILE_OPTIONS = {"layout_optimization": False}  # inductor's channels-last layout made CPU training slower


def steppers(case: str, s: int, i: int, compiled: bool):
    model, batches = build(case)
    kmodel = copy.deepcopy(model)
    if not compiled:
        return Stepper(model, make_opt("sgd", model), batches), Stepper(kmodel, make_opt("kfc", kmodel, s, i), batches)
    sgd_model = torch.compile(model, options=COMPILE_OPTIONS)
    sgd = Stepper(sgd_model, torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9), batches)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step = kc.compile_step(kmodel, torch.nn.CrossEntropyLoss(), lr=LR, momentum=0.9, stats_every=s,
                               inverse_every=i, backend_options=COMPILE_OPTIONS, **KFC_OPTIONS)
    return sgd, CompiledStepper(step, batches)


def time_config(case: str, s: int, i: int, min_rounds: int, max_rounds: int, budget: float,
                compiled: bool = False) -> dict:
    sgd, kfc = steppers(case, s, i, compiled)
    kfc.run(WARMUP), sgd.run(WARMUP)
    P = math.lcm(s, i)
    tk, ts = [], []
    start = time.perf_counter()
    while len(tk) < max_rounds:
        tk.append(kfc.run(P))
        ts.append(sgd.run(P))
        if len(tk) >= min_rounds and time.perf_counter() - start > budget:
            break
    n = len(tk) * P
    return {"model": case, "batch": BATCH[case], "stats_every": s, "inverse_every": i, "steps": n, "compiled": compiled,
            "kfc_ms": 1e3 * sum(tk) / n, "sgd_ms": 1e3 * sum(ts) / n, "ratio": sum(tk) / sum(ts),
            "round_ratios": [a / b for a, b in zip(tk, ts, strict=True)]}


# -- memory (one subprocess per model and optimizer) ---------------------------------------------------------------

def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(case: str, kind: str, steps: int) -> None:
    batches = build_batches(case)
    base = _status_kb("VmRSS")
    model = build_model(case)
    Stepper(model, make_opt(kind, model), batches).run(steps)
    # VmHWM, the high-water mark of this process's own address space (ru_maxrss would carry over the parent's
    # peak through fork + exec)
    peak = _status_kb("VmHWM")
    print(json.dumps({"base_kb": base, "peak_kb": peak}))


def measure_memory(case: str, steps: int = 5, threads: int | None = None) -> dict:
    out = {"model": case}
    for kind in ("sgd", "kfc"):
        cmd = [sys.executable, os.path.abspath(__file__), "--_memory-child", case, kind, str(steps),
               "--kfc-options", json.dumps(KFC_OPTIONS)]
        if threads:
            cmd += ["--threads", str(threads)]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"memory child {case}/{kind} failed:\n{r.stderr[-2000:]}")
        d = json.loads(r.stdout.strip().splitlines()[-1])
        out[kind] = d
    s, k = out["sgd"], out["kfc"]
    out["delta_ratio"] = (k["peak_kb"] - k["base_kb"]) / max(1, s["peak_kb"] - s["base_kb"])
    out["raw_ratio"] = k["peak_kb"] / s["peak_kb"]
    return out


# -- profile ----------------------------------------------------------------------------------------------------

class PhaseTimer:
    """Exclusive wall time per phase (time in a nested timed phase is charged to the inner one only)."""

    def __init__(self):
        self.total = defaultdict(float)
        self.stack: list[list] = []

    def wrap(self, obj, attr: str, phase) -> bool:
        """Time ``obj.attr`` under ``phase`` (a name, or a function of ``obj`` returning one at call time)."""
        fn = getattr(obj, attr, None)
        if fn is None:
            return False

        def timed(*a, **k):
            self.stack.append([phase(obj) if callable(phase) else phase, clock(), 0.0])
            try:
                return fn(*a, **k)
            finally:
                ph, t0, child = self.stack.pop()
                dt = clock() - t0
                self.total[ph] += dt - child
                if self.stack:
                    self.stack[-1][2] += dt

        setattr(obj, attr, timed)
        return True


def _record_phase(state) -> str:
    if getattr(state, "capture_input", False) and not getattr(state, "capture_grad", False):
        return "statistics: Ω (layer inputs, in the taps)"
    if getattr(state, "capture_grad", False) and not getattr(state, "capture_input", False):
        return "statistics: Γ (output gradients, in the taps)"
    return "statistics: Ω+Γ (in the taps)"


PHASES = (  # (object, attribute, phase)
    ("capture", "record", _record_phase),
    ("est", "_fisher_pass", "statistics: sampled-target backward"),
    ("est", "_statistics_pass", "statistics: subset forward + sampled-target backward"),
    ("est", "_fold", "statistics: moving averages"),
    ("est", "refresh_inverses", "inverses"),
    ("est", "precondition", "preconditioning"),
    ("opt", "_exact_gram", "clipping ν (Fisher-vector products)"),
)


def profile_config(case: str, s: int, i: int, rounds: int) -> dict:
    model, batches = build(case)
    kmodel = copy.deepcopy(model)
    sgd = Stepper(model, make_opt("sgd", model), batches)
    opt = make_opt("kfc", kmodel, s, i)
    kfc = Stepper(kmodel, opt, batches)
    kfc.run(WARMUP), sgd.run(WARMUP)
    timer = PhaseTimer()
    objs = {"opt": opt, "est": opt._estimator, "capture": opt._estimator.capture}
    missing = [f"{o}.{a}" for o, a, ph in PHASES if objs[o] is None or not timer.wrap(objs[o], a, ph)]
    P = math.lcm(s, i)
    tk = ts = 0.0
    for _ in range(rounds):
        tk += kfc.run(P)
        ts += sgd.run(P)
    n = rounds * P
    order = ["Ω", "Γ", "Ω+Γ", "subset", "sampled", "moving", "inverses", "precond", "clipping"]
    rank = lambda ph: next((j for j, w in enumerate(order) if w in ph), len(order))  # noqa: E731
    phases = {ph: 1e3 * timer.total[ph] / n for ph in sorted(timer.total, key=rank)}
    rest = 1e3 * tk / n - sum(phases.values())
    return {"model": case, "stats_every": s, "inverse_every": i, "steps": n, "kfc_ms": 1e3 * tk / n,
            "sgd_ms": 1e3 * ts / n, "phases": phases, "rest_ms": rest, "missing": missing}


# -- output -----------------------------------------------------------------------------------------------------

def _mib(kb: float) -> str:
    return f"{kb / 1024:.0f}"


def table(rows: list[list[str]], head: list[str]) -> str:
    w = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(head)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w[j]) for j, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [fmt(r) for r in rows])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(CASES), help="comma-separated subset of " + ",".join(BATCH))
    p.add_argument("--configs", default=",".join(f"{s}:{i}" for s, i in CONFIGS),
                   help="stats_every:inverse_every pairs (default: %(default)s)")
    p.add_argument("--min-rounds", type=int, default=2, help="windows of P steps per optimizer, at least")
    p.add_argument("--max-rounds", type=int, default=20)
    p.add_argument("--budget", type=float, default=20.0, help="seconds per config before stopping after "
                                                              "--min-rounds (default %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--compiled", action="store_true", help="also time kc.compile_step against a torch.compile'd "
                                                           "SGD step (inductor; compile time excluded)")
    p.add_argument("--no-timing", action="store_true", help="skip the step-time ratios")
    p.add_argument("--profile", action="store_true", help="also print where KFC's step time goes")
    p.add_argument("--profile-rounds", type=int, default=1)
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--cpu-time", action="store_true", help="time steps in this process's CPU time instead of wall "
                                                          "time (use with --threads 1 on a shared machine)")
    p.add_argument("--kfc-options", default="{}", help="JSON dict of extra kc.KFC arguments, e.g. "
                                                      "'{\"clip_fraction\": 0.0625}' (default: none)")
    p.add_argument("--_memory-child", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.cpu_time:
        CLOCK["fn"] = time.process_time
    try:
        KFC_OPTIONS.update(json.loads(a.kfc_options))
    except (ValueError, TypeError) as e:
        p.error(f"--kfc-options must be a JSON object: {e}")
    if a._memory_child:
        case, kind, steps = a._memory_child
        memory_child(case, kind, int(steps))
        return 0
    cases = [c for c in a.models.split(",") if c]
    for c in cases:
        if c not in BATCH:
            p.error(f"unknown model {c!r}: expected a subset of {','.join(BATCH)}")
    try:
        configs = [tuple(int(v) for v in c.split(":")) for c in a.configs.split(",") if c]
        assert all(len(c) == 2 and min(c) >= 1 for c in configs)
    except (ValueError, AssertionError):
        p.error(f"--configs: expected stats:inverse pairs of positive integers, got {a.configs!r}")

    print(f"# step_overhead: {datetime.datetime.now():%Y-%m-%d %H:%M}, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}, KFC options {json.dumps(KFC_OPTIONS)}, "
          f"clock {'process CPU time' if a.cpu_time else 'wall'}", flush=True)
    res: dict = {"timing": [], "memory": [], "profile": [], "torch": torch.__version__, "kfc_options": KFC_OPTIONS,
                 "threads": torch.get_num_threads(), "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}"}
    if not a.no_timing:
        rows = []
        for c in cases:
            for s, i in configs:
                r = time_config(c, s, i, a.min_rounds, a.max_rounds, a.budget)
                res["timing"].append(r)
                rc = time_config(c, s, i, a.min_rounds, a.max_rounds, a.budget, compiled=True) if a.compiled else None
                if rc is not None:
                    res["timing"].append(rc)
                rows.append([c, str(BATCH[c]), f"({s}, {i})", str(r["steps"]), f"{r['sgd_ms']:.1f}",
                             f"{r['kfc_ms']:.1f}", f"{r['ratio']:.2f}x",
                             f"{rc['ratio']:.2f}x ({rc['kfc_ms']:.0f}/{rc['sgd_ms']:.0f} ms)" if rc else "n/a"])
                for x in (r, rc) if rc else (r,):
                    print(f"  {c} ({s},{i}){' compiled' if x['compiled'] else ''}: {x['steps']} steps, "
                          f"SGD {x['sgd_ms']:.1f} ms, KFC {x['kfc_ms']:.1f} ms, ratio {x['ratio']:.2f} "
                          f"(per window: {', '.join(f'{v:.2f}' for v in x['round_ratios'])})", file=sys.stderr,
                          flush=True)
        print("\nKFC step time / SGD step time (compiled: kc.compile_step / torch.compile'd SGD step, "
              "KFC/SGD ms per step)\n")
        print(table(rows, ["model", "batch", "(stats, inv)", "steps", "SGD ms/step", "KFC ms/step",
                           "eager ratio", "compiled ratio"]))
    if not a.no_memory:
        rows = []
        for c in cases:
            m = measure_memory(c, threads=a.threads)
            res["memory"].append(m)
            rows.append([c, _mib(m["sgd"]["peak_kb"] - m["sgd"]["base_kb"]),
                         _mib(m["kfc"]["peak_kb"] - m["kfc"]["base_kb"]),
                         f"{m['delta_ratio']:.2f}x", _mib(m["sgd"]["peak_kb"]), _mib(m["kfc"]["peak_kb"]),
                         f"{m['raw_ratio']:.2f}x"])
        print("\nPeak memory (separate processes; MB of RSS above the process before the model was built)\n")
        print(table(rows, ["model", "SGD peak rise", "KFC peak rise", "ratio", "SGD peak RSS", "KFC peak RSS",
                           "raw ratio"]))
    if a.profile:
        for c in cases:
            for s, i in configs:
                r = profile_config(c, s, i, a.profile_rounds)
                res["profile"].append(r)
                print(f"\nWhere KFC's step goes: {c}, batch {BATCH[c]}, (stats {s}, inverses {i}), "
                      f"{r['steps']} steps; SGD step {r['sgd_ms']:.1f} ms, KFC step {r['kfc_ms']:.1f} ms\n")
                rows = [[ph, f"{ms:.1f}", f"{100 * ms / r['kfc_ms']:.0f}%", f"{ms / r['sgd_ms']:.2f}"]
                        for ph, ms in r["phases"].items()]
                rows.append(["rest: forward + backward + Python", f"{r['rest_ms']:.1f}",
                             f"{100 * r['rest_ms'] / r['kfc_ms']:.0f}%", f"{r['rest_ms'] / r['sgd_ms']:.2f}"])
                print(table(rows, ["phase", "ms/step", "share of KFC step", "x SGD step"]))
                if r["missing"]:
                    print(f"(not timed, not found on the optimizer: {', '.join(r['missing'])})")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
