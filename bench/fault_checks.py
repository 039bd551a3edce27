"""What the fault checks of ``kc.KFC`` cost per step, next to the step itself (process CPU ms, one process).

On the KFC paper's CIFAR-10 net (batch 128, 3×32×32, synthetic data), after 4 warm-up steps, each check is timed
alone on the real tensors of a step:

* every step: the gradients' finiteness (KFC and fallback parameters), F̂⁻¹∇h's, the snapshot of the model's
  floating-point buffers;
* statistics steps: the batch factors' finiteness (every layer, one host sync), the epilogue bound on each layer
  input of the 1/8 statistics subset, and the moving average of Ω that in-pass capture now does after the step's
  checks (an axpy over Ω) instead of in the kernel epilogue;

and the whole KFC step (defaults: statistics every step, inverses every 20).

    .venv/bin/python bench/fault_checks.py [--threads 1] [--repeats 50]
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
from kfc_compile.curvature.guard import finite_flags  # noqa: E402
from kfc_compile.curvature.statistics import products_are_finite  # noqa: E402
from kfc_compile.optim.safety import _non_finite_and_unscale_  # noqa: E402
from kfc_compile.tools.demo.models import paper_cifar_net  # noqa: E402


def cpu_ms(f, n: int) -> float:
    f()
    t = time.process_time()
    for _ in range(n):
        f()
    return (time.process_time() - t) / n * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=50)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = paper_cifar_net()
    x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    opt = kc.KFC(model, lr=1e-3)

    def step():
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(4):
        step()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    grads = [q.grad for g in opt.param_groups for q in g["params"] if q.grad is not None]
    nat = opt._estimator.precondition(0.0)
    states = opt.layer_states()
    inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach())) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    model(x[:16])
    for h in hooks:
        h.remove()
    batch_A = [s.running.A.clone() for s in states]
    rows = [
        ("every step: gradients finite", cpu_ms(lambda: _non_finite_and_unscale_(grads, 1.0), a.repeats)),
        ("every step: F̂⁻¹∇h finite", cpu_ms(lambda: finite_flags([list(nat.values())]), a.repeats)),
        ("every step: buffer snapshot", cpu_ms(opt._buffers.take, a.repeats)),
        ("statistics step: batch factors finite", cpu_ms(
            lambda: finite_flags([(s.running.A, s.running.G) for s in states]), a.repeats)),
        ("statistics step: epilogue bound, every layer input", cpu_ms(
            lambda: [products_are_finite(t, s.layer.a_dim, torch.float32) for t, s in zip(inputs, states,
                                                                                        strict=True)], a.repeats)),
        ("in-pass statistics step: Ω moving average after the checks", cpu_ms(
            lambda: [s.running.A.mul_(1.0).add_(b, alpha=0.0) for s, b in zip(states, batch_A, strict=True)],
            a.repeats)),
        ("the whole KFC step (defaults)", cpu_ms(step, max(5, a.repeats // 10))),
    ]
    print(f"# paper CIFAR-10 net, batch 128, {sum(q.numel() for q in model.parameters()):,} parameters, Ω sizes "
          f"{[s.running.A.shape[-1] for s in states]}; torch {torch.__version__}, {a.threads} thread(s)")
    print("| check | CPU ms |")
    print("|---|---:|")
    for name, ms in rows:
        print(f"| {name} | {ms:.3f} |")


if __name__ == "__main__":
    main()
