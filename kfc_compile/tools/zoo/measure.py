"""Measuring one model: its report row (see :data:`ROW_KEYS` and the package doc).

:func:`run_one` builds the model of a :class:`~kfc_compile.tools.zoo.cases.Case`, finds an input it accepts,
transforms it, takes the KFC training steps on one fixed synthetic batch and times steady-state KFC steps against
SGD steps (and, asked to, measures the compiled coverage); a model's own failure is recorded in its row, never
raised. Warnings of the KFC steps (e.g. a layer that got no statistics) go to the row's ``warnings`` with
``detail``.
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
from kfc_compile.frontend.dynamo.registry import CompiledKFCInfo
from kfc_compile.tools.zoo.cases import Case, Inputs, image_case, own_loss
from kfc_compile.tools.zoo.detail import DETAIL_KEYS, compiled_coverage, linear_share

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


def empty_row(name: str, family: str, detail: bool = False) -> dict:
    """A row with every key of :data:`ROW_KEYS` (and :data:`DETAIL_KEYS` with ``detail``): nothing measured yet."""
    keys = ROW_KEYS + (DETAIL_KEYS if detail else ())
    return {k: None for k in keys} | {"name": name, "family": family, "trained": False, "steps": 0}


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:400]


def _first_tensor(inputs: Inputs) -> torch.Tensor | None:
    args, kwargs = inputs
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
        if isinstance(v, list) and v and isinstance(v[0], torch.Tensor):  # detection: a list of images
            return torch.stack(v)
    return None


def _probe(case: Case, model: nn.Module | None, batch: int):
    """(model, inputs, output) for the first resolution the model accepts (eval mode, no grad); raises the last error.

    ``model`` is None for a case built per resolution: it is built here for each size tried.
    """
    err: BaseException | None = None
    for res in case.resolutions:
        inputs = case.inputs(res, batch, torch.Generator().manual_seed(1))
        try:
            m = case.build(res) if case.per_resolution else model
            m.eval()
            with torch.no_grad():
                return m, inputs, m(*inputs[0], **inputs[1])
        except Exception as e:  # noqa: BLE001 - try the next size
            err = e
    raise RuntimeError(f"no input size accepted (tried {list(case.resolutions)}): {_short(err)}")


def _check_model_loss(model: nn.Module, case: Case, inputs: Inputs, y: torch.Tensor) -> None:
    """The loss the model computes from its ``labels`` equals the case's objective (eval mode, no grad)."""
    with torch.no_grad():
        out = model(*inputs[0], **inputs[1])
        ours = float(case.objective(out, y))
    theirs = own_loss(out)
    if theirs is None:
        raise RuntimeError(f"the model returned no loss for {case.labels}=")
    if not math.isclose(float(theirs), ours, rel_tol=1e-4, abs_tol=1e-6):
        raise RuntimeError(f"the model's own loss {float(theirs):.6g} differs from the zoo's objective {ours:.6g}: "
                           "the case's loss spec is not the model's loss")


def _fixed_loss(model: nn.Module, case: Case, inputs: Inputs, y: torch.Tensor) -> torch.Tensor:
    """The training-mode loss on the fixed batch, with the RNG seeded by MASK_SEED.

    Dropout and stochastic depth draw the same masks in every training step and in the evaluations before and after
    them, so the steps optimise one deterministic function and the comparison is not mask noise.
    """
    with torch.random.fork_rng():
        torch.manual_seed(MASK_SEED)
        return case.training_loss(model(*inputs[0], **inputs[1]), y, inputs[1])


def _kfc_step(model: nn.Module, opt: kc.KFC, case: Case, inputs: Inputs, y: torch.Tensor) -> float:
    """One KFC step on the fixed batch; returns the loss before the step."""
    loss = _fixed_loss(model, case, inputs, y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def _record_params(row: dict, model: nn.Module) -> None:
    row["params"] = sum(p.numel() for p in model.parameters())
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)


def _record_layers(row: dict, info, model: nn.Module, detail: bool) -> None:
    """Layers by kind, coverage, black boxes and uncovered parameters of ``info`` (and the detail columns).

    Nothing yet for a captured model that dynamo has not compiled (its layers join at the first call).
    """
    if isinstance(info, CompiledKFCInfo) and not info.graphs:
        if detail:
            row["frontend"] = "dynamo"
        return
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
               black_boxes=[{"name": b.name, "reason": b.reason} for b in info.black_boxes], uncovered=uncovered)
    if detail:
        row.update(linear_share(model, info, _reason),
                   frontend="dynamo" if isinstance(info, CompiledKFCInfo) else "fx")


