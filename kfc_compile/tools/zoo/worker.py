"""Time-limited runs: :func:`run_one` in a worker process that is stopped after a wall-clock limit.

The worker reports each stage's partial row through a pipe, so a model stopped by the limit (or killed for memory)
keeps what was measured before: ``"failed"`` with a ``time limit`` error if the training steps did not finish, else
its status with the error noting the unfinished timing.
"""
from __future__ import annotations

import multiprocessing
import pickle
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from kfc_compile.tools.zoo.measure import empty_row, run_one
from kfc_compile.tools.zoo.models import resolve_family

PRELOAD_IF_IMPORTED = ("torchvision", "timm", "transformers")


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
    """A fork server, or plain fork for arguments that cannot be pickled (e.g. lambda constructors).

    The fork server's children are forked from a clean process that preloaded torch: a process that has already run
    OpenMP-parallel torch ops cannot safely fork workers that use it again. It also preloads dynamo and the model
    libraries this process has imported (timm takes seconds to import: once, not per model).
    """
    try:
        pickle.dumps(args)
    except Exception:  # noqa: BLE001 - anything unpicklable
        return multiprocessing.get_context("fork")
    ctx = multiprocessing.get_context("forkserver")
    libraries = [m for m in PRELOAD_IF_IMPORTED if m in sys.modules]
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "kfc_compile.tools.zoo", *libraries])
    return ctx


def run_limited(name: str, constructor: Callable[[], nn.Module] | None = None, family: str | None = None, *,
                time_limit: float, **kwargs) -> dict:
    """``run_one`` in a worker process, stopped after ``time_limit`` seconds (see the module doc).

    Returns the worker's final row, or, when it was stopped or died, the last partial row it reported with the
    reason in ``error`` (in ``compiled_error`` when only the compiled coverage was left). ``kwargs`` go to
    :func:`run_one` (``case=`` included).
    """
    ctx = _context(name, constructor, family, kwargs)
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
    case = kwargs.get("case")
    row = last or (empty_row(case.name, case.family, kwargs.get("detail", False)) if case is not None else
                   empty_row(name, resolve_family(name, constructor, family)))
    elapsed = time.perf_counter() - t0
    if elapsed >= time_limit:
        why = f"time limit: stopped after {time_limit:g} s"
    else:
        why = f"worker process died (exit code {proc.exitcode}; killed for memory?)"
    if stage == "timing":  # trained with finite losses; only the step timing is missing
        row["error"] = f"{stage}: {why} (step timing not finished)"
    elif stage == "compiled":  # trained and timed; only the compiled coverage is missing
        row["compiled_error"] = why
    else:
        row["status"], row["error"] = "failed", f"{stage}: {why}"
    row["seconds"] = elapsed
    return row
