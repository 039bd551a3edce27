"""Micro-benchmark of issue 17's two per-call overheads: the exact Fisher products' module walks, record's autocast.

Per call, this code against ``overhead_baseline.PER_CALL``'s old code in the same run (alternating, CPU time, one
thread): ``FisherProducts.outputs_and_jvps`` with one direction on the 8-layer autoencoder (batch 128), and the
taps' autocast context alone (``no_autocast`` against ``autocast(enabled=False)``) outside autocast.

    OMP_NUM_THREADS=1 .venv/bin/python bench/percall_micro.py
"""
from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from overhead_baseline import FVP_WALK, RECORD_AUTOCAST, applied  # noqa: E402
from step_breakdown import autoencoder  # noqa: E402

from kfc_compile.optim.fvp import FisherProducts  # noqa: E402
from kfc_compile.runtime import state  # noqa: E402


def per_call_us(fn, patches, n: int, rounds: int = 6) -> tuple[float, float]:
    """CPU µs per call of ``fn`` now and with ``patches`` applied, alternating order per round."""
    t = [0.0, 0.0]
    for r in range(rounds):
        for j in ((0, 1) if r % 2 == 0 else (1, 0)):
            with applied(patches if j else ()):
                fn()
                t0 = time.process_time()
                for _ in range(n):
                    fn()
                t[j] += time.process_time() - t0
    return tuple(1e6 * v / (n * rounds) for v in t)


def main() -> int:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = autoencoder()
    x = torch.randn(128, 40)
    products = FisherProducts(model, None)
    direction = [{p: torch.randn_like(p) for p in model.parameters()}]
    now, old = per_call_us(lambda: products.outputs_and_jvps((x,), direction), FVP_WALK, 200)
    print(f"outputs_and_jvps, 1 direction: now {now:.1f} us, before {old:.1f} us, saved {old - now:.1f} us "
          f"(now/before {now / old:.3f})")

    def enter():
        with state.no_autocast("cpu"):
            pass

    now, old = per_call_us(enter, RECORD_AUTOCAST, 20000)
    print(f"record's autocast context: now {now:.2f} us, before {old:.2f} us per call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
