#!/usr/bin/env python
"""What compiling KFC's per-step update would save: a probe, not a code path of the optimizer (issue 17).

On the 8-layer tanh autoencoder of ``bench/step_breakdown.py`` (KFC-pre with the factored ν, after 3 steps) the
probe writes the per-step update of every layer as one function of tensors — ∇h matrices, Γ⁻¹GΩ⁻¹, ν = lr²⟨F̂⁻¹∇h,
∇h⟩, the clipping scale, the finite check, the momentum buffers — and times it eagerly and under
``torch.compile`` (inductor, static shapes; lr, μ and the clip threshold as 0-d tensors so a scheduler would not
recompile), next to the optimizer's own eager preconditioning + update (``est.precondition`` + the momentum step),
all in process CPU time on one thread, and the compile time. It checks the compiled result equals the eager one.

``--ab``: the optimizer's own three paths on whole training steps (forward + backward + ``opt.step()``), in one
run, alternating windows of P = lcm(stats, inverses) steps after warm-up: ``old`` (``updates.pre_update`` with
the per-tensor preconditioning: the fused path switched off), ``fused`` (``optim/fused_update.py``, eager, the
default) and ``compiled`` (``KFC(compile_update=True)``; its compile time is reported apart, from the first
steps). Ratios are within one run.

    OMP_NUM_THREADS=1 .venv/bin/python bench/compiled_update_probe.py
    OMP_NUM_THREADS=1 .venv/bin/python bench/compiled_update_probe.py --ab --models autoenc,digits,paper
"""
from __future__ import annotations

import argparse
import copy
import math
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


ARMS = ("old", "fused", "compiled")
CONFIGS = ((1, 20), (10, 100))


def ab_one(name: str, variant: str, s: int, i: int, rounds: int) -> dict:
    """Whole-step CPU ms of the three arms on one model / variant / (stats, inverses), and the compile time."""
    torch.manual_seed(0)
    m = sb.MODELS[name][0]()
    data, lossf = sb.batches(name), sb.loss_fn(name)
    loss = "mse" if sb.MODELS[name][3] == "mse" else "cross_entropy"
    kw = dict(momentum=0.9, stats_every=s, inverse_every=i, loss=loss, **sb.VARIANTS[variant])
    models = [copy.deepcopy(m) for _ in ARMS]
    opts = [kc.KFC(mm, compile_update=arm == "compiled", **kw) for mm, arm in zip(models, ARMS, strict=True)]
    opts[0]._fused._off = "bench: the old path"
    steppers = [sb.Stepper(mm, o, data, lossf, False) for mm, o in zip(models, opts, strict=True)]
    warm = [st.run(sb.WARMUP) for st in steppers]  # the compiled arm compiles here
    for st in steppers:
        st.step_t = 0.0
    P = math.lcm(s, i)
    t = [0.0] * len(ARMS)
    for r in range(rounds):
        order = range(len(ARMS)) if r % 2 == 0 else reversed(range(len(ARMS)))
        for j in order:
            t[j] += steppers[j].run(P)
    n = rounds * P
    taken = [any(not isinstance(p, str) for p in o._fused._plans.values()) for o in opts]
    return {"model": name, "variant": variant, "s": s, "i": i, "steps": n, "taken": taken,
            "ms": [1e3 * x / n for x in t], "step_ms": [1e3 * st.step_t / n for st in steppers],
            "compile_s": warm[2] - warm[1]}


def ab(models: list[str], variants: list[str], rounds: int, paper_rounds: int) -> None:
    print("| model | variant | (stats, inv) | steps each | old ms | fused ms | compiled ms | fused ÷ old | "
          "compiled ÷ fused | opt.step old / fused / compiled ms | compile s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for name in models:
        for variant in variants:
            for s, i in CONFIGS:
                rr = paper_rounds if name == "paper" else rounds
                r = ab_one(name, variant, s, i, rr)
                old, fused, comp = r["ms"]
                so, sf, sc = r["step_ms"]
                print(f"| {name} | {variant} | ({s}, {i}) | {r['steps']} | {old:.2f} | {fused:.2f} | {comp:.2f} | "
                      f"{fused / old:.3f} | {comp / fused:.3f} | {so:.2f} / {sf:.2f} / {sc:.2f} | "
                      f"{r['compile_s']:.1f} |" + ("" if all(r["taken"][1:]) else " (fused path not taken)"),
                      flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ab", action="store_true", help="old vs fused vs compiled on whole training steps")
    ap.add_argument("--models", default="autoenc,digits,paper")
    ap.add_argument("--variants", default="pre,pre-fact")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--paper-rounds", type=int, default=1)
    args = ap.parse_args(argv)
    if args.ab:
        torch.set_num_threads(1)
        warnings.simplefilter("ignore")
        ab(args.models.split(","), args.variants.split(","), args.rounds, args.paper_rounds)
        return 0
    return probe()


def probe() -> int:
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
