#!/usr/bin/env python
"""How the inverse cost models split a model's refresh over ranks: CPU time and curvature bytes per owner.

One process, one thread: ``kc.KFC`` defaults on torchvision's resnet18 (10 classes, 3×32×32 synthetic inputs) or
the paper's CIFAR-10 net, one statistics step on a batch of ``--batch``, then every layer's inverse computed alone
(``guard.refresh_layer``, process CPU time). Prints the share of the summed time and of the curvature bytes each
rank would own under ``sharding.assign`` with the stored d³ (``inverse_cost``) and the live-block cost
(``live_cost``, read from the inverses just computed).

    .venv/bin/python bench/refresh_balance.py --model resnet18 --nproc 2
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import kfc_compile as kc  # noqa: E402
from kfc_compile.curvature.guard import refresh_layer  # noqa: E402
from kfc_compile.curvature.sharding import assign, inverse_cost, live_cost  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("paper", "resnet18"), default="resnet18")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.model == "resnet18":
        import torchvision

        model = torchvision.models.resnet18(num_classes=10)
    else:
        from kfc_compile.tools.demo.models import paper_cifar_net

        model = paper_cifar_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kc.KFC(model, lr=1e-3, inverse_every=10 ** 6)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    states = opt.layer_states()
    cpu = {}
    for s in states:
        c = time.process_time()
        refresh_layer(s, True, 1e-3, 1.0, "factored", opt.health, None)
        cpu[s.name] = time.process_time() - c
    total_b = opt.curvature_nbytes()
    print(f"{args.model}, batch {args.batch}, {len(states)} layers, refresh {1e3 * sum(cpu.values()):.0f} CPU ms")
    for label, costs in (("stored d³", [inverse_cost(s.layout) for s in states]),
                         ("live³", [live_cost(s) for s in states])):
        own = assign(costs, args.nproc)
        t = [sum(cpu[s.name] for s, o in zip(states, own, strict=True) if o == r) / sum(cpu.values())
             for r in range(args.nproc)]
        b = [sum(s.nbytes() for s, o in zip(states, own, strict=True) if o == r) / total_b for r in range(args.nproc)]
        print(f"{label}: refresh CPU share {' / '.join(f'{v:.3f}' for v in t)}; "
              f"bytes share {' / '.join(f'{v:.3f}' for v in b)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
