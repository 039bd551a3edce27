"""Lazy factor sync under DDP: factors folded locally, averaged over ranks only when an inverse needs them.

Each rank folds its batch factors with the weight W·n_r/N; ``Distributed.settle`` averages the running factors
right before an inverse refresh (and in ``state_dict`` / ``factors``). Checked against the single-process run on
the global batch (float64): at every refresh the factors are the single-process ones (≤ 1e-12 relative) with
stats_every=1, inverse_every=3, on equal and unequal shards, with a layer that only rank 0 records, and from
``KFC.factors()`` between refreshes; the factor all-reduce runs once per refresh, not once per statistics step; a
``state_dict`` taken mid-window (factors pending) holds the single-process factors and a resume from it is
bitwise the uninterrupted run.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from distributed_harness import run_ranks
from torch import nn

import kfc_compile as kc

# clip_curvature="exact": distributed KFC's "auto", which the single-process reference must match
KFC = dict(lr=0.1, momentum=0.9, stats_fraction=1.0, clip=0.3, clip_fraction=1.0, stats_every=1, inverse_every=3,
           damping=1e-2, weight_decay=1e-3, clip_curvature="exact")
STEPS = 6
REFRESHES = (1, 2, 3, 6)  # steps 1–3 and every inverse_every


class Net(nn.Module):
    """Conv, linear, and an ``extra`` linear applied to the first ``rows`` rows only (0: called on no rows)."""

    def __init__(self, rows: int | None):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(75, 6),
                                  nn.Tanh())
        self.extra = nn.Linear(6, 6) if rows is not None else None
        self.head = nn.Linear(6, 3)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        if self.rows is not None:
            r = self.rows
            h = torch.cat([h[:r] + torch.tanh(self.extra(h[:r])), h[r:]])
        return self.head(h)


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A different global batch at each step (the moving averages see new statistics every time)."""
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
            for _ in range(STEPS + 3)]


def rows_of(cfg: dict, rank: int, world: int) -> int | None:
    """The rows ``extra`` is applied to: all of rank 0's (single process: the global batch's first, rank 0's)."""
    if not cfg.get("extra"):
        return None
    return cfg["sizes"][0] if rank == 0 else 0


def build(cfg: dict, rank: int, world: int, checkpoint: dict | None = None):
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = Net(rows_of(cfg, rank, world)).double()
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
    wrapped = DDP(model) if world else model
    opt = kc.KFC(wrapped, **dict(KFC, **cfg.get("kfc", {})))
    if checkpoint is not None:
        opt.load_state_dict(checkpoint["opt"])
    return model, wrapped, opt


def step(wrapped, opt, xy: tuple[torch.Tensor, torch.Tensor], cfg: dict, rank: int, world: int) -> None:
    x, y = xy
    if world:
        lo = sum(cfg["sizes"][:rank])
        x, y = x[lo:lo + cfg["sizes"][rank]], y[lo:lo + cfg["sizes"][rank]]
    opt.zero_grad()
    F.cross_entropy(wrapped(x), y).backward()
    opt.step()


def run(rank: int, world: int, cfg: dict) -> dict:
    """``STEPS`` steps; after each, the parameters and (at refreshes) every layer's running factors."""
    data = batches(sum(cfg["sizes"]))
    model, wrapped, opt = build(cfg, rank, world)
    out: dict = {"params": [], "factors": {}}
    for k in range(1, STEPS + 1):
        step(wrapped, opt, data[k - 1], cfg, rank, world)
        out["params"].append([p.detach().clone() for p in model.parameters()])
        if k in REFRESHES:  # read in place: no settle here, so this is what the refresh inverted
            out["factors"][k] = {s.name: s.dense_factors() for s in opt.layer_states()}
        elif k == cfg.get("factors_at"):  # pending: KFC.factors() averages first (a collective under DDP)
            out["factors"][k] = {s.name: opt.factors(s.name) for s in opt.layer_states()}
    if world:
        out["traffic"] = {n: t.calls for n, t in opt._dist.comm.traffic.items()}
    return out


