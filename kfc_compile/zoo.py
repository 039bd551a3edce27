"""``kc.zoo``: transform and train a collection of models with KFC, one report row per model.

``run(models, steps=2, resolution=32, batch=8, out=DIR)`` takes torchvision model names (``"resnet18"``,
``"all"``, or families through :func:`model_names`), ``(name, constructor)`` pairs or
``(name, constructor, family)`` triples (e.g. timm constructors), and for each model, with random
initialisation on synthetic data:

1. builds it and finds the smallest input it accepts (``resolution`` first, then larger; per-model minimums;
   ViT is built for ``resolution``; the video models that need 16 frames of 224×224 run one clip, ``MAX_BATCH``);
2. transforms it (``kc.transform``): traced fully, or partially (black boxes), or failed;
3. runs ``steps`` KFC steps (``kc.KFC``, cross-entropy on the main output; per-pixel for segmentation) on one
   fixed synthetic batch (training mode; every forward reseeds the RNG, so dropout and stochastic depth draw the
   same masks in each step and in the losses recorded before and after the steps), then keeps stepping for the
   timing:
   ``kfc_step_s`` is the median of ``timing_steps`` *steady-state* KFC steps, i.e. steps after the optimizer's
   warm-up (it recomputes every inverse at steps 1–3; statistics are taken at every step, inverses are then
   refreshed every 20 steps, which the median leaves out), and ``sgd_step_s`` the median of as many SGD
   (momentum 0.9) steps on a fresh build of the model (same seed) after one warm-up step, in the same process:
   ``step_time_ratio`` is their ratio;
4. records matched layers by kind, coverage, uncovered parameters by reason, the loss before and after, the
   step-time ratio and the bytes held by the optimizer's factors (moving averages and inverses).

A model that fails never stops the sweep: its row says ``"failed"`` with the error. With ``time_limit`` (seconds)
each model runs in a worker process (forked from a fork server); one that runs over the limit is stopped and its row keeps what was
measured before (coverage after the transform, the losses after the training steps): ``"failed"`` with a
``time limit`` error if the training steps did not finish, else its status with the error noting the unfinished
timing. Detection models are transformed and reported only (their training needs target dicts). ``run`` returns
the rows and, with ``out``, writes ``zoo.json`` (``{"schema_version": 1, "models": [...]}``, every row with exactly
:data:`ROW_KEYS`) and ``zoo.md``.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import multiprocessing
import os
import pickle
import platform
import re
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

SCHEMA_VERSION = 1
FAMILIES = ("classification", "video", "segmentation", "detection")
ROW_KEYS = ("name", "family", "status", "error", "trained", "input_shape", "params", "trainable_params",
            "kfc_layers", "layers_by_kind", "coverage", "black_boxes", "uncovered", "loss_before", "loss_after",
            "loss_decreased", "steps", "kfc_step_s", "sgd_step_s", "step_time_ratio", "factor_bytes", "seconds")

# Resolutions to try, smallest first; the first one the model accepts is used (a requested --resolution
# replaces the smallest entries it exceeds).
DEFAULT_RES = (32, 64, 128, 224)
MIN_RES = {
    "inception_v3": (75, 128, 299),  # needs >= 75
    "googlenet": (32, 75, 128, 224),
    "maxvit_t": (224,),  # window partitioning needs multiples of 7 * 32
}
VIDEO_FRAMES = {"mvit_v1_b": 16, "mvit_v2_s": 16, "s3d": 16}
# models whose smallest input is 16 frames of 224×224 (MViT's fixed positional grid, S3D's final 2×7×7 average
# pool) run with one clip: ~70 GFLOPs per clip forward
MAX_BATCH = {"mvit_v1_b": 1, "mvit_v2_s": 1, "s3d": 1}
DETECTION_RES = (128, 224, 320)
WARMUP_STEPS = 3  # kc.KFC recomputes every inverse at steps 1-3: step-time medians start after them
# KFC's max_factor_dim in the sweep: factors wider than this are block-diagonal, so that the inverses of wide
# layers (VGG's 25089-wide Ω, ViT-L's 4096-wide MLP factors) take seconds, not minutes, on a CPU
MAX_FACTOR_DIM = 1024


def family_of(name: str) -> str:
    """The torchvision family of a model name ('classification' for unknown names)."""
    import torchvision

    for fam, mod in (("video", torchvision.models.video), ("segmentation", torchvision.models.segmentation),
                     ("detection", torchvision.models.detection)):
        if name in torchvision.models.list_models(module=mod):
            return fam
    return "classification"


def model_names(families: Iterable[str] = ("classification",)) -> list[str]:
    """All torchvision model names of the given families."""
    import torchvision

    mods = {"classification": torchvision.models, "video": torchvision.models.video,
            "segmentation": torchvision.models.segmentation, "detection": torchvision.models.detection}
    names: list[str] = []
    for fam in families:
        if fam not in mods:
            raise ValueError(f"unknown family {fam!r}: expected one of {FAMILIES}")
        names += torchvision.models.list_models(module=mods[fam])
    return names


def resolutions(name: str, family: str = "classification", requested: int | None = None) -> tuple[int, ...]:
    """Input sizes to try for a model, smallest first."""
    if name.startswith("vit_"):  # built for one image size (see build): a multiple of the patch size
        patch = int(name.rsplit("_", 1)[1])
        return (224 if requested is None else patch * math.ceil(requested / patch),)
    if family == "detection":
        res: tuple[int, ...] = DETECTION_RES
    elif family == "video":
        res = (224,) if name in MAX_BATCH else (32, 64, 112)
    else:
        res = MIN_RES.get(name, DEFAULT_RES)
    if requested is not None:
        res = tuple(sorted({max(requested, res[0]), *(r for r in res if r > requested)}))
    return res


def build(name: str, resolution: int | None = None) -> nn.Module:
    """A torchvision model by name, ``weights=None`` (nothing is downloaded), plain-tensor outputs where possible.

    ``resolution``: the input size for models built for one size (ViT's ``image_size``; see :func:`resolutions`)."""
    import torchvision

    kwargs: dict = {"weights": None}
    if name.startswith("vit_") and resolution is not None:
        kwargs["image_size"] = resolution
    fam = family_of(name)
    if name in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False  # keeps the output a plain tensor in train mode too
        kwargs["init_weights"] = True
    if fam in ("segmentation", "detection"):
        kwargs["weights_backbone"] = None
    if fam == "segmentation" and not name.startswith("lraspp"):
        kwargs["aux_loss"] = False
    return torchvision.models.get_model(name, **kwargs)


def first_output(out) -> torch.Tensor:
    """The main output tensor: the tensor itself, the first of a tuple/list, or ``out['out']``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["out"] if "out" in out else next(v for v in out.values() if isinstance(v, torch.Tensor))
    return out[0]


def make_input(family: str, res: int, batch: int, name: str = "", generator=None) -> torch.Tensor:
    if family == "video":
        return torch.randn(batch, 3, VIDEO_FRAMES.get(name, 4), res, res, generator=generator)
    return torch.randn(batch, 3, res, res, generator=generator)


def _tensor_bytes(obj, seen: set | None = None) -> int:
    """Bytes of every distinct tensor reachable through dataclasses, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in obj)
    if hasattr(obj, "__dataclass_fields__"):
        return sum(_tensor_bytes(getattr(obj, f), seen) for f in obj.__dataclass_fields__)
    return 0


