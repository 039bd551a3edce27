#!/usr/bin/env python
"""Distributed KFC under DDP: step time over SGD-DDP, bytes per collective, inverse-refresh time per rank.

The KFC paper's CIFAR-10 net (``kfc_compile.tools.demo.models.paper_cifar_net``, synthetic 3×32×32 inputs, 10
classes) on a global batch of ``--batch`` examples, split evenly over ``--nproc`` ranks (spawned here: gloo on the
CPU, NCCL with one GPU per rank when CUDA is available — the same script). KFC runs its defaults (KFC-pre,
momentum 0.9, clip 0.3 with exact Fisher products on 1/4 of the batch, MC Fisher on ``stats_fraction`` 1/8) at each
(stats_every, inverse_every) of ``--configs``; SGD is ``torch.optim.SGD`` (momentum 0.9); both wrap the model in
``DistributedDataParallel``. The single-process column runs the same script with one plain process on the
whole global batch (no process group, no DDP).

* **step time**: after 3 warm-up steps each, the two optimizers take turns over whole windows of
  P = lcm(stats_every, inverse_every) steps (every KFC window holds its share of statistics and inverse steps),
  ``--rounds`` windows each; a window starts and ends with a barrier, so its wall time is the slowest rank's.
  Process CPU time (the mean over ranks) is reported next to it: on a shared machine it is the steadier number.
* **bytes per step** by collective (``Comm.traffic``: an all-reduce counts its buffer, a gather everything it
  returns), over the timed KFC windows; DDP's own gradient all-reduce (every parameter, every step) for scale.
* **inverse refresh per rank**: ``refresh_inverses`` with every layer due, ``--refresh-reps`` times after one
  statistics step; wall and CPU time per rank, for ``distributed="broadcast"`` (each layer inverted by one rank,
  gathered by all), ``"replicate"`` (every rank inverts every layer), ``"owner"`` (each layer inverted and kept
  by its owner only) and FSDP2 (``fully_shard(model)``, owner preconditioning), and single-process; with the
  curvature bytes each rank holds (``opt.curvature_nbytes()``).
* the step times run for each ``--modes`` setting of ``distributed=`` (DDP).

    .venv/bin/python bench/distributed_step.py                       # 2 ranks (~6 min on 2 CPU cores)
    .venv/bin/python bench/distributed_step.py --nproc 4 --rounds 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import kfc_compile as kc  # noqa: E402
from kfc_compile.tools.demo.models import paper_cifar_net  # noqa: E402

LR = 1e-3  # timing only: small enough that synthetic labels never blow anything up
WARMUP = 3


def batches(n: int, rank: int, world: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """4 global batches of n synthetic examples; this rank's contiguous shard of each."""
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(4):
        x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        m = n // max(world, 1)
        lo = rank * m if world else 0
        out.append((x[lo:lo + (m if world else n)].to(device), y[lo:lo + (m if world else n)].to(device)))
    return out


