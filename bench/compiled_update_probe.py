#!/usr/bin/env python
"""What compiling KFC's per-step update would save: a probe, not a code path of the optimizer (issue 17).

On the 8-layer tanh autoencoder of ``bench/step_breakdown.py`` (KFC-pre with the factored ν, after 3 steps) the
probe writes the per-step update of every layer as one function of tensors — ∇h matrices, Γ⁻¹GΩ⁻¹, ν = lr²⟨F̂⁻¹∇h,
∇h⟩, the clipping scale, the finite check, the momentum buffers — and times it eagerly and under
``torch.compile`` (inductor, static shapes; lr, μ and the clip threshold as 0-d tensors so a scheduler would not
recompile), next to the optimizer's own eager preconditioning + update (``est.precondition`` + the momentum step),
all in process CPU time on one thread, and the compile time. It checks the compiled result equals the eager one.

    OMP_NUM_THREADS=1 .venv/bin/python bench/compiled_update_probe.py
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
from kfc_compile.optim.rules import momentum_step_  # noqa: E402


def update(gWs, gbs, Ginvs, Ainvs, bufs, lr, mu, clip):
    """The per-step work of KFC-pre (factored ν) on dense single-group layers with biases, as tensors."""
    nats, grads = [], []
    for gW, gb, Gi, Ai in zip(gWs, gbs, Ginvs, Ainvs, strict=True):
        U = Gi[0] @ torch.cat([gW, gb[:, None]], 1) @ Ai[0]
        nats += [U[:, :-1], U[:, -1]]
        grads += [gW, gb]
    nu = lr * lr * sum((a.double() * b.double()).sum() for a, b in zip(nats, grads, strict=True))
    scale = torch.where(nu > clip, torch.sqrt(clip / nu), torch.ones_like(nu))
    finite = torch.stack([torch.isfinite(n).all() for n in nats]).all()
    return [mu * b - (lr * scale) * n for b, n in zip(bufs, nats, strict=True)], nu, finite


def timed(fn, n: int = 300) -> float:
    fn()
    t = time.process_time()
    for _ in range(n):
        fn()
    return 1e3 * (time.process_time() - t) / n


def main() -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model, data = sb.autoencoder(), sb.batches("autoenc")
    opt = kc.KFC(model, lr=1e-3, loss="mse", clip_curvature="factored")
    sb.Stepper(model, opt, data, sb.loss_fn("autoenc"), False).run(3)
    x, y = data[0]
    sb.loss_fn("autoenc")(model(x), y).backward()
    est = opt._estimator
    layers = [s.layer for s in est.states]
    params = [p for layer in layers for p in (layer.weight, layer.bias)]
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in params]
    args = ([la.weight.grad for la in layers], [la.bias.grad for la in layers],
            [s.inverse.Ginv for s in est.states], [s.inverse.Ainv for s in est.states], bufs,
            torch.tensor(1e-3, dtype=torch.float64), torch.tensor(0.9), torch.tensor(0.3, dtype=torch.float64))

    def optimizer_path():
        with torch.no_grad():
            nat = est.precondition(0.0)
            momentum_step_([p.detach().clone() for p in params], [b.clone() for b in bufs],
                           [-1e-3 * nat[p] for p in params], 0.9, None)

    eager_fn = timed(lambda: update(*args))
    t = time.perf_counter()
    compiled = torch.compile(update, dynamic=False)
    out = compiled(*args)
    compile_s = time.perf_counter() - t
    ref = update(*args)
    same = all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(out[0], ref[0], strict=True))
    print(f"optimizer's eager preconditioning + momentum: {timed(optimizer_path):.3f} ms/step (incl. copies of θ, p)")
    print(f"the same work as one eager function:          {eager_fn:.3f} ms/step")
    print(f"that function compiled (inductor):            {timed(lambda: compiled(*args)):.3f} ms/step "
          f"(compile {compile_s:.1f} s, equal to eager: {same})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
