"""Training runs, learning-rate tuning and time-to-target measurement for the demo and the benchmarks.

Timing covers only training (building the optimizer, which instruments the model for KFC, then the steps with
their batch gathering); the periodic evaluation of the training loss on a fixed set of training examples is
excluded from the clock. "Steps to target" is the first evaluation step at which that loss is ≤ the target.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kfc_compile.demo.data import Dataset, DemoError
from kfc_compile.demo.models import build_model

log = logging.getLogger(__name__)

OPTIMIZERS = ("kfc", "sgd", "adam")
LABELS = {"kfc": "KFC-pre", "sgd": "SGD+momentum", "adam": "Adam"}
# Learning-rate grids (the paper's grid is {0.3, 0.1, ..., 0.0003}; these are the parts that matter here).
GRIDS = {"kfc": (0.3, 0.1, 0.03), "sgd": (0.3, 0.1, 0.03), "adam": (1e-2, 3e-3, 1e-3)}
EVAL_EXAMPLES = 4096  # training examples used for the training-loss curve (all of them for digits / MNIST-1D)


@dataclass(frozen=True)
class TaskSettings:
    steps: int
    batch_size: int
    target: float  # training loss
    eval_every: int


TASK_SETTINGS = {
    "digits": TaskSettings(steps=300, batch_size=128, target=0.05, eval_every=5),
    "mnist1d": TaskSettings(steps=600, batch_size=128, target=0.3, eval_every=10),
    "cifar10": TaskSettings(steps=1000, batch_size=128, target=1.0, eval_every=50),
}


@dataclass
class RunResult:
    """One training run: the training-loss curve against steps and seconds, and the test accuracy."""

    optimizer: str
    lr: float
    seed: int
    target: float
    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    test_acc: float | None = None
    diverged: bool = False

    @property
    def label(self) -> str:
        return LABELS.get(self.optimizer, self.optimizer)

    @property
    def final_loss(self) -> float:
        return self.train_loss[-1] if self.train_loss and not self.diverged else math.inf

    def _hit(self) -> int | None:
        for i, v in enumerate(self.train_loss):
            if v <= self.target:
                return i
        return None

    @property
    def steps_to_target(self) -> int | None:
        i = self._hit()
        return None if i is None else self.steps[i]

    @property
    def seconds_to_target(self) -> float | None:
        i = self._hit()
        return None if i is None else self.seconds[i]

    def tuning_key(self) -> tuple:
        """Smaller is better: reaching the target in fewer steps, else a lower last training loss; among diverged
        runs the smallest learning rate."""
        s = self.steps_to_target
        if s is not None:
            return (0, s, self.seconds_to_target)
        return (1, self.final_loss, 0.0) if not self.diverged else (2, self.lr, 0.0)


def make_optimizer(name: str, model: nn.Module, lr: float, kfc_options: dict | None = None):
    """``kfc`` → ``kc.KFC`` (KFC-pre; instruments ``model`` in place), ``sgd`` → SGD with momentum 0.9, ``adam``."""
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "kfc":
        import kfc_compile as kc

        if not hasattr(kc, "KFC"):
            raise DemoError("kfc_compile.KFC is not available in this build")
        return kc.KFC(model, lr=lr, **{"momentum": 0.9, **(kfc_options or {})})
    raise DemoError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024):
    """(mean cross-entropy, accuracy) of ``model`` on stored examples ``x``, ``y`` (eval mode)."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(ds.prepare(x[i:i + chunk]))
        total += F.cross_entropy(out, y[i:i + chunk], reduction="sum").item()
        correct += (out.argmax(1) == y[i:i + chunk]).sum().item()
    model.train(was_training)
    return total / len(y), correct / len(y)


