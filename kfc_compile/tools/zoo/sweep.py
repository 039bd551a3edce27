"""The sweep: :func:`run` over a list of models, one report row each.

With a progress bar, and the report files rewritten after every model (an interrupted sweep keeps its rows).
"""
from __future__ import annotations

import datetime
import gc
import multiprocessing
import os
import sys
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from kfc_compile.tools.zoo.measure import MAX_FACTOR_DIM, run_one
from kfc_compile.tools.zoo.models import model_names
from kfc_compile.tools.zoo.report import machine, num, pct, write
from kfc_compile.tools.zoo.worker import run_limited


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
    interrupted sweep keeps its rows.
    """
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
            tqdm.write(f"{name}: {row['status']} coverage={pct(row['coverage'])} "
                       f"loss {num(row['loss_before'])} -> {num(row['loss_after'])} "
                       f"ratio={num(row['step_time_ratio'])} {row['seconds']:.1f}s {row['error'] or ''}",
                       file=sys.stderr)
            if trace and os.environ.get("KFC_ZOO_TRACE"):
                tqdm.write(trace, file=sys.stderr)
        header["wall_s"] = round(time.perf_counter() - t_start, 1)
        if out:
            write(rows, out, header)
        gc.collect()
    return rows
