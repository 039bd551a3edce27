"""Measuring one model: its report row (see :data:`ROW_KEYS` and the package doc).

:func:`run_one` builds the model, finds an input it accepts, transforms it, takes the KFC training steps on one
fixed synthetic batch and times steady-state KFC steps against SGD steps; a model's own failure is recorded in its
row, never raised.
"""
from __future__ import annotations

import gc
import math
import re
import statistics
import time
import traceback
import warnings
from collections.abc import Callable

import torch
from torch import nn

import kfc_compile as kc
from kfc_compile.tools.zoo.models import MAX_BATCH, build, first_output, make_input, resolutions, resolve_family

ROW_KEYS = ("name", "family", "status", "error", "trained", "input_shape", "params", "trainable_params",
            "kfc_layers", "layers_by_kind", "coverage", "black_boxes", "uncovered", "loss_before", "loss_after",
            "loss_decreased", "steps", "kfc_step_s", "sgd_step_s", "step_time_ratio", "factor_bytes", "seconds")
WARMUP_STEPS = 3  # kc.KFC recomputes every inverse at steps 1-3: step-time medians start after them
# KFC's max_factor_dim in the sweep: factors wider than this are block-diagonal, so that the inverses of wide
# layers (VGG's 25089-wide Ω, ViT-L's 4096-wide MLP factors) take seconds, not minutes, on a CPU
MAX_FACTOR_DIM = 1024
MASK_SEED = 1234


def factor_bytes(opt) -> int:
    """Bytes the KFC optimizer holds for its factors: moving averages (Ω, Γ) plus the damped inverses."""
    return opt.curvature_nbytes()


def _reason(reason: str) -> str:
    """The reason without the module name it names, so that rows group by kind of reason.

    ``"BatchNorm2d 'bn1': normalization layer"`` -> ``"BatchNorm2d: normalization layer"``.
    """
    return re.sub(r" '[^']*'", "", reason)


def empty_row(name: str, family: str) -> dict:
    """A row with every key of :data:`ROW_KEYS`: nothing measured yet."""
    return {k: None for k in ROW_KEYS} | {"name": name, "family": family, "trained": False, "steps": 0}


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:400]


def _probe(model: nn.Module, name: str, family: str, res_list, batch: int):
    """The first input the model accepts (eval mode, no grad) and its output, or raise the last error."""
    err: BaseException | None = None
    model.eval()
    for res in res_list:
        x = make_input(family, res, batch, name, torch.Generator().manual_seed(1))
        arg = list(x) if family == "detection" else x
        try:
            with torch.no_grad():
                return x, model(arg)
        except Exception as e:  # noqa: BLE001 - try the next size
            err = e
    raise RuntimeError(f"no input size accepted (tried {list(res_list)}): {_short(err)}")


def _loss(out, y) -> torch.Tensor:
    return nn.functional.cross_entropy(first_output(out), y)


