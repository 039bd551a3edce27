"""Training runs, learning-rate tuning and time-to-target measurement for the demo and the benchmarks.

Timing covers only training (building the optimizer, which instruments the model for KFC, then the steps with
their batch gathering) in process CPU time (``time.process_time``: run with one torch thread, as the CLI and the
benchmarks do, so that it is the work of the steps and not the machine's load); the periodic evaluation of the
training loss on a fixed set of training examples is excluded from the clock. "Steps to target" is the first
evaluation step at which that loss is ≤ the target.
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

import kfc_compile as kc
from kfc_compile.tools.demo.data import Dataset, DemoError
from kfc_compile.tools.demo.models import build_model

log = logging.getLogger(__name__)

OPTIMIZERS = ("kfc", "sgd", "adam")
LABELS = {"kfc": "KFC-pre", "sgd": "SGD+momentum", "adam": "Adam"}
# Learning-rate grids. KFC's is the documented grid of kc.KFC's defaults (README, docs/benchmarks.md "Time to target
# (issue 17)"): with the trust region ν ≤ 30·lr of the applied step (also with the LM-damping recipe, round 2),
# 1e-2 … 1e-3 reach the target on every task of bench/time_to_target.py and none diverges. SGD / Adam: parts of the
# paper's {0.3, 0.1, ..., 0.0003} around what the bench picks (SGD 0.1–0.3, Adam 1e-2–3e-2).
GRIDS = {"kfc": (1e-2, 3e-3, 1e-3), "sgd": (0.3, 0.1, 0.03), "adam": (3e-2, 1e-2, 3e-3)}
# KFC-pre's periods for the demo (the paper chose T_s, T_f for runtime only): statistics every 5 steps, inverses
# every 10 take the same number of steps to the target as (1, 20) here at half the step time.
KFC_OPTIONS = {"stats_every": 5, "inverse_every": 10}
EVAL_EXAMPLES = 4096  # training examples used for the training-loss curve (all of them for digits / MNIST-1D)


@dataclass(frozen=True)
class TaskSettings:
    """A task's demo defaults: training steps, batch size, target training loss, steps between evaluations."""

    steps: int
    batch_size: int
    target: float  # training loss
    eval_every: int


