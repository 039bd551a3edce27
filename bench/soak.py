"""Soak test: a long KFC run on digits with faults injected at random (seeded) steps, against a clean run.

A small conv net (with a BatchNorm trained by the fallback and a dead branch whose Ω is singular) trains on
scikit-learn's bundled 8×8 digits for ``--steps`` steps with ``kc.KFC``. At random steps one fault of a random kind
is injected; every kind is injected at least once:

* ``nan_input_subset`` / ``nan_input_outside`` / ``inf_input``: NaN in the first example (inside the statistics
  subset), NaN in the last one, +inf in one pixel: the loss is not finite, the step is skipped;
* ``inf_loss``: the loss times inf; ``nan_grad_kfc`` / ``inf_grad_fallback``: a NaN in a KFC weight's gradient, an
  inf in the BatchNorm (fallback) gradient: skipped steps;
* ``nan_statistics``: the model output is NaN on the statistics subset only: the step's statistics are dropped;
* ``decomposition``: Cholesky and eigh fail in fp32 and fp64 at an inverse refresh: the layers keep their previous
  inverses; ``decomposition_fp32``: only fp32 fails: the fp64 retries succeed;
* ``spike``: every gradient ×1e6 (finite): clipping handles it, nothing is counted.

A fault is *counted* when ``opt.health`` changed by exactly what that kind must produce in that step, and
*recovered* when right after it the parameters, factors and inverses are finite and the next fault-free step is
applied. The clean run has the same seed, batches and options. Prints a table per damping method: faults
injected / counted / recovered by kind, non-finite parameter entries at the end (must be 0), the final training
loss of both runs and their wall time.

    .venv/bin/python bench/soak.py [--steps 1000] [--seed 0] [--rate 0.15] [--methods factored,eigen] [--threads 1]
        [--kfc-options JSON]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import time
import warnings
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.tools.demo.data import load_task

KINDS = ("nan_input_subset", "nan_input_outside", "inf_input", "inf_loss", "nan_grad_kfc", "inf_grad_fallback",
         "nan_statistics", "decomposition", "decomposition_fp32", "spike")
REFRESH_KINDS = ("decomposition", "decomposition_fp32")  # injected only on steps that refresh the inverses
# exact ν on the whole batch: on a quarter of it (the default), ν can be ~0 late in training where the softmax
# saturates on those examples, and a spike's clipped step is then followed by unclipped ones (docs/benchmarks.md)
# statistics on an explicit 1/8 (the defaults' floor would take 32 of the 64), so that the subset has its own size
OPTIONS = dict(lr=0.05, momentum=0.0, damping=1e-2, inverse_every=10, clip_fraction=1.0, stats_fraction=0.125)
BATCH, SUBSET = 64, 8  # the statistics subset: the first ceil(64/8) examples
POISON = {"statistics": False}


def poison_statistics(out: torch.Tensor) -> torch.Tensor:
    """NaN outputs on the statistics subset's forward (run inside opt.step()) while switched on."""
    return out * math.nan if POISON["statistics"] and out.shape[0] == SUBSET else out


torch.fx.wrap("poison_statistics")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.fc = nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Linear(16 * 16, 10)
        self.dead = nn.Linear(64, 10)  # its input is always 0: Ω is singular, damping makes it invertible

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
        return poison_statistics(self.fc(h.flatten(1)) + self.dead(x.flatten(1) * 0.0))


class Linalg:
    """``torch.linalg.cholesky_ex`` / ``eigh`` fail while ``mode`` is ``"all"`` (fp32 and fp64) or ``"fp32"``."""

    def __init__(self):
        self.mode = None
        self._chol, self._eigh = torch.linalg.cholesky_ex, torch.linalg.eigh

    def _fails(self, M):
        return self.mode == "all" or (self.mode == "fp32" and M.dtype == torch.float32)

    def cholesky_ex(self, M, *a, **k):
        L, info = self._chol(M, *a, **k)
        return (L, torch.ones_like(info)) if self._fails(M) else (L, info)

    def eigh(self, M, *a, **k):
        if self._fails(M):
            raise torch.linalg.LinAlgError("injected eigh failure")
        return self._eigh(M, *a, **k)

    @contextlib.contextmanager
    def installed(self):
        torch.linalg.cholesky_ex, torch.linalg.eigh = self.cholesky_ex, self.eigh
        try:
            yield self
        finally:
            torch.linalg.cholesky_ex, torch.linalg.eigh = self._chol, self._eigh


