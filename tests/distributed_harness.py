"""Run a function on W spawned processes joined in a gloo process group on 127.0.0.1 (tests/test_distributed.py).

``run_ranks(world, fn, *args)`` starts W processes (``spawn``; one thread each), initialises
``init_process_group("gloo", init_method="tcp://127.0.0.1:<free port>")`` with a timeout in each, calls
``fn(rank, world, *args)`` and returns the W results (anything ``torch.save`` can write), by rank. A rank that raises
makes ``run_ranks`` raise with its traceback; a group that does not finish in time is killed.
"""
from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback
from pathlib import Path

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port nobody listens on now (bind port 0 and read back what the OS gave)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple, out: str, timeout_s: float) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    path = Path(out) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s))
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise SystemExit(1) from None


def run_ranks(world: int, fn, *args, timeout_s: float = 120.0) -> list:
    """``fn(rank, world, *args)`` on each of ``world`` ranks of a fresh gloo group; their results by rank."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as out:
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, out, timeout_s / 2))
                 for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
            p.join()
        results = []
        errors = []
        for r in range(world):
            path = Path(out) / f"rank{r}.pt"
            if not path.exists():
                errors.append(f"rank {r}: no result ({'killed after timeout' if alive else 'died'})")
                continue
            res = torch.load(path, weights_only=False)
            if res["ok"]:
                results.append(res["result"])
            else:
                errors.append(f"rank {r}:\n{res['error']}")
        if errors:
            raise RuntimeError("distributed run failed:\n" + "\n".join(errors))
        return results