TASK_SETTINGS = {
    "digits": TaskSettings(steps=200, batch_size=128, target=1e-3, eval_every=5),
    "mnist1d": TaskSettings(steps=600, batch_size=128, target=0.1, eval_every=10),
    "mnist1d_ae": TaskSettings(steps=1000, batch_size=128, target=0.3, eval_every=20),  # MSE; SGD/Adam plateau ≈ 0.25
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
        """The optimizer's display name (``LABELS``)."""
        return LABELS.get(self.optimizer, self.optimizer)

    @property
    def final_loss(self) -> float:
        """The last training loss; inf when the run diverged or recorded none."""
        return self.train_loss[-1] if self.train_loss and not self.diverged else math.inf

    def _hit(self) -> int | None:
        for i, v in enumerate(self.train_loss):
            if v <= self.target:
                return i
        return None

    @property
    def steps_to_target(self) -> int | None:
        """The first evaluated step at which the training loss reached the target; None if it never did."""
        i = self._hit()
        return None if i is None else self.steps[i]

    @property
    def seconds_to_target(self) -> float | None:
        """Training seconds until the training loss reached the target; None if it never did."""
        i = self._hit()
        return None if i is None else self.seconds[i]

    def tuning_key(self) -> tuple:
        """Smaller is better: the sort key that picks the best of the tuning runs.

        Reaching the target in fewer steps, else a lower last training loss; among diverged runs the smallest
        learning rate.
        """
        s = self.steps_to_target
        if s is not None:
            return (0, s, self.seconds_to_target)
        return (1, self.final_loss, 0.0) if not self.diverged else (2, self.lr, 0.0)


def make_optimizer(name: str, model: nn.Module, lr: float, kfc_options: dict | None = None,
                   loss: str = "cross_entropy"):
    """``kfc`` → ``kc.KFC`` (its defaults, instruments ``model`` in place), ``sgd`` → SGD with momentum 0.9, ``adam``.

    ``loss`` is the task's training loss (KFC's Fisher follows it).
    """
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "kfc":
        return kc.KFC(model, lr=lr, **{"loss": loss, **(kfc_options or {})})
    raise DemoError(f"unknown optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}")


def task_loss(ds: Dataset, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The task's training loss: cross-entropy on labels, or the mean squared error per output element."""
    if ds.loss == "mse":
        return F.mse_loss(out, y, reduction=reduction) / (out[0].numel() if reduction == "sum" else 1)
    return F.cross_entropy(out, y, reduction=reduction)


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, x: torch.Tensor, y: torch.Tensor, chunk: int = 1024):
    """(mean training loss, accuracy or None for a regression task) of ``model`` on ``x``, ``y`` (eval mode)."""
    was_training = model.training
    model.eval()
    total, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = model(ds.prepare(x[i:i + chunk]))
        total += task_loss(ds, out, y[i:i + chunk], "sum").item()
        if ds.loss != "mse":
            correct += (out.argmax(1) == y[i:i + chunk]).sum().item()
    model.train(was_training)
    return total / len(y), (None if ds.loss == "mse" else correct / len(y))


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


class _Run:
    """One training run advanced a chunk of ``eval_every`` steps at a time (so that runs can be interleaved)."""

    def __init__(self, ds: Dataset, model_name: str, opt_name: str, lr: float, *, steps: int, batch_size: int,
                 target: float, eval_every: int, seed: int, stop_at_target: bool, kfc_options: dict | None):
        self.ds, self.opt_name, self.lr = ds, opt_name, lr
        self.steps, self.eval_every, self.stop_at_target = steps, eval_every, stop_at_target
        torch.manual_seed(seed)
        self.model = build_model(model_name, ds.name, ds.input_shape, ds.num_classes)
        self.kfc_options = dict(kfc_options or {})
        if opt_name == "kfc":  # its own generator for the sampled targets: independent of other runs
            self.kfc_options.setdefault("generator", torch.Generator().manual_seed(seed + 2))
        self.batches = _Batches(len(ds.y_train), batch_size, seed + 1)
        self.ev_x, self.ev_y = ds.x_train[:EVAL_EXAMPLES], ds.y_train[:EVAL_EXAMPLES]
        self.res = RunResult(opt_name, lr, seed, target)
        self.loss0, _ = evaluate(self.model, ds, self.ev_x, self.ev_y)
        self.res.steps.append(0), self.res.seconds.append(0.0), self.res.train_loss.append(self.loss0)
        self.opt = None
        self.clock = 0.0
        self.done = 0
        self.finished = False

    def advance(self) -> int:
        """Train up to ``eval_every`` steps (timed), then evaluate (not timed); returns the steps taken."""
        ds, model, res = self.ds, self.model, self.res
        chunk = min(self.eval_every, self.steps - self.done)
        t0 = time.process_time()
        if self.opt is None:  # building the optimizer (KFC: tracing and instrumenting the model) is on the clock
            self.opt = make_optimizer(self.opt_name, model, self.lr, self.kfc_options, ds.loss)
            model.train()
        # the Levenberg–Marquardt rules (adaptive K-FAC's, and KFC-pre's with adapt_damping=True / "auto")
        # re-evaluate the loss after the update: they need a closure, which any training loop can pass
        closure_needed = isinstance(self.opt, kc.KFC) and (self.opt.options.mode == "adaptive"
                                                            or bool(self.opt.options.adapt_damping))
        loss = None
        try:
            for _ in range(chunk):
                idx = self.batches.next()
                x, y = ds.prepare(ds.x_train[idx]), ds.y_train[idx]

                def closure(x=x, y=y):
                    self.opt.zero_grad(set_to_none=True)
                    out = task_loss(ds, model(x), y)
                    out.backward()
                    return out

                if closure_needed:
                    loss = self.opt.step(closure)
                else:
                    loss = closure()
                    self.opt.step()
                self.opt.zero_grad(set_to_none=True)
            last = loss.item()
        except RuntimeError as e:  # e.g. sampling targets from a non-finite output: divergence, not a bug
            finite = all(torch.isfinite(p).all() for p in model.parameters())
            if finite and (loss is None or torch.isfinite(loss).all()):
                raise
            log.info("%s lr=%g: step failed on non-finite values (%s)", self.opt_name, self.lr,
                     str(e).splitlines()[0])
            last = math.nan
        self.clock += time.process_time() - t0
        self.done += chunk
        ev, _ = evaluate(model, ds, self.ev_x, self.ev_y)
        res.steps.append(self.done), res.seconds.append(self.clock), res.train_loss.append(ev)
        if not (math.isfinite(last) and math.isfinite(ev)) or ev > 3 * self.loss0 + 1:
            res.diverged = True
            log.info("%s lr=%g diverged at step %d (loss %.3g)", self.opt_name, self.lr, self.done, ev)
        self.finished = (res.diverged or self.done >= self.steps
                         or (self.stop_at_target and ev <= res.target))
        return chunk

    def result(self, test: bool) -> RunResult:
        res = self.res
        if test and not res.diverged:
            _, res.test_acc = evaluate(self.model, self.ds, self.ds.x_test, self.ds.y_test)
        log.info("%s lr=%g: %d steps, %.2fs, train loss %.4g, steps to target %s", self.opt_name, self.lr,
                 self.done, self.clock, res.train_loss[-1], res.steps_to_target)
        return res


def train_lockstep(ds: Dataset, model_name: str, specs: Sequence[tuple[str, float]], *, steps: int,
                   batch_size: int, target: float, eval_every: int, seed: int = 0, stop_at_target: bool = False,
                   kfc_options: dict | None = None, test: bool = True, bar=None) -> list[RunResult]:
    """Train one fresh model per (optimizer, lr) of ``specs``, interleaved chunk by chunk.

    ``eval_every`` steps of each in turn, so that every run sees the same machine load; see ``train_run`` for the
    rest.
    """
    runs = [_Run(ds, model_name, o, lr, steps=steps, batch_size=batch_size, target=target, eval_every=eval_every,
                 seed=seed, stop_at_target=stop_at_target, kfc_options=kfc_options) for o, lr in specs]
    while not all(r.finished for r in runs):
        for r in runs:
            if not r.finished:
                n = r.advance()
                if bar is not None:
                    bar.update(n)
    if bar is not None:
        bar.update(sum(steps - r.done for r in runs))
    return [r.result(test) for r in runs]


def train_run(ds: Dataset, model_name: str, opt_name: str, lr: float, *, steps: int, batch_size: int,
              target: float, eval_every: int, seed: int = 0, stop_at_target: bool = False,
              kfc_options: dict | None = None, test: bool = True, bar=None) -> RunResult:
    """Train a fresh ``model_name`` (initialised from ``seed``) with ``opt_name`` for ``steps`` steps.

    The training loss on (up to ``EVAL_EXAMPLES``) training examples is recorded every ``eval_every`` steps and
    at the end. ``stop_at_target`` ends the run at the first evaluation that reaches ``target``; a non-finite or
    exploding loss ends it as diverged. ``bar`` (a tqdm bar) is advanced by ``steps`` in total. KFC gets its own
    generator for the sampled targets (``seed + 2``) unless ``kfc_options`` has one, so a run does not depend on
    what else runs in the process.
    """
    return train_lockstep(ds, model_name, [(opt_name, lr)], steps=steps, batch_size=batch_size, target=target,
                          eval_every=eval_every, seed=seed, stop_at_target=stop_at_target,
                          kfc_options=kfc_options, test=test, bar=bar)[0]


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