def _fixed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training-mode loss on the fixed batch, with the RNG seeded by MASK_SEED.

    Dropout and stochastic depth draw the same masks in every training step and in the evaluations before and after
    them, so the steps optimise one deterministic function and the comparison is not mask noise.
    """
    with torch.random.fork_rng():
        torch.manual_seed(MASK_SEED)
        return _loss(model(x), y)


def _kfc_step(model: nn.Module, opt: kc.KFC, x: torch.Tensor, y: torch.Tensor) -> float:
    """One KFC step on the fixed batch; returns the loss before the step."""
    loss = _fixed_loss(model, x, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _targets(out, family: str, gen) -> torch.Tensor:
    f = first_output(out)
    if family == "segmentation":  # (B, C, H, W) -> per-pixel classes
        return torch.randint(f.shape[1], (f.shape[0], *f.shape[2:]), generator=gen)
    return torch.randint(f.shape[1], (f.shape[0],), generator=gen)


def run_one(name: str, constructor: Callable[[], nn.Module] | None = None, family: str | None = None, *,
            steps: int = 2, resolution: int | None = None, batch: int = 8, lr: float = 0.003,
            damping: float = 0.1, timing_steps: int = 3, max_factor_dim: int | None = MAX_FACTOR_DIM,
            progress: Callable[[str, dict], None] | None = None) -> dict:
    """One report row (see :data:`ROW_KEYS`); never raises for a model's own failure.

    ``progress(stage, row)`` is called with a copy of the row as each stage starts (the time-limited worker reports
    through it). ``max_factor_dim`` is passed to ``kc.KFC`` (block-diagonal factors above it; None: dense).
    """
    family = resolve_family(name, constructor, family)
    row = empty_row(name, family)
    t0 = time.perf_counter()
    stage = "build"

    def enter(new_stage: str) -> str:
        if progress is not None:
            progress(new_stage, dict(row, seconds=time.perf_counter() - t0))
        return new_stage

    try:
        torch.manual_seed(0)
        stage = enter("build")
        res_list = resolutions(name, family, resolution)
        model = constructor() if constructor is not None else build(name, res_list[0])
        if not isinstance(model, nn.Module):
            raise TypeError(f"constructor returned {type(model).__name__}, not an nn.Module")
        row["params"] = sum(p.numel() for p in model.parameters())
        row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        stage = enter("input")
        x, out0 = _probe(model, name, family, res_list, min(batch, MAX_BATCH.get(name, batch)))
        row["input_shape"] = list(x.shape)
        stage = enter("transform")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tm = kc.transform(model)
        info = tm.kfc
        kinds: dict[str, int] = {}
        for layer in info.layers:
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        uncovered: dict[str, dict] = {}
        for u in info.uncovered:
            d = uncovered.setdefault(_reason(u.reason), {"count": 0, "numel": 0, "params": []})
            d["count"] += 1
            d["numel"] += math.prod(u.shape)
            d["params"].append(u.name)
        row.update(kfc_layers=len(info.layers), layers_by_kind=kinds, coverage=info.coverage,
                   black_boxes=[{"name": b.name, "reason": b.reason} for b in info.black_boxes],
                   uncovered=uncovered)
        del tm
        if family == "detection":
            row["status"] = "partial" if info.black_boxes else "ok"
            return row
        stage = enter("train")
        gen = torch.Generator().manual_seed(2)
        y = _targets(out0, family, gen)
        model.train()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # the whole (tiny) batch for the exact Fisher products: train-mode BatchNorm needs > 1 example
            opt = kc.KFC(model, lr=lr, damping=damping, loss="cross_entropy", clip_fraction=1.0,
                         max_factor_dim=max_factor_dim)

        with torch.no_grad():
            before = float(_fixed_loss(model, x, y))
        losses = [_kfc_step(model, opt, x, y) for _ in range(steps)]
        with torch.no_grad():
            after = float(_fixed_loss(model, x, y))
        row.update(trained=True, steps=steps, loss_before=before, loss_after=after, factor_bytes=factor_bytes(opt))
        row["loss_decreased"] = math.isfinite(after) and after < row["loss_before"]
        if not math.isfinite(after) or not all(map(math.isfinite, losses)):
            raise FloatingPointError(f"non-finite loss: {losses} -> {after}")
        row["status"] = "partial" if row["black_boxes"] else "ok"
        stage = enter("timing")
        times = []
        if timing_steps:
            for k in range(len(losses) + 1, WARMUP_STEPS + timing_steps + 1):  # the step number k of this step
                t = time.perf_counter()
                timed_loss = _kfc_step(model, opt, x, y)
                if k > WARMUP_STEPS:
                    times.append(time.perf_counter() - t)
                if not math.isfinite(timed_loss):
                    raise FloatingPointError(f"non-finite loss at KFC step {k}: {timed_loss}")
        row["kfc_step_s"] = statistics.median(times) if times else None
        if not timing_steps:
            return row
        # the SGD model is built afresh (same seed, same initial weights) once the KFC model and its optimizer
        # are gone: a copy held from the start would double the peak memory of the largest models
        del opt, model, info
        gc.collect()
        torch.manual_seed(0)
        sgd_model = constructor() if constructor is not None else build(name, res_list[0])
        sgd_model.train()
        sgd = torch.optim.SGD(sgd_model.parameters(), lr=lr, momentum=0.9)
        st = []
        for k in range(timing_steps + 1):
            t = time.perf_counter()
            _loss(sgd_model(x), y).backward()
            sgd.step()
            sgd.zero_grad(set_to_none=True)
            if k:  # the first step allocates the momentum buffers
                st.append(time.perf_counter() - t)
        row["sgd_step_s"] = statistics.median(st) if st else None
        if row["kfc_step_s"] and row["sgd_step_s"]:
            row["step_time_ratio"] = row["kfc_step_s"] / row["sgd_step_s"]
    except Exception as e:  # noqa: BLE001 - a failure is a result, not a crash
        row["status"] = "failed"
        row["error"] = f"{stage}: {_short(e)}"
        row["trace"] = traceback.format_exc(limit=-4)
    finally:
        row["seconds"] = time.perf_counter() - t0
    return row
