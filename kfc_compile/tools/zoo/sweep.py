"""The sweep: :func:`run` over a list of models, one report row each.

With a progress bar, and the report files rewritten after every model (an interrupted sweep keeps its rows).
"""
from __future__ import annotations

import datetime
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import time

import torch
from tqdm import tqdm

from kfc_compile.tools.zoo.cases import Case, image_case
from kfc_compile.tools.zoo.measure import MAX_FACTOR_DIM, run_one
from kfc_compile.tools.zoo.models import model_names
from kfc_compile.tools.zoo.report import machine, num, pct, write
from kfc_compile.tools.zoo.worker import run_limited


def _normalise(models, resolution: int | None) -> list[Case]:
    if isinstance(models, (str, Case)):
        models = [models]
    out: list[Case] = []
    for m in models:
        if isinstance(m, Case):
            out.append(m)
        elif isinstance(m, str):
            names = model_names() if m == "all" else [m]
            out += [image_case(n, resolution=resolution) for n in names]
        elif isinstance(m, (tuple, list)) and len(m) in (2, 3) and isinstance(m[0], str) and callable(m[1]):
            out.append(image_case(m[0], m[1], m[2] if len(m) == 3 else None, resolution))
        else:
            raise TypeError(f"expected a model name, a (name, constructor[, family]) pair or a zoo Case, got {m!r}")
    return out


def _commit() -> str | None:
    """The short hash of the checkout the zoo runs from (None outside a git checkout)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() or None


def run(models, steps: int = 2, resolution: int | None = 32, batch: int = 8, out: str | None = None, *,
        lr: float = 0.003, damping: float = 0.1, progress: bool = True, command: str | None = None,
        timing_steps: int = 3, time_limit: float | None = None,
        max_factor_dim: int | None = MAX_FACTOR_DIM, detail: bool = False, compiled: bool = False,
        source: str | None = None, resume: bool = False) -> list[dict]:
    """Run the zoo over ``models`` (names, ``"all"``, ``(name, constructor[, family])``, ``Case``s); see the module doc.

    ``time_limit``: seconds per model (each model then runs in a forked worker process; None: in this process).
    ``detail`` adds the conv/linear share, tied weights, front end and KFC's warnings to every row
    (``DETAIL_KEYS``), ``compiled`` the coverage under ``torch.compile(backend="kfc")``; ``source`` names the
    models' source in the report header. With ``out`` (a directory) writes ``zoo.json`` and ``zoo.md`` there,
    rewritten after every model so an interrupted sweep keeps its rows; ``resume`` keeps the rows of an earlier
    run in ``out/zoo.json`` for the models it has (the header counts them as ``resumed``) and runs the others.
    """
    items = _normalise(models, resolution)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "machine": machine(), "command": command, "steps": steps, "resolution": resolution, "batch": batch,
              "lr": lr, "damping": damping, "max_factor_dim": max_factor_dim, "timing_steps": timing_steps,
              "time_limit": time_limit, "source": source, "detail": detail or None, "compiled": compiled or None,
              "threads": torch.get_num_threads(), "commit": _commit(),
              "n_models": len(items)}
    order = {c.name: i for i, c in enumerate(items)}
    rows: list[dict] = []
    if resume and out and os.path.exists(os.path.join(out, "zoo.json")):
        with open(os.path.join(out, "zoo.json")) as f:
            earlier = json.load(f)
        done = {r["name"]: r for r in earlier["models"]}
        rows = [done[c.name] for c in items if c.name in done]
        items = [c for c in items if c.name not in done]
        before = earlier.get("run", {})
        header.update(resumed=len(rows), started=before.get("started") or before.get("date"),
                      wall_s_before=round(before.get("wall_s", 0) + before.get("wall_s_before", 0), 1))
    t_start = time.perf_counter()
    bar = tqdm(items, file=sys.stderr, unit="model", disable=not progress)
    for case in bar:
        name = case.name
        bar.set_postfix_str(name)
        kwargs = dict(case=case, steps=steps, batch=batch, lr=lr, damping=damping, timing_steps=timing_steps,
                      max_factor_dim=max_factor_dim, detail=detail, compiled=compiled)
        if time_limit is not None and "forkserver" in multiprocessing.get_all_start_methods():
            row = run_limited(name, time_limit=time_limit, **kwargs)
        else:
            row = run_one(name, **kwargs)
        trace = row.pop("trace", None)
        rows.append(row)
        rows.sort(key=lambda r: order.get(r["name"], len(order)))
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
