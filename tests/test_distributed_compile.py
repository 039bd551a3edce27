"""KFC of a DDP model whose layers come from dynamo: ``DDP(torch.compile(model, backend="kfc"))`` and dynamo capture.

Both register their layers in a live registry as dynamo compiles (distributed KFC checks at that point that every
rank compiled the same layers). In one 2-rank gloo group: the same layers as the eager (fx) DDP run, and after 3
KFC steps the eager-DDP parameters (float64, ≤ 1e-10 relative), bitwise equal on both ranks.
"""
from __future__ import annotations

import torch
from distributed_cases import global_batch, make_model, run_steps, shard
from distributed_harness import run_ranks
from test_distributed import BASE, rel


def _runs(rank: int, world: int) -> dict:
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    import kfc_compile as kc

    X, Y = global_batch(4 * world)
    x, y = shard(X, [4] * world, rank), shard(Y, [4] * world, rank)
    out = {}
    for kind in ("eager", "compiled", "capture"):
        model = make_model()
        ddp = DDP(torch.compile(model, backend="kfc") if kind == "compiled" else model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = kc.KFC(ddp, **dict(BASE, fisher="type-2"), frontend="dynamo" if kind == "capture" else "fx")
            steps = run_steps(ddp, opt, x, y, 3, False)
        out[kind] = {"params": steps["params"], "layers": [la.name for la in opt.layers],
                     "live": opt._estimator.live}
    return out


def test_dynamo_front_ends_under_ddp_match_eager():
    """The compiled and captured DDP models register the eager layers and take the eager-DDP steps."""
    out = run_ranks(2, _runs)
    for r in out:
        assert r["eager"]["layers"] == ["0", "2", "6", "9"] and not r["eager"]["live"]
        for kind in ("compiled", "capture"):
            assert r[kind]["layers"] == r["eager"]["layers"] and r[kind]["live"], kind
            for step in range(3):
                for a, b in zip(r[kind]["params"][step], r["eager"]["params"][step], strict=True):
                    assert rel(a, b) <= 1e-10, (kind, step)
                assert all(torch.equal(a, b) for a, b in zip(r[kind]["params"][step], out[0][kind]["params"][step],
                                                             strict=True))
