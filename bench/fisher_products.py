#!/usr/bin/env python
"""Exact Fisher products of two directions (the adaptive rule's): one batched pass against one pass per direction.

On the models of ``bench/step_breakdown.py`` (paper net, digits conv net, 8-layer autoencoder), the first 32 examples
of a batch, two random directions over all parameters: ``FisherProducts.outputs_and_jvps`` with ``batched`` forced
on (``vmap`` over ``jvp``) and off, alternating, process CPU time on one thread, and the largest difference of the
results (fp32).

    OMP_NUM_THREADS=1 .venv/bin/python bench/fisher_products.py
"""
from __future__ import annotations

import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import step_breakdown as sb  # noqa: E402

import kfc_compile as kc  # noqa: E402


def main() -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    for name, reps in (("autoenc", 50), ("digits", 50), ("paper", 10)):
        torch.manual_seed(0)
        model = sb.MODELS[name][0]()
        x, _ = sb.batches(name)[0]
        opt = kc.KFC(model, lr=1e-3, loss="mse" if name == "autoenc" else "cross_entropy")
        products = opt._exact_gram.products
        dirs = [{p: torch.randn_like(p) for p in products.model.parameters()} for _ in range(2)]
        t = {True: 0.0, False: 0.0}
        out = {}
        for _ in range(4):
            for batched in (True, False):
                products.batched = batched
                products.outputs_and_jvps((x[:32],), dirs)  # warm
                t0 = time.process_time()
                for _ in range(reps):
                    out[batched] = products.outputs_and_jvps((x[:32],), dirs)
                t[batched] += time.process_time() - t0
        diff = max(float((a - b).abs().max()) for a, b in zip(out[True][1], out[False][1], strict=True))
        print(f"{name:8s} one batched pass {1e3 * t[True] / (4 * reps):7.2f} ms, one pass per direction "
              f"{1e3 * t[False] / (4 * reps):7.2f} ms, ratio {t[True] / t[False]:.2f}, max |difference| {diff:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