def checkpoint(rank: int, world: int, cfg: dict) -> dict:
    """4 steps (step 4's statistics pending), ``state_dict`` on every rank, 3 more; a fresh run resumed from it."""
    data = batches(sum(cfg["sizes"]))
    model, wrapped, opt = build(cfg, rank, world)
    for k in range(4):
        step(wrapped, opt, data[k], cfg, rank, world)
    pending = sum(opt._dist._is_pending(s) for s in opt.layer_states()) if world else 0
    # a collective under DDP: every rank calls it; written at once (the state_dict shares the live tensors)
    state = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    saved = {s.name: s.dense_factors() for s in opt.layer_states()}
    for k in range(4, 7):
        step(wrapped, opt, data[k], cfg, rank, world)
    straight = [p.detach().clone() for p in model.parameters()]
    state = torch.load(state, weights_only=False)
    model, wrapped, opt = build(cfg, rank, world, state)
    for k in range(4, 7):
        step(wrapped, opt, data[k], cfg, rank, world)
    return {"pending": pending, "saved": saved, "straight": straight,
            "resumed": [p.detach().clone() for p in model.parameters()]}


def _roundtrip(state: dict):
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return buf


def ranks_main(rank: int, world: int, cfgs: list[dict], ckpts: list[dict]) -> dict:
    return {"runs": [run(rank, world, c) for c in cfgs], "checkpoints": [checkpoint(rank, world, c) for c in ckpts]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_lazy_factor_sync_matches_single_process():
    """Factors at every refresh, parameters, traffic and a mid-window checkpoint, against the single process."""
    cfgs = [{"sizes": [4, 4], "kfc": dict(fisher="type-2", damping_method="eigen")},
            {"sizes": [4, 4], "factors_at": 4, "kfc": dict(fisher="empirical")},
            # unequal shards: DDP's gradient is then the mean of the shards' means, not the global batch's, so the
            # parameters stay put (lr 0) and the factors are the moving averages of the global batches' statistics
            {"sizes": [3, 5], "kfc": dict(fisher="type-2", lr=0.0)},
            {"sizes": [4, 4], "extra": True, "kfc": dict(fisher="empirical")}]
    ckpts = [{"sizes": [4, 4], "kfc": dict(fisher="type-2")},  # exact: compared with the single process
             {"sizes": [4, 4], "kfc": dict(fisher="mc", stats_fraction=0.5)}]  # the MC streams resume too
    out = run_ranks(2, ranks_main, cfgs, ckpts)
    for c, cfg in enumerate(cfgs):
        ref = run(0, 0, cfg)
        runs = [o["runs"][c] for o in out]
        for k in ref["factors"]:
            for name, f in ref["factors"][k].items():
                if f is None:
                    assert all(r["factors"][k][name] is None for r in runs)
                    continue
                for r in runs:
                    assert rel(r["factors"][k][name].A, f.A) <= 1e-12, (c, k, name)
                    assert rel(r["factors"][k][name].G, f.G) <= 1e-12, (c, k, name)
                    assert torch.equal(r["factors"][k][name].A, runs[0]["factors"][k][name].A)
        if cfg.get("extra"):  # only rank 0 recorded it, and it has factors (the first n0 rows' statistics)
            assert ref["factors"][1]["extra"] is not None
        for r in runs:  # one factor all-reduce per refresh (and factors() call), one count all-reduce per step
            assert r["traffic"]["factors"] == len(ref["factors"]), (c, r["traffic"])
            assert r["traffic"]["counts"] == STEPS, (c, r["traffic"])
        for k in range(STEPS):
            assert all(torch.equal(a, b) for a, b in zip(runs[0]["params"][k], runs[1]["params"][k], strict=True))
            if len(set(cfg["sizes"])) == 1:
                for a, b in zip(runs[0]["params"][k], ref["params"][k], strict=True):
                    assert rel(a, b) <= 1e-10, (c, k)

    ref = checkpoint(0, 0, ckpts[0])
    for j in range(len(ckpts)):
        for o in out:
            got = o["checkpoints"][j]
            assert got["pending"] == 3  # step 4 left every layer's factors folded locally only
            assert all(torch.equal(a, b) for a, b in zip(got["straight"], got["resumed"], strict=True))
            assert all(torch.equal(a, b) for a, b in zip(got["straight"], out[0]["checkpoints"][j]["straight"],
                                                         strict=True))
    for o in out:
        for name, f in ref["saved"].items():  # the checkpoint holds the global batch's factors
            g = o["checkpoints"][0]["saved"][name]
            assert rel(g.A, f.A) <= 1e-12 and rel(g.G, f.G) <= 1e-12, name