def factor_bytes(opt) -> int:
    """Bytes the KFC optimizer holds for its factors: moving averages (Ω, Γ) plus the damped inverses."""
    return _tensor_bytes(list(getattr(opt, "_running", []))) + _tensor_bytes(dict(getattr(opt, "_inverse", {})))


def _reason(reason: str) -> str:
    """The reason without the module name it names (``"BatchNorm2d 'bn1': normalization layer"`` ->
    ``"BatchNorm2d: normalization layer"``), so that rows group by kind of reason."""
    return re.sub(r" '[^']*'", "", reason)


def _empty_row(name: str, family: str) -> dict:
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


MASK_SEED = 1234


def _fixed_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training-mode loss on the fixed batch with the RNG seeded by MASK_SEED: dropout and stochastic depth draw
    the same masks in every training step and in the evaluations before and after them, so the steps optimise one
    deterministic function and the comparison is not mask noise."""
    with torch.random.fork_rng():
        torch.manual_seed(MASK_SEED)
        return _loss(model(x), y)


def _targets(out, family: str, gen) -> torch.Tensor:
    f = first_output(out)
    if family == "segmentation":  # (B, C, H, W) -> per-pixel classes
        return torch.randint(f.shape[1], (f.shape[0], *f.shape[2:]), generator=gen)
    return torch.randint(f.shape[1], (f.shape[0],), generator=gen)


def run_one(name: str, constructor: Callable[[], nn.Module] | None = None, family: str | None = None, *,
            steps: int = 2, resolution: int | None = None, batch: int = 8, lr: float = 0.003,
            damping: float = 0.1, timing_steps: int = 3, max_factor_dim: int | None = MAX_FACTOR_DIM,
            progress: Callable[[str, dict], None] | None = None) -> dict:
    """One report row (see :data:`ROW_KEYS`); never raises for a model's own failure. ``progress(stage, row)`` is
    called with a copy of the row as each stage starts (the time-limited worker reports through it).
    ``max_factor_dim`` is passed to ``kc.KFC`` (block-diagonal factors above it; None: dense)."""
    import kfc_compile as kc

    family = family or (family_of(name) if constructor is None else "classification")
    row = _empty_row(name, family)
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

        def kfc_step() -> float:
            loss = _fixed_loss(model, x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(loss.detach())

        with torch.no_grad():
            before = float(_fixed_loss(model, x, y))
        losses = [kfc_step() for _ in range(steps)]
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
                timed_loss = kfc_step()
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


def _worker(conn, name, ctor, fam, kwargs, threads: int) -> None:
    torch.set_num_threads(threads)  # the fork server does not inherit the caller's setting

    def progress(stage: str, row: dict) -> None:
        conn.send(("progress", stage, row))

    try:
        row = run_one(name, ctor, fam, progress=progress, **kwargs)
        conn.send(("done", None, row))
    finally:
        conn.close()


def _context(*args):
    """A fork server (children forked from a clean process that preloaded torch: a process that has already run
    OpenMP-parallel torch ops cannot safely fork workers that use it again), or plain fork for arguments that
    cannot be pickled (e.g. lambda constructors)."""
    try:
        pickle.dumps(args)
    except Exception:  # noqa: BLE001 - anything unpicklable
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "kfc_compile.zoo"])
    return ctx


def run_limited(name: str, constructor=None, family: str | None = None, *, time_limit: float, **kwargs) -> dict:
    """``run_one`` in a worker process, stopped after ``time_limit`` seconds (see the module doc)."""
    ctx = _context(name, constructor, family)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_worker, args=(send, name, constructor, family, kwargs, torch.get_num_threads()),
                       daemon=True)
    t0 = time.perf_counter()
    proc.start()
    send.close()
    stage, last, final = "start", None, None
    deadline = time.monotonic() + time_limit
    try:
        while final is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not recv.poll(remaining):
                break
            try:
                kind, new_stage, row = recv.recv()
            except EOFError:  # the worker died without a result
                break
            if kind == "done":
                final = row
            else:
                stage, last = new_stage, row
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        recv.close()
    if final is not None:
        return final
    row = last or _empty_row(name, family or (family_of(name) if constructor is None else "classification"))
    elapsed = time.perf_counter() - t0
    if elapsed >= time_limit:
        why = f"time limit: stopped after {time_limit:g} s"
    else:
        why = f"worker process died (exit code {proc.exitcode}; killed for memory?)"
    if stage == "timing":  # trained with finite losses; only the step timing is missing
        row["error"] = f"{stage}: {why} (step timing not finished)"
    else:
        row["status"], row["error"] = "failed", f"{stage}: {why}"
    row["seconds"] = elapsed
    return row


def _normalise(models) -> list[tuple[str, Callable | None, str | None]]:
    if isinstance(models, str):
        models = [models]
    out: list[tuple[str, Callable | None, str | None]] = []
    for m in models:
        if isinstance(m, str):
            if m == "all":
                out += [(n, None, None) for n in model_names()]
            else:
                out.append((m, None, None))
        elif isinstance(m, (tuple, list)) and len(m) in (2, 3) and isinstance(m[0], str) and callable(m[1]):
            out.append((m[0], m[1], m[2] if len(m) == 3 else None))
        else:
            raise TypeError(f"expected a model name or a (name, constructor[, family]) pair, got {m!r}")
    return out


def run(models, steps: int = 2, resolution: int | None = 32, batch: int = 8, out: str | None = None, *,
        lr: float = 0.003, damping: float = 0.1, progress: bool = True, command: str | None = None,
        timing_steps: int = 3, time_limit: float | None = None,
        max_factor_dim: int | None = MAX_FACTOR_DIM) -> list[dict]:
    """Run the zoo over ``models`` (names, ``"all"``, or ``(name, constructor[, family])``); see the module doc.

    ``time_limit``: seconds per model (each model then runs in a forked worker process; None: in this process).
    With ``out`` (a directory) writes ``zoo.json`` and ``zoo.md`` there, rewritten after every model so an
    interrupted sweep keeps its rows."""
    from tqdm import tqdm

    items = _normalise(models)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "command": command, "steps": steps, "resolution": resolution, "batch": batch,
              "lr": lr, "damping": damping, "max_factor_dim": max_factor_dim, "timing_steps": timing_steps,
              "time_limit": time_limit,
              "threads": torch.get_num_threads(),
              "n_models": len(items)}
    rows: list[dict] = []
    t_start = time.perf_counter()
    bar = tqdm(items, file=sys.stderr, unit="model", disable=not progress)
    for name, ctor, fam in bar:
        bar.set_postfix_str(name)
        kwargs = dict(steps=steps, resolution=resolution, batch=batch, lr=lr, damping=damping,
                      timing_steps=timing_steps, max_factor_dim=max_factor_dim)
        if time_limit is not None and "forkserver" in multiprocessing.get_all_start_methods():
            row = run_limited(name, ctor, fam, time_limit=time_limit, **kwargs)
        else:
            row = run_one(name, ctor, fam, **kwargs)
        trace = row.pop("trace", None)
        rows.append(row)
        if progress:
            tqdm.write(f"{name}: {row['status']} coverage={_pct(row['coverage'])} "
                       f"loss {_num(row['loss_before'])} -> {_num(row['loss_after'])} "
                       f"ratio={_num(row['step_time_ratio'])} {row['seconds']:.1f}s {row['error'] or ''}",
                       file=sys.stderr)
            if trace and os.environ.get("KFC_ZOO_TRACE"):
                tqdm.write(trace, file=sys.stderr)
        header["wall_s"] = round(time.perf_counter() - t_start, 1)
        if out:
            write(rows, out, header)
        gc.collect()
    return rows


def write(rows: list[dict], out: str, header: dict | None = None) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "zoo.json"), "w") as f:
        json.dump({"schema_version": SCHEMA_VERSION, "run": header or {}, "models": rows}, f, indent=1)
    with open(os.path.join(out, "zoo.md"), "w") as f:
        f.write(render(rows, header or {}))


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one), for run headers."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_name()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def _pct(v) -> str:
    return "" if v is None else f"{100 * v:.2f}%"


def _num(v, fmt: str = ".3g") -> str:
    return "" if v is None else format(v, fmt)


def totals(rows: list[dict]) -> dict:
    covs = [r["coverage"] for r in rows if r["coverage"] is not None]
    ratios = [r["step_time_ratio"] for r in rows if r["step_time_ratio"] is not None]
    return {"models": len(rows), **{s: sum(r["status"] == s for r in rows) for s in ("ok", "partial", "failed")},
            "coverage_median": statistics.median(covs) if covs else None, "coverage_min": min(covs) if covs else None,
            "coverage_min_model": min((r for r in rows if r["coverage"] is not None),
                                      key=lambda r: r["coverage"])["name"] if covs else None,
            "ratio_median": statistics.median(ratios) if ratios else None,
            "loss_decreased": sum(bool(r["loss_decreased"]) for r in rows),
            "trained": sum(bool(r["trained"]) for r in rows)}


def render(rows: list[dict], header: dict) -> str:
    t = totals(rows)
    lines = ["# kfc-compile zoo", ""]
    for k in ("command", "date", "machine", "threads", "steps", "resolution", "batch", "lr", "damping",
              "max_factor_dim", "timing_steps", "time_limit", "wall_s"):
        if header.get(k) is not None:
            lines.append(f"* {k}: `{header[k]}`" if k == "command" else f"* {k}: {header[k]}")
    done = f"{len(rows)} of {header.get('n_models', len(rows))}"
    lines += ["", "## Totals", "",
              f"* models run: {done}; ok {t['ok']}, partial (black boxes) {t['partial']}, failed {t['failed']}",
              f"* trained {t['trained']}, loss decreased on the fixed batch {t['loss_decreased']}",
              f"* coverage (share of trainable parameter elements under KFC): median {_pct(t['coverage_median'])}, "
              f"min {_pct(t['coverage_min'])} ({t['coverage_min_model']})",
              f"* median KFC / SGD step-time ratio: {_num(t['ratio_median'])} (steady-state KFC steps: statistics "
              "every step, the inverse refreshes every 20 steps left out; see the zoo module doc)", "",
              "| model | family | status | input | params | KFC layers | kinds | coverage | uncovered (reason: count) "
              "| loss before → after | KFC s/step | SGD s/step | ratio | factor MiB |",
              "|---|---|---|---|---:|---:|---|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in (r["layers_by_kind"] or {}).items())
        unc = "; ".join(f"{k}: {v['count']}" for k, v in (r["uncovered"] or {}).items())
        inp = "x".join(map(str, r["input_shape"][1:])) if r["input_shape"] else ""
        loss = f"{_num(r['loss_before'])} → {_num(r['loss_after'])}" if r["loss_after"] is not None else ""
        mib = _num(r["factor_bytes"] / 2**20, ".1f") if r["factor_bytes"] is not None else ""
        lines.append(f"| {r['name']} | {r['family']} | {r['status']} | {inp} | {r['params'] or 0:,} | "
                     f"{_num(r['kfc_layers'], 'd')} | {kinds} | {_pct(r['coverage'])} | {unc} | {loss} | "
                     f"{_num(r['kfc_step_s'])} | {_num(r['sgd_step_s'])} | {_num(r['step_time_ratio'])} | {mib} |")
    problems = [r for r in rows if r["error"] or r["black_boxes"]]
    if problems:
        lines += ["", "## Failures and black boxes", ""]
        for r in problems:
            if r["error"]:
                lines.append(f"* `{r['name']}` failed: {r['error']}")
            for b in r["black_boxes"] or []:
                lines.append(f"* `{r['name']}` black box `{b['name']}`: {b['reason'][:200]}")
    return "\n".join(lines) + "\n"