def run_one(name: str, constructor: Callable[[], nn.Module] | None = None, family: str | None = None, *,
            case: Case | None = None, steps: int = 2, resolution: int | None = None, batch: int = 8,
            lr: float = 0.003, damping: float = 0.1, timing_steps: int = 3,
            max_factor_dim: int | None = MAX_FACTOR_DIM, detail: bool = False, compiled: bool = False,
            progress: Callable[[str, dict], None] | None = None) -> dict:
    """One report row (see :data:`ROW_KEYS`); never raises for a model's own failure.

    The model is a torchvision ``name``, a ``constructor`` or a :class:`Case` (``case``; then ``name``,
    ``constructor``, ``family`` and ``resolution`` are ignored). ``detail`` adds :data:`DETAIL_KEYS` to the row
    (the share of conv/linear parameter elements under KFC, tied weights, the front end) and ``compiled`` also
    measures the coverage under ``torch.compile(backend="kfc")`` (stage "compiled", after the timing).
    ``progress(stage, row)`` is called with a copy of the row as each stage starts (the time-limited worker reports
    through it). ``max_factor_dim`` is passed to ``kc.KFC`` (block-diagonal factors above it; None: dense).
    """
    case = case or image_case(name, constructor, family, resolution)
    row = empty_row(case.name, case.family, detail)
    if detail:
        row["source"] = case.source
    t0 = time.perf_counter()
    stage = "build"

    def enter(new_stage: str) -> str:
        if progress is not None:
            progress(new_stage, dict(row, seconds=time.perf_counter() - t0))
        return new_stage

    try:
        torch.manual_seed(0)
        stage = enter("build")
        model = None if case.per_resolution else case.build(case.resolutions[0])
        if model is not None:
            if not isinstance(model, nn.Module):
                raise TypeError(f"constructor returned {type(model).__name__}, not an nn.Module")
            _record_params(row, model)
        stage = enter("input")
        model, inputs, out0 = _probe(case, model, min(batch, case.max_batch or batch))
        res = case.resolutions[0] if not case.per_resolution else _resolution_of(case, inputs)
        _record_params(row, model)
        first = _first_tensor(inputs)
        row["input_shape"] = list(first.shape) if first is not None else None
        y = None
        if case.train:
            y, labels = case.targets(case.loss, case.logits(out0), inputs, torch.Generator().manual_seed(2))
            if labels is not None:
                inputs = (inputs[0], {**inputs[1], case.labels: labels})
                _check_model_loss(model, case, inputs, y)
        stage = enter("transform")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tm = kc.transform(model)
        _record_layers(row, tm.kfc, model, detail)
        if not case.train:
            row["status"] = "partial" if row["black_boxes"] else "ok"
            return row
        stage = enter("train")
        tm.train()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with torch.no_grad():
                before = float(_fixed_loss(tm, case, inputs, y))
            # a captured model's layers join at this first call: the time-limited worker learns them below (kc.KFC
            # itself no longer needs them before it is built: layers that join later get their own layouts)
            _record_layers(row, tm.kfc, model, detail)
            stage = enter("train")  # reports the layers to the time-limited worker
            # the whole (tiny) batch for the exact Fisher products: train-mode BatchNorm needs > 1 example
            opt = kc.KFC(tm, lr=lr, damping=damping, loss=case.loss, output=case.output, clip_fraction=1.0,
                         max_factor_dim=max_factor_dim)
            losses = [_kfc_step(tm, opt, case, inputs, y) for _ in range(steps)]
            with torch.no_grad():
                after = float(_fixed_loss(tm, case, inputs, y))
        _record_layers(row, tm.kfc, model, detail)  # graphs compiled by the steps may have changed them
        if detail:
            row["warnings"] = _kfc_warnings(caught)
        row.update(trained=True, steps=steps, loss_before=before, loss_after=after, factor_bytes=factor_bytes(opt))
        row["loss_decreased"] = math.isfinite(after) and after < row["loss_before"]
        if not math.isfinite(after) or not all(map(math.isfinite, losses)):
            raise FloatingPointError(f"non-finite loss: {losses} -> {after}")
        row["status"] = "partial" if row["black_boxes"] else "ok"
        stage = enter("timing")
        if timing_steps:
            _time_steps(row, case, tm, opt, inputs, y, len(losses), timing_steps, lr)
            # the SGD model is built afresh (same seed, same initial weights) once the KFC model and its optimizer
            # are gone: a copy held from the start would double the peak memory of the largest models
            del opt, model, tm
            gc.collect()
            row["sgd_step_s"] = _sgd_step_s(case, res, inputs, y, timing_steps, lr)
            if row["kfc_step_s"] and row["sgd_step_s"]:
                row["step_time_ratio"] = row["kfc_step_s"] / row["sgd_step_s"]
        if compiled:
            stage = enter("compiled")
            _compiled(row, case, res, inputs, y)
    except Exception as e:  # noqa: BLE001 - a failure is a result, not a crash
        if stage == "compiled":
            row["compiled_error"] = _short(e)
        else:
            row["status"] = "failed"
            row["error"] = f"{stage}: {_short(e)}"
        row["trace"] = traceback.format_exc(limit=-4)
        if compiled and stage in ("train", "timing"):  # the compiled coverage does not need the training
            try:
                enter("compiled")
                _compiled(row, case, res, inputs, y)
            except Exception as e2:  # noqa: BLE001 - recorded
                row["compiled_error"] = _short(e2)
    finally:
        row["seconds"] = time.perf_counter() - t0
        torch._dynamo.reset()  # compiled code of this model (dynamo capture, the compiled column) is not reused
    return row