def plan(steps: int, rate: float, seed: int) -> dict[int, str]:
    """Step → fault kind, on every third step at most (a fault's recovery is judged at the next fault-free step).

    Every kind once, then more with probability ``rate`` per candidate step; refresh kinds wait at run time for a
    step that refreshes the inverses.
    """
    rng = random.Random(seed)
    candidates = range(5, steps - 5, 3)
    out = dict(zip(rng.sample(candidates, len(KINDS)), rng.sample(KINDS, len(KINDS)), strict=True))
    for k in candidates:
        if k not in out and rng.random() < rate:
            out[k] = rng.choice(KINDS)
    return out


def _counters(h: kc.Health) -> dict:
    return {"skip": dict(h.skipped_steps), "dropped": dict(h.dropped_statistics),
            "failed": dict(h.failed_decompositions), "retried": dict(h.retried_decompositions)}


def _delta(before: dict, after: dict) -> dict:
    out = {}
    for group in before:
        d = {k: after[group].get(k, 0) - before[group].get(k, 0) for k in after[group]}
        out[group] = {k: v for k, v in d.items() if v}
    return out


def expected(kind: str | None, layers: list[str]) -> dict:
    """What one fault of ``kind`` must change in ``opt.health`` (every step runs with a closure)."""
    out = {"skip": {}, "dropped": {}, "failed": {}, "retried": {}}
    if kind in ("nan_input_subset", "nan_input_outside", "inf_input", "inf_loss"):
        out["skip"] = {"loss": 1}
    elif kind in ("nan_grad_kfc", "inf_grad_fallback"):
        out["skip"] = {"gradient": 1}
    elif kind == "nan_statistics":
        out["dropped"] = dict.fromkeys(layers, 1)
    elif kind == "decomposition":
        out["failed"] = out["retried"] = dict.fromkeys(layers, 1)  # the fp32 try of Ω, then fp64: no Γ attempt
    elif kind == "decomposition_fp32":
        out["retried"] = dict.fromkeys(layers, 2)  # Ω and Γ, each redone in fp64
    return out


