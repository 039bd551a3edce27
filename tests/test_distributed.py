"""Distributed KFC under DDP (gloo, spawned processes on 127.0.0.1) against the single-process run on the global batch.

Each test starts one process group (tests/distributed_harness.py) and runs several configurations in it
(tests/distributed_cases.py); the parent computes the single-process references. Tolerances: factors ≤ 1e-12 and
parameters ≤ 1e-10 relative (float64), the ranks' parameters bitwise equal.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from distributed_cases import build, data, make_model, run_steps, save, streams_checkpoints_setups, train, train_many
from distributed_harness import run_ranks

import kfc_compile as kc

# clip_curvature="exact": distributed KFC resolves "auto" to the exact ν, and the single-process reference must
# measure the same ν (its "auto" would be the factored ν of the step)
BASE = dict(lr=0.1, momentum=0.9, stats_fraction=1.0, clip=0.3, clip_fraction=1.0, inverse_every=2, damping=1e-2,
            weight_decay=1e-3, clip_curvature="exact")
STEPS = 5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _configs(world: int) -> list[dict]:
    """The configurations: 5 steps on equal shards, or the first step's factors on unequal ones.

    Equal shards: each Fisher, damping method and mode, live-block and blocked inverses; unequal shards (3 ranks).
    """
    eq = [4] * world
    cfgs = [
        {"sizes": eq, "steps": STEPS, "kfc": dict(BASE, fisher="empirical", damping_method="factored")},
        {"sizes": eq, "steps": STEPS, "kfc": dict(BASE, fisher="type-2", damping_method="eigen")},
        {"sizes": eq, "steps": STEPS, "silent": True, "kfc": dict(BASE, fisher="type-2", damping_method="eigen")},
        {"sizes": eq, "steps": STEPS, "kfc": dict(BASE, fisher="empirical", max_factor_dim=40)},
        {"sizes": eq, "steps": STEPS, "kfc": dict(BASE, fisher="type-2", approx="reduce", fallback="adam",
                                                  clip_curvature="factored", clip_on="update")},
        {"sizes": eq, "steps": STEPS, "closure": True,
         "kfc": dict(BASE, fisher="empirical", mode="adaptive", lr=1.0, lm_interval=2, damping_method="factored")},
    ]
    if world == 2:  # every rank inverts every layer
        cfgs.append({"sizes": eq, "steps": STEPS, "kfc": dict(BASE, fisher="type-2", distributed="replicate")})
    if world == 3:
        cfgs.append({"sizes": [3, 4, 6], "steps": 1, "kfc": dict(BASE, fisher="type-2")})
        cfgs.append({"sizes": [3, 4, 6], "steps": 2, "reduction": "sum", "kfc": dict(BASE, fisher="empirical")})
    return cfgs


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_matches_single_process(world):
    """Factors after step 1 are the concatenated batch's; 5 steps give the single-process parameters on every rank.

    Every refresh computes each layer's inverse on exactly one rank (the computes are counted at
    ``LayerInverse.compute``), as often as the single process does; with 3 ranks and 4 layers some rank owns two.
    With unequal shards the factors are still the global batch's (an example-weighted mean) and the ranks agree;
    the parameters are not compared with the single process there, since DDP's gradient is then the mean of the
    shards' gradients (and a sum loss's curvature scale the mean shard size).
    """
    cfgs = _configs(world)
    results = run_ranks(world, train_many, cfgs)
    for c, cfg in enumerate(cfgs):
        ref = train(0, 0, cfg)
        runs = [r[c] for r in results]
        for name, f in ref["factors"].items():
            for r in runs:
                assert rel(r["factors"][name].A, f.A) <= 1e-12, (c, name)
                assert rel(r["factors"][name].G, f.G) <= 1e-12, (c, name)
                assert torch.equal(r["factors"][name].A, runs[0]["factors"][name].A)  # the same on every rank
                assert torch.equal(r["factors"][name].G, runs[0]["factors"][name].G)
        owners = {}
        if cfg["kfc"].get("distributed") == "replicate":
            assert all(r["computes"] == ref["computes"] for r in runs), c
            runs_owned = []
        else:
            runs_owned = runs
        for rank, r in enumerate(runs_owned):
            for name, n in r["computes"].items():
                assert name not in owners, f"config {c}: layer {name} inverted on ranks {owners[name]} and {rank}"
                owners[name] = rank
                assert n == ref["computes"][name], (c, name, n, ref["computes"][name])
        assert not runs_owned or set(owners) == set(ref["computes"]), c
        if world == 3:
            assert len(set(owners.values())) == 3 and len(owners) == 4
        for r in runs:  # the inverse kinds the configuration is there for reached every rank
            assert r["live"]["6"] == cfg.get("silent", False) and r["blocked"]["6"] == ("max_factor_dim" in cfg["kfc"])
        if len(set(cfg["sizes"])) > 1:  # the ranks still agree; a sum loss's scale is the mean shard size
            for r in runs:
                assert all(torch.equal(a, b) for a, b in zip(r["params"][-1], runs[0]["params"][-1], strict=True))
                assert r["scale"] == (sum(cfg["sizes"]) / world if cfg.get("reduction") == "sum" else 1.0)
            continue
        for step in range(cfg["steps"]):
            for r in runs:
                assert all(torch.equal(a, b) for a, b in zip(r["params"][step], runs[0]["params"][step], strict=True))
            for a, b in zip(runs[0]["params"][step], ref["params"][step], strict=True):
                assert rel(a, b) <= 1e-10, (c, step)
        assert runs[0]["damping"] == pytest.approx(ref["damping"], rel=1e-12)
        if cfg["kfc"].get("mode", "pre") == "pre":
            assert runs[0]["last_step"]["nu"] == pytest.approx(ref["last_step"]["nu"], rel=1e-10)


def test_bad_setups_fail_clearly():
    """Asking for distributed KFC without a process group, or an unknown setting, raises naming the fix."""
    assert not torch.distributed.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        kc.KFC(make_model(), lr=0.1, distributed=True)
    with pytest.raises(ValueError, match="unknown distributed 'ring'"):
        kc.KFC(make_model(), lr=0.1, distributed="ring")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no process group: a plain module is single-process, silently
        kc.KFC(make_model(), lr=0.1, distributed=None)


def _single_checkpoint(cfg: dict, path: str) -> list[torch.Tensor]:
    """The single-process run on the global batch: save after 3 steps, the parameters after 2 more."""
    x, y = data(0, 0, cfg)
    model, _, opt = build(0, cfg)
    run_steps(model, opt, x, y, 3, False)
    save(model, opt, path)
    return run_steps(model, opt, x, y, 2, False)["params"][-1]


def test_mc_streams_checkpoints_and_refused_setups(tmp_path):
    """MC targets under DDP, checkpoints, and the set-ups distributed KFC refuses, in one 2-rank group.

    * MC: the same seed gives bitwise the same run; ranks on identical data draw different targets (their own
      streams); another seed draws others.
    * Checkpoints: saved on rank 0 and loaded on all, a resume is bitwise the uninterrupted run (MC Fisher on a
      statistics subset: the streams resume too); a single-process checkpoint continues in DDP as the single
      process does, and a DDP checkpoint continues in a single process as DDP does (≤ 1e-10).
    * Refused: distributed=False with DDP, options or layers that differ between ranks, DTensor parameters; a plain
      module under a multi-rank process group warns; a singular factor (damping 0) on its owner raises on every
      rank.
    """
    sizes = [4, 4]
    mc = dict(BASE, fisher="mc", stats_fraction=0.5, damping_method="eigen")
    mc_cfgs = [{"sizes": sizes, "steps": 3, "seed": s, "same_data": True, "kfc": mc} for s in (5, 5, 6)]
    exact = {"sizes": sizes, "kfc": dict(BASE, fisher="empirical")}
    (tmp_path / "mc").mkdir()
    (tmp_path / "exact").mkdir()
    single = str(tmp_path / "single.pt")
    single_after = _single_checkpoint(exact, single)
    jobs = [({"sizes": sizes, "kfc": dict(mc, generator=None)}, str(tmp_path / "mc"), None),
            (exact, str(tmp_path / "exact"), single)]
    out = run_ranks(2, streams_checkpoints_setups, mc_cfgs, jobs)

    same, again, other = out[0]["mc"]
    for rank in range(2):
        a, b = out[rank]["mc"][0], out[rank]["mc"][1]
        assert all(torch.equal(p, q) for p, q in zip(a["params"][-1], b["params"][-1], strict=True))
    assert len(same["drawn"]) == 3  # one sampled-target backward per statistics step
    assert all(torch.equal(p, q) for p, q in zip(same["drawn"], again["drawn"], strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(same["drawn"], out[1]["mc"][0]["drawn"], strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(same["drawn"], other["drawn"], strict=True))

    for rank in range(2):
        mc_job, exact_job = out[rank]["resume"]
        assert all(torch.equal(p, q) for p, q in zip(mc_job["straight"], mc_job["resumed"], strict=True))
        assert all(torch.equal(p, q) for p, q in zip(exact_job["straight"], exact_job["resumed"], strict=True))
        for p, q in zip(exact_job["from_single"], single_after, strict=True):
            assert rel(p, q) <= 1e-10
    x, y = data(0, 0, exact)
    model, _, opt = build(0, exact, str(tmp_path / "exact" / "ddp.pt"))
    back = run_steps(model, opt, x, y, 2, False)["params"][-1]
    for p, q in zip(back, out[0]["resume"][1]["straight"], strict=True):
        assert rel(p, q) <= 1e-10

    for rank in range(2):
        bad = out[rank]["bad"]
        assert bad["false_with_ddp"].startswith("ValueError: distributed=False with a DistributedDataParallel")
        assert "KFC options differ between rank" in bad["options_differ"] and "inverse_every" in bad["options_differ"]
        assert "has other KFC layers" in bad["layers_differ"]
        assert bad["dtensor"].startswith("NotImplementedError: parameters are sharded DTensors")
        assert any("drift apart" in m for m in bad["plain_module_warning"])
    failures = [out[rank]["bad"]["refresh_failure"] for rank in range(2)]  # raised everywhere, nobody left waiting
    assert any(f.startswith("SingularFactorError") for f in failures)
    assert all(f.startswith(("SingularFactorError", "RuntimeError: the KFC inverse refresh failed on rank"))
               for f in failures)