def _kfc_warnings(caught) -> list[str]:
    """The distinct warnings of KFC (about KFC or its fallback; layer names dropped), at most five, shortened."""
    out: list[str] = []
    for w in caught:
        if not re.search(r"kfc|fallback", str(w.message), re.IGNORECASE):
            continue
        msg = _reason(str(w.message))[:240]
        if msg not in out:
            out.append(msg)
    return out[:5]


def _resolution_of(case: Case, inputs: Inputs):
    """The resolution of ``case`` whose inputs were accepted (cases built per resolution)."""
    first = _first_tensor(inputs)
    for res in case.resolutions:
        if first is not None and res is not None and first.shape[-1] == res:
            return res
    return case.resolutions[0]


def _time_steps(row: dict, case: Case, tm: nn.Module, opt: kc.KFC, inputs: Inputs, y, done: int,
                timing_steps: int, lr: float) -> None:
    """``kfc_step_s``: the median of ``timing_steps`` steady-state KFC steps (after the warm-up steps)."""
    times = []
    for k in range(done + 1, WARMUP_STEPS + timing_steps + 1):  # the step number k of this step
        t = time.perf_counter()
        timed_loss = _kfc_step(tm, opt, case, inputs, y)
        if k > WARMUP_STEPS:
            times.append(time.perf_counter() - t)
        if not math.isfinite(timed_loss):
            raise FloatingPointError(f"non-finite loss at KFC step {k}: {timed_loss}")
    row["kfc_step_s"] = statistics.median(times) if times else None


def _sgd_step_s(case: Case, res, inputs: Inputs, y, timing_steps: int, lr: float) -> float | None:
    """The median of ``timing_steps`` SGD (momentum 0.9) steps on a fresh build, after one warm-up step."""
    torch.manual_seed(0)
    model = case.build(res)
    model.train()
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    st = []
    for k in range(timing_steps + 1):
        t = time.perf_counter()
        case.training_loss(model(*inputs[0], **inputs[1]), y, inputs[1]).backward()
        sgd.step()
        sgd.zero_grad(set_to_none=True)
        if k:  # the first step allocates the momentum buffers
            st.append(time.perf_counter() - t)
    return statistics.median(st) if st else None


def _compiled(row: dict, case: Case, res, inputs: Inputs, y) -> None:
    """The compiled columns, on a fresh build (same seed) that no other registry owns."""
    torch.manual_seed(0)
    model = case.build(res)

    def run_backward(cm: nn.Module) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            case.training_loss(cm(*inputs[0], **inputs[1]), y, inputs[1]).backward()

    row.update(compiled_coverage(model, run_backward, _reason))