def _finite(model: nn.Module, opt: kc.KFC) -> bool:
    tensors = list(model.parameters())
    for s in opt.layer_states():
        tensors += [] if s.running is None else [s.running.A, s.running.G]
        tensors += [] if s.inverse is None else s.inverse.tensors()
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def run(steps: int, seed: int, faults: dict[int, str], method: str, options: dict | None = None) -> dict:
    """One run (``faults`` empty: the clean one); returns its counts, final loss and wall time.

    ``options`` override :data:`OPTIONS`. A run that ends with ``TrainingDivergedError`` reports it in ``"error"``
    (with the final loss of its finite parameters).
    """
    ds = load_task("digits")
    X, Y = ds.x_train, ds.y_train
    opts = {**OPTIONS, **(options or {})}
    torch.manual_seed(seed)
    model = Net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = kc.KFC(model, **opts, damping_method=method, generator=torch.Generator().manual_seed(seed))
    layers = [layer.name for layer in opt.layers]
    gen = torch.Generator().manual_seed(seed)
    injected, counted, recovered = Counter(), Counter(), Counter()
    pending: list[str] = []  # refresh kinds waiting for a refresh step
    awaiting: str | None = None  # a fault whose recovery is judged at the next fault-free step
    linalg = Linalg()
    start = time.perf_counter()
    error = None
    with linalg.installed(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for k in range(steps):
                idx = torch.randint(0, len(Y), (BATCH,), generator=gen)
                x, y = X[idx].clone(), Y[idx]
                kind = faults.get(k)
                if kind in REFRESH_KINDS:
                    pending.append(kind)
                    kind = None
                step = opt.steps + 1
                due = step <= 3 or step % opts["inverse_every"] == 0  # docs/algorithm.md §4.3
                if kind is None and pending and due and awaiting is None and faults.get(k + 1) is None:
                    kind = pending.pop(0)
                if kind == "nan_input_subset":
                    x[0] = math.nan
                elif kind == "nan_input_outside":
                    x[-1] = math.nan
                elif kind == "inf_input":
                    x[BATCH // 2, 0, 3, 3] = math.inf
                POISON["statistics"] = kind == "nan_statistics"
                linalg.mode = {"decomposition": "all", "decomposition_fp32": "fp32"}.get(kind)

                def closure(x=x, y=y, kind=kind):
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    if kind == "inf_loss":
                        loss = loss * math.inf
                    loss.backward()
                    if kind == "nan_grad_kfc":
                        model.c2.weight.grad[0, 0, 0, 0] = math.nan
                    elif kind == "inf_grad_fallback":
                        model.bn.weight.grad[0] = math.inf
                    elif kind == "spike":
                        for p in model.parameters():
                            p.grad.mul_(1e6)
                    return loss

                before = _counters(opt.health)
                opt.step(closure)
                POISON["statistics"], linalg.mode = False, None
                change = _delta(before, _counters(opt.health))
                if kind is not None:
                    injected[kind] += 1
                    counted[kind] += change == expected(kind, layers)
                    awaiting = kind if _finite(model, opt) else None
                elif awaiting is not None:
                    recovered[awaiting] += not opt.last_step.get("skipped") and _finite(model, opt)
                    awaiting = None
        except kc.TrainingDivergedError as e:  # the run ends; its parameters are finite
            error = f"TrainingDivergedError at applied step {opt.steps}: {str(e).split('. ')[0]}"
        finally:
            POISON["statistics"] = False

    wall = time.perf_counter() - start
    with torch.no_grad():
        model.eval()
        final = F.cross_entropy(model(X), Y).item()
    bad = sum(int((~torch.isfinite(p)).sum()) for p in model.parameters())
    return {"injected": injected, "counted": counted, "recovered": recovered, "final": final, "wall": wall,
            "non_finite": bad, "health": str(opt.health), "steps": opt.steps, "error": error}


def soak(steps: int = 1000, seed: int = 0, rate: float = 0.15, method: str = "factored",
         options: dict | None = None) -> dict:
    """The faulty and the clean run of one damping method: ``{"faulty": run(...), "clean": run(...)}``."""
    faults = plan(steps, rate, seed)
    return {"faulty": run(steps, seed, faults, method, options), "clean": run(steps, seed, {}, method, options)}


def table(result: dict, method: str) -> str:
    f, c = result["faulty"], result["clean"]
    lines = [f"damping_method={method!r}", "| fault | injected | counted | recovered |", "|---|---:|---:|---:|"]
    for kind in KINDS:
        lines.append(f"| {kind} | {f['injected'][kind]} | {f['counted'][kind]} | {f['recovered'][kind]} |")
    tot = [sum(f[k].values()) for k in ("injected", "counted", "recovered")]
    lines.append(f"| **all** | {tot[0]} | {tot[1]} | {tot[2]} |")
    lines += ["", "| run | applied steps | non-finite parameter entries | final training loss | wall s |",
              "|---|---:|---:|---:|---:|",
              f"| faulty | {f['steps']} | {f['non_finite']} | {f['final']:.2e} | {f['wall']:.1f} |",
              f"| clean | {c['steps']} | {c['non_finite']} | {c['final']:.2e} | {c['wall']:.1f} |",
              "", f"health: {f['health']}"]
    lines += [f"{name} run: {r['error']}" for name, r in (("faulty", f), ("clean", c)) if r["error"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rate", type=float, default=0.15, help="chance of an extra fault at every third step")
    p.add_argument("--methods", default="factored,eigen")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kfc-options", default="{}", help="JSON dict overriding the KFC options, e.g. "
                                                         "'{\"clip_fraction\": 0.25}'")
    a = p.parse_args()
    if a.steps < 3 * len(KINDS) + 10:
        p.error(f"--steps must be at least {3 * len(KINDS) + 10} (every kind is injected once)")
    torch.set_num_threads(a.threads)
    options = json.loads(a.kfc_options)
    print(f"# bench/soak.py --steps {a.steps} --seed {a.seed} --rate {a.rate}; torch {torch.__version__}, "
          f"{a.threads} thread(s); KFC {({**OPTIONS, **options})}")
    for method in a.methods.split(","):
        print()
        print(table(soak(a.steps, a.seed, a.rate, method, options), method))


if __name__ == "__main__":
    main()