class _Batches:
    """Shuffled mini-batches without replacement, epoch after epoch, from a private generator."""

    def __init__(self, n: int, batch_size: int, seed: int):
        if batch_size > n:
            raise DemoError(f"batch size {batch_size} is larger than the training set ({n} examples)")
        self.n, self.b = n, batch_size
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(n, generator=self.gen), 0

    def next(self) -> torch.Tensor:
        if self.pos + self.b > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos:self.pos + self.b]
        self.pos += self.b
        return idx


def train_run(ds: Dataset, model_name: str, opt_name: str, lr: float, *, steps: int, batch_size: int,
              target: float, eval_every: int, seed: int = 0, stop_at_target: bool = False,
              kfc_options: dict | None = None, test: bool = True, bar=None) -> RunResult:
    """Train a fresh ``model_name`` (initialised from ``seed``) with ``opt_name`` for ``steps`` steps.

    The training loss on (up to ``EVAL_EXAMPLES``) training examples is recorded every ``eval_every`` steps and
    at the end. ``stop_at_target`` ends the run at the first evaluation that reaches ``target``; a non-finite or
    exploding loss ends it as diverged. ``bar`` (a tqdm bar) is advanced by ``steps`` in total.
    """
    torch.manual_seed(seed)
    model = build_model(model_name, ds.name, ds.input_shape, ds.num_classes)
    batches = _Batches(len(ds.y_train), batch_size, seed + 1)
    ev_x, ev_y = ds.x_train[:EVAL_EXAMPLES], ds.y_train[:EVAL_EXAMPLES]
    res = RunResult(opt_name, lr, seed, target)
    loss0, _ = evaluate(model, ds, ev_x, ev_y)
    res.steps.append(0), res.seconds.append(0.0), res.train_loss.append(loss0)

    clock = 0.0
    t0 = time.perf_counter()
    opt = make_optimizer(opt_name, model, lr, kfc_options)
    model.train()
    done = 0
    while done < steps:
        chunk = min(eval_every, steps - done)
        try:
            for _ in range(chunk):
                idx = batches.next()
                x, y = ds.prepare(ds.x_train[idx]), ds.y_train[idx]
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            last = loss.item()
        except RuntimeError as e:  # e.g. sampling targets from a non-finite output: divergence, not a bug
            if all(torch.isfinite(p).all() for p in model.parameters()) and torch.isfinite(loss).all():
                raise
            log.info("%s lr=%g: step failed on non-finite values (%s)", opt_name, lr, str(e).splitlines()[0])
            last = math.nan
        clock += time.perf_counter() - t0
        done += chunk
        if bar is not None:
            bar.update(chunk)
        ev, _ = evaluate(model, ds, ev_x, ev_y)
        res.steps.append(done), res.seconds.append(clock), res.train_loss.append(ev)
        if not (math.isfinite(last) and math.isfinite(ev)) or ev > 3 * loss0 + 1:
            res.diverged = True
            log.info("%s lr=%g diverged at step %d (loss %.3g)", opt_name, lr, done, ev)
            break
        if stop_at_target and ev <= target:
            break
        t0 = time.perf_counter()
    if bar is not None and done < steps:
        bar.update(steps - done)
    if test and not res.diverged:
        _, res.test_acc = evaluate(model, ds, ds.x_test, ds.y_test)
    log.info("%s lr=%g: %d steps, %.2fs, train loss %.4g, steps to target %s", opt_name, lr, done, clock,
             res.train_loss[-1], res.steps_to_target)
    return res


def tune_lr(ds: Dataset, model_name: str, opt_name: str, grid: Sequence[float], *, steps: int, **kw
            ) -> tuple[float, list[RunResult]]:
    """Short runs over ``grid`` (stopping at the target); returns the best learning rate and the runs."""
    if not grid:
        raise DemoError(f"empty learning-rate grid for {opt_name}")
    runs = [train_run(ds, model_name, opt_name, lr, steps=steps, stop_at_target=True, test=False, **kw)
            for lr in grid]
    best = min(runs, key=RunResult.tuning_key)
    log.info("%s: picked lr=%g from %s", opt_name, best.lr, list(grid))
    return best.lr, runs
