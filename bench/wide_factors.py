"""Cost of one wide layer under KFC with dense vs block-diagonal factors (``kc.KFC(max_factor_dim=...)``).

A single ``nn.Linear(IN, OUT)`` (default 9216 → 4096, AlexNet's first classifier layer; VGG's is 25088 → 4096) is
trained with KFC on a random batch; for each ``max_factor_dim`` (``none`` = dense) the script reports, in process
CPU seconds (this machine is shared), the first step (statistics + every inverse) and the median of the
steady-state steps (statistics + preconditioning, no inverse), the bytes of the factors and inverses, and their
ratios to the dense run of the same invocation.

    .venv/bin/python bench/wide_factors.py [--in 9216] [--out 4096] [--batch 32] [--caps none,8192,4096,2048,1024]
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from torch import nn

import kfc_compile as kc
from kfc_compile.tools.zoo import factor_bytes, machine


def run(cap: int | None, d_in: int, d_out: int, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d_in, d_out))
    x, y = torch.randn(batch, d_in), torch.randint(0, d_out, (batch,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kc.KFC(model, lr=1e-3, damping=1e-2, fisher="empirical", stats_fraction=1.0, clip=None,
                     max_factor_dim=cap)
    times = []
    for _ in range(steps):
        t = time.process_time()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - t)
    return {"first": times[0], "steady": statistics.median(times[3:]), "bytes": factor_bytes(opt)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--in", dest="d_in", type=int, default=9216)
    p.add_argument("--out", dest="d_out", type=int, default=4096)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="steps per run (steps 1-3 recompute the inverses)")
    p.add_argument("--caps", default="none,8192,4096,2048,1024")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    if a.steps < 4:
        p.error("--steps must be at least 4 (steady-state steps start at step 4)")
    torch.set_num_threads(a.threads)
    caps = [None if c.strip().lower() == "none" else int(c) for c in a.caps.split(",")]
    print(f"# {machine()}, {a.threads} thread(s); Linear({a.d_in}, {a.d_out}), batch {a.batch}; process CPU s")
    print("| max_factor_dim | first step s | steady step s | factor MiB | first ÷ dense | steady ÷ dense | "
          "memory ÷ dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = None
    for cap in caps:
        r = run(cap, a.d_in, a.d_out, a.batch, a.steps)
        base = base or (r if cap is None else None)
        rel = {k: f"{r[k] / base[k]:.3f}" if base else "n/a" for k in ("first", "steady", "bytes")}
        print(f"| {cap or 'dense'} | {r['first']:.2f} | {r['steady']:.3f} | {r['bytes'] / 2**20:.0f} | "
              f"{rel['first']} | {rel['steady']} | {rel['bytes']} |", flush=True)


if __name__ == "__main__":
    main()
