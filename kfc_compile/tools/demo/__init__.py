"""The ``kfc-compile demo``: KFC-pre against tuned SGD with momentum and Adam on a small real task.

``run_demo`` tunes each optimizer's learning rate on a small grid (runs that stop at the target), trains each
once more with its best rate (the final runs interleaved, so that they share the machine's load alike), and
returns a ``DemoResult`` (``.table()``, ``.runs``); ``out`` gets a PNG of the training loss against steps and
against seconds.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from kfc_compile.tools.demo.data import INPUT_SHAPES, NUM_OUTPUTS, TASKS, Dataset, DemoError, load_task
from kfc_compile.tools.demo.models import DEFAULT_MODEL, MODELS, build_model, check_forward, paper_cifar_net
from kfc_compile.tools.demo.plot import plot_curves
from kfc_compile.tools.demo.train import (
    GRIDS,
    KFC_OPTIONS,
    LABELS,
    OPTIMIZERS,
    TASK_SETTINGS,
    RunResult,
    TaskSettings,
    make_optimizer,
    train_lockstep,
    train_run,
    tune_lr,
)

__all__ = ["Dataset", "DemoError", "DemoResult", "GRIDS", "MODELS", "OPTIMIZERS", "RunResult", "TASKS",
           "TASK_SETTINGS", "TaskSettings", "load_task", "build_model", "make_optimizer", "paper_cifar_net", "run_demo",
           "train_lockstep", "train_run", "tune_lr"]


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


@dataclass
class DemoResult:
    """What :func:`run_demo` returns: the final run per optimizer, the tuning runs, and the plot's path (or None)."""

    task: str
    model: str
    steps: int
    batch_size: int
    target: float
    seed: int
    runs: dict[str, RunResult]  # final run per optimizer, at its tuned learning rate
    tuning: dict[str, list[RunResult]] = field(default_factory=dict)
    plot: str | None = None

    def ratios(self) -> dict[str, float | None]:
        """KFC-pre against the best of the others: how many times fewer steps / seconds to the target."""
        k = self.runs.get("kfc")
        others = [r for n, r in self.runs.items() if n != "kfc"]
        out: dict[str, float | None] = {"steps": None, "seconds": None}
        if k is None or not others or k.steps_to_target is None:
            return out
        for what, get in (("steps", lambda r: r.steps_to_target), ("seconds", lambda r: r.seconds_to_target)):
            vals = [get(r) for r in others]
            best = min((v for v in vals if v is not None), default=None)
            # not reached by any baseline: the ratio is at least (budget / KFC's), reported as None
            out[what] = best / max(get(k), 1e-12) if best is not None else None
        return out

    def table(self) -> str:
        """A text table of the final runs, with KFC-pre's speed-up against the best of the others."""
        head = (f"{self.task} / {self.model}: batch {self.batch_size}, {self.steps} steps, seed {self.seed}, "
                f"target training loss {self.target:g}")
        cols = ("optimizer", "lr", "steps to target", "CPU s to target", "final train loss", "test acc")
        rows = []
        for r in self.runs.values():
            rows.append((r.label, f"{r.lr:g}", _fmt(r.steps_to_target, "d"), _fmt(r.seconds_to_target, ".2f"),
                         "diverged" if r.diverged else f"{r.final_loss:.4f}",
                         _fmt(None if r.test_acc is None else 100 * r.test_acc, ".1f") + ("%" if r.test_acc
                                                                                         is not None else "")))
        w = [max(len(c), *(len(row[i]) for row in rows)) for i, c in enumerate(cols)]
        line = lambda cells: "  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i])  # noqa: E731
                                       for i, c in enumerate(cells))
        out = [head, line(cols), line(["-" * x for x in w])] + [line(r) for r in rows]
        rat = self.ratios()
        if "kfc" in self.runs and len(self.runs) > 1:
            k = self.runs["kfc"]
            if k.steps_to_target is None:
                out.append("KFC-pre did not reach the target")
            else:
                def say(v, what):
                    return f"{v:.1f}x {what}" if v is not None else f"(baselines never reached it) {what}"
                out.append("KFC-pre vs the best of the others: " + say(rat["steps"], "fewer steps") + ", "
                           + say(rat["seconds"], "less time"))
        return "\n".join(out)


