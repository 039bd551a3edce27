#!/usr/bin/env python
"""Compiled KFC step vs eager KFC step vs compiled SGD step, in one run (issue 5).

Default case: torchvision resnet18 (``num_classes=10``), batch 32, 3×32×32, cross-entropy, CPU.

Four steppers share the initial weights and the batches:

* ``eager KFC``     — ``kc.compile_step(model, loss, compile=False, ...)``: eager ``transform`` + ``KFC``;
* ``compiled KFC``  — ``kc.compile_step(model, loss, ...)``: forward/backward compiled by the ``kfc`` backend
  (inductor), loss and KFC update eager;
* ``compiled SGD``  — ``torch.compile(model)`` (inductor) + ``torch.optim.SGD`` (momentum 0.9);
* ``eager SGD``     — for reference.

KFC runs with ``stats_every=2`` and a huge ``inverse_every`` so that, after the 3 warm-up steps (which take
statistics and invert), steps alternate between a *statistics step* (MC Fisher pass + Ω/Γ accumulation) and a
*plain step*; the steppers take turns step by step (interleaved, so machine-load drifts hit all of them alike)
and every step is timed and classified. The inverse refresh (the same eager code in both KFC steppers) is timed
separately: ``inverse_ms`` = median over both KFC steppers of (time of warm-up step 3, which takes statistics and
inverts) − (median statistics step). From these, the amortised step time of a schedule (stats every s,
inverses every T) is plain·(1−1/s) + stats/s + inverse/T, reported for ``--schedules``. After each timed
statistics step (capture is then off) every stepper's model also runs one forward + backward alone (no optimizer):
the part of the step that compilation changes.

Graphs: the number of dynamo graphs the ``kfc`` backend instrumented, dynamo's unique-graph count and graph
breaks seen by the compiled KFC stepper (statistics and plain steps must share one graph).

``--explain``: for resnet18, mobilenet_v3_small and vit_b_16 (image_size=32), ``torch._dynamo.explain`` of the
model, then two compiled steps (a statistics step and a plain one) with the ``kfc`` backend handing its graphs to
``aot_eager`` (no inductor compile, same instrumentation): graphs, graph breaks, layers found by the backend vs by
the eager ``transform``.

    .venv/bin/python bench/compiled_step.py                    # resnet18, b32, 32x32 (~10 min on 2 idle cores)
    .venv/bin/python bench/compiled_step.py --rounds 4 --json out.json
    .venv/bin/python bench/compiled_step.py --explain
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import kfc_compile as kc  # noqa: E402

LR = 1e-3  # timing only: small enough that synthetic labels never blow anything up


def build_model(name: str, seed: int = 0) -> nn.Module:
    import torchvision.models as tvm

    torch.manual_seed(seed)
    if name == "tiny":  # smoke test of this script
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                             nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 10))
    if name == "vit_b_16":
        return tvm.vit_b_16(image_size=32, num_classes=10)
    return getattr(tvm, name)(num_classes=10)


class SGDStep:
    def __init__(self, model: nn.Module, compiled: bool, options: dict | None = None):
        self.model = torch.compile(model, options=options) if compiled else model
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def __call__(self, x, y):
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.opt.step()
        return loss.detach()


def _median(v):
    return statistics.median(v) if v else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_timing(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    base = build_model(args.model).to(device)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device),
                torch.randint(0, 10, (args.batch,), generator=g).to(device)) for _ in range(4)]
    kfc_opts = dict(lr=LR, momentum=0.9, stats_every=2, inverse_every=10**9)
    if args.no_clip:
        kfc_opts["clip"] = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        steppers = {
            "eager KFC": kc.compile_step(copy.deepcopy(base), nn.CrossEntropyLoss(), compile=False, **kfc_opts),
            "compiled KFC": kc.compile_step(copy.deepcopy(base), nn.CrossEntropyLoss(), **kfc_opts),
            "compiled SGD": SGDStep(copy.deepcopy(base), compiled=True),
            "eager SGD": SGDStep(copy.deepcopy(base), compiled=False),
        }
        if args.extra_options:  # the same two compiled steppers with these inductor options
            extra = json.loads(args.extra_options)
            steppers["compiled KFC*"] = kc.compile_step(copy.deepcopy(base), nn.CrossEntropyLoss(),
                                                        backend_options=extra, **kfc_opts)
            steppers["compiled SGD*"] = SGDStep(copy.deepcopy(base), compiled=True, options=extra)
    torch._dynamo.utils.counters.clear()
    warm: dict[str, list[float]] = {k: [] for k in steppers}
    times: dict[str, dict[str, list[float]]] = {k: {"stats": [], "plain": []} for k in steppers}
    fwdbwd: dict[str, list[float]] = {k: [] for k in steppers}
    i = 0
    for k in range(1, 4 + 2 * args.rounds):  # 3 warm-up steps, then rounds of (statistics step, plain step)
        kind = "stats" if (k - 1) % 2 == 0 else "plain"
        for name, step in steppers.items():
            x, y = batches[i % len(batches)]
            _sync(device)
            t, c = time.perf_counter(), time.process_time()
            loss = step(x, y)
            _sync(device)
            dt = (time.process_time() - c) if args.cpu_time else (time.perf_counter() - t)
            if not torch.isfinite(loss):
                raise RuntimeError(f"{name}: non-finite loss at step {k}")
            (warm[name] if k <= 3 else times[name][kind]).append(dt)
            print(f"step {k:3d} {kind:5s} {name:13s} {1e3 * dt:10.1f} ms", flush=True)
        i += 1
        if k > 3 and kind == "stats":  # the next step is a plain one: capture is off, time forward + backward only
            x, y = batches[i % len(batches)]
            for name, step in steppers.items():
                model = step.model
                _sync(device)
                t, c = time.perf_counter(), time.process_time()
                F.cross_entropy(model(x), y).backward()
                _sync(device)
                fwdbwd[name].append((time.process_time() - c) if args.cpu_time else (time.perf_counter() - t))
                for p in model.parameters():
                    p.grad = None
    med = {name: {kind: 1e3 * _median(v) for kind, v in d.items()} for name, d in times.items()}
    for name in med:
        med[name]["fwd+bwd"] = 1e3 * _median(fwdbwd[name])
    inverse = [1e3 * warm[n][2] - med[n]["stats"] for n in steppers if "KFC" in n]
    inv_ms = max(0.0, _median(inverse))
    cstep = steppers["compiled KFC"]
    res = {
        "model": args.model, "batch": args.batch, "size": args.size, "rounds": args.rounds, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "loadavg": os.getloadavg(), "clip": not args.no_clip, "clock": "process CPU" if args.cpu_time else "wall",
        "median_ms": med, "inverse_ms": inv_ms, "inverse_ms_each": inverse,
        "warmup_ms": {n: [1e3 * t for t in v] for n, v in warm.items()},
        "kfc_graphs": cstep.compiles,
        "dynamo_unique_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
        "graph_breaks": dict(torch._dynamo.utils.counters["graph_break"]),
        "kfc_layers": len(cstep.optimizer.layers), "extra_options": args.extra_options,
    }
    sgd_c = med["compiled SGD"]["plain"]
    kinds = ("plain", "stats", "fwd+bwd")
    res["ratios"] = {f"{name} / compiled SGD": {kind: med[name][kind] / sgd_c for kind in kinds} for name in steppers}
    res["ratios"]["eager KFC / compiled KFC"] = {kind: med["eager KFC"][kind] / med["compiled KFC"][kind]
                                                 for kind in kinds}
    amort = {}
    for sched in args.schedules:
        s, T = (int(v) for v in sched.split(":"))
        row = {}
        for name in [n for n in steppers if "KFC" in n]:
            m = med[name]
            row[name] = m["plain"] * (1 - 1 / s) + m["stats"] / s + inv_ms / T
        for name in [n for n in steppers if "SGD" in n]:
            row[name] = med[name]["plain"]
        amort[sched] = row
    res["amortised_ms"] = amort
    return res


def print_timing(res: dict) -> None:
    print(f"\n{res['model']}, batch {res['batch']}, {res['size']}x{res['size']}, {res['device_name']}, "
          f"torch {res['torch']}, {res['threads']} threads, load average {res['loadavg'][0]:.1f}, "
          f"{res['rounds']} rounds, {res['clock']} time")
    print("| stepper | plain step ms | statistics step ms | forward+backward ms (capture off) | plain / compiled SGD "
          "| stats / compiled SGD |")
    print("|---|---|---|---|---|---|")
    for name, m in res["median_ms"].items():
        r = res["ratios"][f"{name} / compiled SGD"]
        print(f"| {name} | {m['plain']:.0f} | {m['stats']:.0f} | {m['fwd+bwd']:.0f} | {r['plain']:.2f} | "
              f"{r['stats']:.2f} |")
    r = res["ratios"]["eager KFC / compiled KFC"]
    print(f"\neager KFC / compiled KFC: plain {r['plain']:.2f}, statistics {r['stats']:.2f}, forward+backward "
          f"{r['fwd+bwd']:.2f}; "
          f"inverse refresh (eager, both): {res['inverse_ms']:.0f} ms")
    print("amortised ms/step (stats every s, inverses every T):")
    for sched, row in res["amortised_ms"].items():
        sgd = row["compiled SGD"]
        print(f"  s:T={sched}: " + ", ".join(f"{k} {v:.0f} ({v / sgd:.2f}x compiled SGD)" for k, v in row.items()))
    print(f"kfc backend graphs: {res['kfc_graphs']}, dynamo unique graphs (all compiled steppers): "
          f"{res['dynamo_unique_graphs']}, graph breaks: {res['graph_breaks'] or 0}, KFC layers: {res['kfc_layers']}")


def run_explain(models: list[str], size: int, batch: int) -> list[dict]:
    rows = []
    for name in models:
        torch._dynamo.reset()
        model = build_model(name)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, 10, (batch,))
        t = time.perf_counter()
        ex = torch._dynamo.explain(model)(x)
        plain = (ex.graph_count, ex.graph_break_count)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            step = kc.compile_step(copy.deepcopy(model), nn.CrossEntropyLoss(), lr=LR, stats_every=2, clip=None,
                                   backend_options={"inner": "aot_eager"})
            eager_layers = len(kc.transform(copy.deepcopy(model)).kfc.layers)
        for _ in range(2):  # a statistics step, then a plain step
            step(x, y)
        row = {"model": name, "explain_graphs": plain[0], "explain_breaks": plain[1], "kfc_graphs": step.compiles,
               "dynamo_graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
               "breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
               "kfc_layers": len(step.optimizer.layers), "transform_layers": eager_layers,
               "uncovered": len(step.model.kfc.uncovered), "seconds": time.perf_counter() - t}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | explain (graphs / breaks) | kfc compiled step: graphs / breaks | layers: kfc backend | "
          "layers: eager transform |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['explain_graphs']} / {r['explain_breaks']} | {r['kfc_graphs']} / {r['breaks']} | "
              f"{r['kfc_layers']} | {r['transform_layers']} |")
    return rows


def run_check(device: torch.device, steps: int = 6) -> dict:
    """compile_step vs the eager step on a small CNN (float32, MC Fisher, clipping): max relative differences."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.ReLU(), nn.Flatten(),
                         nn.Linear(8 * 9, 10)).to(device)
    opts = dict(lr=0.02, damping=0.01, stats_every=2, inverse_every=6)
    gen = lambda: torch.Generator(device=device).manual_seed(1)  # noqa: E731
    eager = kc.compile_step(copy.deepcopy(base), nn.CrossEntropyLoss(), compile=False, generator=gen(), **opts)
    comp = kc.compile_step(copy.deepcopy(base), nn.CrossEntropyLoss(), generator=gen(), **opts)
    g = torch.Generator().manual_seed(2)
    t = time.perf_counter()
    for _ in range(steps):
        x, y = torch.randn(8, 3, 8, 8, generator=g).to(device), torch.randint(0, 10, (8,), generator=g).to(device)
        eager(x, y), comp(x, y)
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()  # noqa: E731
    fac = {layer.name: (rel(comp.optimizer.factors(layer.name).A, eager.optimizer.factors(layer.name).A),
                        rel(comp.optimizer.factors(layer.name).G, eager.optimizer.factors(layer.name).G))
           for layer in eager.optimizer.layers}
    par = max(rel(pc, pe) for pe, pc in zip(eager.model.parameters(), comp.model._orig_mod.parameters(),
                                            strict=True))
    res = {"device": str(device), "kernels": os.environ.get("KFC_KERNELS", "auto"), "factor_rel": fac,
           "param_rel": par, "kfc_graphs": comp.compiles, "seconds": time.perf_counter() - t}
    print(json.dumps(res), flush=True)
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6, help="(statistics step, plain step) pairs timed per stepper")
    p.add_argument("--schedules", nargs="*", default=["1:20", "10:100"], help="s:T pairs for amortised times")
    p.add_argument("--explain", action="store_true", help="graph/break check on resnet18, mobilenet, vit_b_16")
    p.add_argument("--explain-models", nargs="*", default=["resnet18", "mobilenet_v3_small", "vit_b_16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--cpu-time", action="store_true", help="time steps in process CPU time instead of wall time "
                   "(robust on a shared machine; use with --threads 1)")
    p.add_argument("--no-clip", action="store_true", help="KFC without clipping (no exact-Fisher JVPs per step)")
    p.add_argument("--check", action="store_true", help="compiled vs eager step on a small CNN (numerics only)")
    p.add_argument("--extra-options", help="JSON inductor options: adds 'compiled KFC*' and 'compiled SGD*' "
                   "steppers compiled with them (e.g. '{\"layout_optimization\": false}')")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        res = run_check(torch.device(args.device))
    elif args.explain:
        res = run_explain(args.explain_models, args.size, 8)
    else:
        res = run_timing(args)
        print_timing(res)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