class Phases:
    """Wall and process CPU time spent in named methods of the KFC step (wrapped on the instances), per step."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.on = False

    def wrap(self, obj, attr: str, name: str) -> None:
        fn = getattr(obj, attr)

        def timed(*a, **k):
            if not self.on:
                return fn(*a, **k)
            t, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **k)
            finally:
                self.wall[name] = self.wall.get(name, 0.0) + time.perf_counter() - t
                self.cpu[name] = self.cpu.get(name, 0.0) + time.process_time() - c
        setattr(obj, attr, timed)

    def attach(self, opt) -> None:
        """Time the statistics, inverse refresh, preconditioning, exact-Fisher ν and every collective."""
        est = opt._estimator
        self.wrap(est, "update_statistics", "statistics")
        self.wrap(est, "refresh_inverses", "refresh")
        self.wrap(est, "precondition", "precondition")
        self.wrap(opt, "_exact_gram", "fisher products")
        comm = opt._dist.comm if opt._dist is not None else None
        if comm is not None:
            for attr in ("all_reduce_", "all_gather", "reduce_scatter", "all_to_all"):
                self.wrap(comm, attr, "collectives (inside the above)")


class Stepper:
    """Plain training steps on a cycle of batches, timed in wall and process CPU time."""

    def __init__(self, model, opt, data):
        self.model, self.opt, self.data, self.i = model, opt, data, 0

    def run(self, n: int) -> tuple[float, float]:
        barrier()
        t, c = time.perf_counter(), time.process_time()
        for _ in range(n):
            x, y = self.data[self.i % len(self.data)]
            self.i += 1
            F.cross_entropy(self.model(x), y).backward()
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        sync()
        barrier()
        return time.perf_counter() - t, time.process_time() - c


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_net(name: str) -> torch.nn.Module:
    """The benched model: the paper's CIFAR-10 net, or torchvision's resnet18 with 10 classes (3×32×32 inputs)."""
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=10)
    return paper_cifar_net()


def model_on(device: torch.device, world: int, args, fsdp: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    m = make_net(args.model).to(device)
    if fsdp:  # FSDP2: every layer's parameters dim-0 sharded (the root as one unit)
        from torch.distributed.fsdp import fully_shard

        return fully_shard(m)
    return DDP(m, device_ids=[device.index] if device.type == "cuda" else None) if world else m


def make_kfc(model, s: int, i: int, mode: str | None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kc.KFC(model, lr=LR, momentum=0.9, stats_every=s, inverse_every=i,
                      distributed=mode if mode is not None else None)


def time_config(world: int, rank: int, device, args, s: int, i: int, mode: str | None = None) -> dict:
    data = batches(args.batch, rank, world, device)
    sgd_model, kfc_model = model_on(device, world, args), model_on(device, world, args)
    sgd = Stepper(sgd_model, torch.optim.SGD(sgd_model.parameters(), lr=LR, momentum=0.9), data)
    opt = make_kfc(kfc_model, s, i, mode)
    phases = Phases()
    phases.attach(opt)
    kfc = Stepper(kfc_model, opt, data)
    kfc.run(WARMUP)
    sgd.run(WARMUP)
    comm = opt._dist.comm if opt._dist is not None else None
    if comm is not None:
        comm.traffic.clear()
    P = math.lcm(s, i)
    tk, ts = [], []
    for _ in range(args.rounds):
        phases.on = True
        tk.append(kfc.run(P))
        phases.on = False
        ts.append(sgd.run(P))
    n = args.rounds * P
    grad_bytes = sum(p.numel() * p.element_size() for p in kfc_model.parameters())
    return {"stats_every": s, "inverse_every": i, "steps": n, "mode": mode or ("single" if not world else "default"),
            "kfc_wall_ms": 1e3 * sum(t[0] for t in tk) / n, "sgd_wall_ms": 1e3 * sum(t[0] for t in ts) / n,
            "kfc_cpu_ms": 1e3 * sum(t[1] for t in tk) / n, "sgd_cpu_ms": 1e3 * sum(t[1] for t in ts) / n,
            "traffic": {} if comm is None else {k: (v.calls / n, v.bytes / n) for k, v in comm.traffic.items()},
            "ddp_grad_bytes": grad_bytes if world else 0,
            "phases": {k: (1e3 * phases.wall[k] / n, 1e3 * phases.cpu[k] / n) for k in phases.wall}}


def time_refresh(world: int, rank: int, device, args, mode: str | None) -> dict:
    data = batches(args.batch, rank, world, device)
    model = model_on(device, world, args, fsdp=mode == "fsdp")
    opt = make_kfc(model, 1, 10 ** 6, None if mode == "fsdp" else mode)
    Stepper(model, opt, data).run(1)  # statistics and the first inverses
    est, eta = opt._estimator, opt.param_groups[0]["damping"] + opt.param_groups[0]["weight_decay"]
    walls, cpus = [], []
    for _ in range(args.refresh_reps):
        barrier()
        t, c = time.perf_counter(), time.process_time()
        est.refresh_inverses(1, eta)  # k = 1: every layer is due
        sync()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    owned = None
    if opt._dist is not None and opt._dist.owner is not None:
        owned = sorted(s.name for s, r in zip(est.states, opt._dist.owner.owners(est.states), strict=True)
                       if r == rank)
    elif opt._dist is not None and hasattr(opt._dist.inverses, "owners"):
        owners = opt._dist.inverses.owners(est.states)
        owned = sorted(n for n, r in owners.items() if r == rank)
    return {"mode": mode or "single", "wall_ms": 1e3 * statistics.median(walls),
            "cpu_ms": 1e3 * statistics.median(cpus), "owned": owned, "nbytes": opt.curvature_nbytes()}


def rank_main(rank: int, world: int, port: int, args, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=10))
    configs = [tuple(int(v) for v in c.split(":")) for c in args.configs.split(",")]
    modes = args.modes.split(",") if world else [None]
    res = {"steps": [time_config(world, rank, device, args, s, i, m) for m in modes for s, i in configs],
           "refresh": [time_refresh(world, rank, device, args, m)
                       for m in (("broadcast", "replicate", "owner", "fsdp") if world else (None,))]}
    if world:
        dist.destroy_process_group()
    torch.save(res, os.path.join(out, f"rank{rank}.pt"))


def launch(world: int, args, out: str) -> list[dict]:
    """Run ``rank_main`` on ``world`` spawned ranks (0: one plain process); their results by rank."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=rank_main, args=(r, world, port, args, out)) for r in range(max(world, 1))]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"a rank failed (exit codes {[p.exitcode for p in procs]})")
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(max(world, 1))]


def table(rows: list[list[str]], head: list[str]) -> str:
    w = [max(len(h), *(len(r[j]) for r in rows)) if rows else len(h) for j, h in enumerate(head)]
    fmt = lambda r: "| " + " | ".join(c.ljust(w[j]) for j, c in enumerate(r)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [fmt(r) for r in rows])