def run_demo(task: str = "digits", model: str = "auto", *, steps: int | None = None,
             batch_size: int | None = None, target: float | None = None, seed: int = 0,
             optimizers: Sequence[str] = OPTIMIZERS, grids: Mapping[str, Sequence[float]] | None = None,
             tune_steps: int | None = None, eval_every: int | None = None, data_dir: str | None = None,
             kfc_options: Mapping | None = None, out: str | None = "demo.png", progress: bool = True
             ) -> DemoResult:
    """Tune, train and compare ``optimizers`` on ``task``; see the module docstring.

    Defaults per task come from ``TASK_SETTINGS``; ``tune_steps`` defaults to ``steps`` (tuning runs stop at the
    target); ``grids`` maps an optimizer to its learning rates (``GRIDS`` for those not given; a single rate skips
    tuning); ``kfc_options`` go to ``kc.KFC`` on top of ``KFC_OPTIONS``.
    """
    if task not in TASKS:
        raise DemoError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    for o in optimizers:
        if o not in OPTIMIZERS:
            raise DemoError(f"unknown optimizer {o!r}: expected one of {', '.join(OPTIMIZERS)}")
    if not optimizers:
        raise DemoError("no optimizer to run")
    s = TASK_SETTINGS[task]
    steps = s.steps if steps is None else steps
    batch_size = s.batch_size if batch_size is None else batch_size
    target = s.target if target is None else target
    eval_every = max(1, min(s.eval_every, steps)) if eval_every is None else eval_every
    tune_steps = steps if tune_steps is None else tune_steps
    for name, v in (("steps", steps), ("batch size", batch_size), ("eval_every", eval_every),
                    ("tune steps", tune_steps)):
        if v < 1:
            raise DemoError(f"{name} must be at least 1, got {v}")
    if not (target > 0 and math.isfinite(target)):
        raise DemoError(f"target training loss must be positive, got {target}")
    grids = {o: tuple((grids or {}).get(o, GRIDS[o])) for o in optimizers}
    kfc_options = {**KFC_OPTIONS, **(kfc_options or {})}

    model_name = DEFAULT_MODEL[task] if model == "auto" else model
    # bad model/task pairs fail before loading data
    build_model(model_name, task, INPUT_SHAPES[task], NUM_OUTPUTS[task])
    ds = load_task(task, data_dir)
    check_forward(build_model(model_name, task, ds.input_shape, ds.num_classes), ds.input_shape)

    total = sum((len(g) * tune_steps if len(g) > 1 else 0) + steps for g in grids.values())
    common = dict(batch_size=batch_size, target=target, eval_every=eval_every, seed=seed, kfc_options=kfc_options)
    tuning: dict[str, list[RunResult]] = {}
    lrs: dict[str, float] = {}
    with tqdm(total=total, desc="demo", unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for o in optimizers:
            if len(grids[o]) > 1:
                bar.set_description(f"tuning {LABELS[o]} lr")
                lrs[o], tuning[o] = tune_lr(ds, model_name, o, grids[o], steps=tune_steps, bar=bar, **common)
            else:
                lrs[o] = grids[o][0]
        # the final runs go in lockstep (eval_every steps of each in turn): the same machine load for all
        bar.set_description("final runs " + ", ".join(f"{LABELS[o]} lr={lr:g}" for o, lr in lrs.items()))
        finals = train_lockstep(ds, model_name, list(lrs.items()), steps=steps, bar=bar, **common)
        runs = dict(zip(lrs, finals, strict=True))
    res = DemoResult(task, model_name, steps, batch_size, target, seed, runs, tuning)
    if out:
        curves = [(o, f"{r.label} (lr {r.lr:g})", r.steps, r.seconds, r.train_loss) for o, r in runs.items()]
        res.plot = plot_curves(curves, out, f"{task} / {model_name}: training loss (batch {batch_size})", target)
    return res