def report(single: list[dict], ranks: list[dict], world: int, args) -> str:
    lines = [f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
             f"{datetime.date.today()}, global batch {args.batch}, {world} ranks × {args.threads} thread(s)", ""]
    rows = []
    for j, d in enumerate(ranks[0]["steps"]):
        one = single[0]["steps"][j % len(single[0]["steps"])]
        cpu = lambda key, j=j: statistics.mean(r["steps"][j][key] for r in ranks)  # noqa: E731
        rows.append([f"({one['stats_every']}, {one['inverse_every']}) {d['mode']}",
                     f"{one['sgd_wall_ms']:.0f}", f"{one['kfc_wall_ms']:.0f}",
                     f"{one['kfc_wall_ms'] / one['sgd_wall_ms']:.2f}× ({one['kfc_cpu_ms'] / one['sgd_cpu_ms']:.2f}×)",
                     f"{d['sgd_wall_ms']:.0f}", f"{d['kfc_wall_ms']:.0f}",
                     f"{d['kfc_wall_ms'] / d['sgd_wall_ms']:.2f}× ({cpu('kfc_cpu_ms') / cpu('sgd_cpu_ms'):.2f}×)"])
    lines.append(table(rows, ["(stats, inv)", "1 proc SGD ms", "1 proc KFC ms", "1 proc KFC ÷ SGD wall (cpu)",
                              f"DDP×{world} SGD ms", f"DDP×{world} KFC ms", f"DDP×{world} KFC ÷ SGD wall (cpu)"]))
    lines.append("")
    rows = []
    for d in ranks[0]["steps"]:
        for name, (calls, nbytes) in sorted(d["traffic"].items()):
            rows.append([f"({d['stats_every']}, {d['inverse_every']}) {d['mode']}", name, f"{calls:.3f}",
                         f"{nbytes / calls:,.0f}", f"{nbytes:,.0f}"])
        rows.append([f"({d['stats_every']}, {d['inverse_every']})", "DDP gradient all-reduce (for scale)", "1",
                     f"{d['ddp_grad_bytes']:,}", f"{d['ddp_grad_bytes']:,}"])
    lines.append(table(rows, ["(stats, inv)", "collective", "calls / step", "bytes / call", "bytes / step"]))
    lines.append("")
    rows = []
    for j, d in enumerate(ranks[0]["steps"]):
        one = single[0]["steps"][j % len(single[0]["steps"])]
        names = list(dict.fromkeys([*one["phases"], *d["phases"]]))
        for name in ["step (KFC)", "SGD step", *names]:
            def ms(x, name=name):
                if name == "step (KFC)":
                    return x["kfc_cpu_ms"]
                if name == "SGD step":
                    return x["sgd_cpu_ms"]
                return x["phases"].get(name, (0.0, 0.0))[1]
            rows.append([f"({d['stats_every']}, {d['inverse_every']}) {d['mode']}", name, f"{ms(one):.1f}",
                         *(f"{ms(r['steps'][j]):.1f}" for r in ranks)])
    lines.append(table(rows, ["(stats, inv)", "phase (CPU ms / step)", "1 proc",
                              *(f"DDP rank {r}" for r in range(world))]))
    lines.append("")
    one = single[0]["refresh"][0]
    rows = [["single process", "0", f"{one['wall_ms']:.1f}", f"{one['cpu_ms']:.1f}", "all", f"{one['nbytes']:,}",
             "1 / 1 / 1"]]
    for m in range(len(ranks[0]["refresh"])):
        for r, res in enumerate(ranks):
            x = res["refresh"][m]
            rows.append([x["mode"], str(r), f"{x['wall_ms']:.1f}", f"{x['cpu_ms']:.1f}",
                         "all" if x["owned"] is None else ",".join(x["owned"]), f"{x['nbytes']:,}",
                         f"{x['wall_ms'] / one['wall_ms']:.2f} / {x['cpu_ms'] / one['cpu_ms']:.2f} / "
                         f"{x['nbytes'] / one['nbytes']:.2f}"])
    lines.append(table(rows, ["inverse refresh", "rank", "wall ms", "cpu ms", "layers inverted",
                              "curvature bytes", "÷ single (wall / cpu / bytes)"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--model", choices=("paper", "resnet18"), default="paper")
    p.add_argument("--batch", type=int, help="global batch, split evenly over the ranks (default: 128 for the "
                   "paper net, 32 per rank for resnet18)")
    p.add_argument("--configs", default="1:20,10:100", help="stats_every:inverse_every pairs")
    p.add_argument("--rounds", type=int, default=2, help="windows of P steps per optimizer")
    p.add_argument("--refresh-reps", type=int, default=5)
    p.add_argument("--modes", default="broadcast,owner", help="distributed= settings to time the steps of")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    p.add_argument("--cpu", action="store_true", help="gloo on the CPU even when CUDA is available")
    p.add_argument("--json", help="also write the raw results here")
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = 128 if args.model == "paper" else 32 * args.nproc
    with tempfile.TemporaryDirectory() as out:
        single = launch(0, args, out)
        ranks = launch(args.nproc, args, out)
    print(report(single, ranks, args.nproc, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"single": single, "ranks": ranks, "args": vars(args)}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
