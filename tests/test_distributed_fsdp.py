"""Owner preconditioning: KFC under FSDP2 (``fully_shard``) and ``distributed="owner"`` under DDP, against one process.

Each test starts one gloo process group (tests/distributed_harness.py) and runs several configurations in it; the
parent computes the single-process references on the global batch (tests/distributed_cases.py). Under owner
preconditioning every layer's factors and inverse live on one rank: the test checks that exactly one rank holds
each layer's factors (≤ 1e-12 relative to the single process after step 1) and computes its inverses, and that the
parameters after every step equal the single-process ones (≤ 1e-10 relative, float64).
"""
from __future__ import annotations

import pytest
import torch
from distributed_cases import build, data, run_steps, save, train_many
from distributed_harness import run_ranks
from fsdp_cases import checkpoints_and_setups, train_many_fsdp
from test_distributed import BASE, STEPS, rel

#: layer names of fsdp_cases.nested (the convs in block 0) → those of the single-process model
NESTED = {"0.0": "0", "0.2": "2", "3": "6", "6": "9"}


def _configs(world: int) -> list[dict]:
    eq = [4] * world
    cfgs = [
        {"sizes": eq, "steps": STEPS, "kfc": dict(BASE, fisher="empirical", damping_method="factored")},
        {"sizes": eq, "steps": STEPS, "units": (0,), "block": True,  # in-pass type-2 backwards through a unit
         "kfc": dict(BASE, fisher="type-2", damping_method="eigen")},
        # an FSDP unit inside the model (the conv block) and one with parameters of its own (the LayerNorm)
        {"sizes": eq, "steps": STEPS, "units": (0, 4), "block": True, "closure": True,
         "kfc": dict(BASE, fisher="empirical", mode="adaptive", lr=1.0, lm_interval=2, fallback="adam")},
    ]
    if world == 2:
        cfgs.append({"sizes": eq, "steps": STEPS,
                     "kfc": dict(BASE, fisher="type-2", clip_curvature="factored", clip_on="update",
                                  max_factor_dim=40)})
    return cfgs + [SUBSET(world)]


def SUBSET(world: int) -> dict:  # noqa: N802 - a constant of the world size
    """Statistics on the leading half of each rank's shard (a separate pass): compared with DDP, not one process."""
    return {"sizes": [4] * world, "steps": 3, "kfc": dict(BASE, fisher="type-2", stats_fraction=0.5)}


def _ddp_configs(world: int) -> list[dict]:
    eq = [4] * world
    empirical = [{"sizes": eq, "steps": STEPS, "kfc": dict(BASE, fisher="empirical", distributed="owner")}]
    return (empirical if world == 2 else []) + [
            {"sizes": eq, "steps": STEPS, "kfc": dict(BASE, fisher="type-2", damping_method="eigen",
                                                      distributed="owner")},
            SUBSET(world)]  # DDP's broadcast mode: the twin of the FSDP subset run


def _both(rank: int, world: int, fsdp: list[dict], ddp: list[dict]) -> dict:
    return {"fsdp": train_many_fsdp(rank, world, fsdp), "ddp": train_many(rank, world, ddp)}


def _check(cfg: dict, runs: list[dict], ref: dict, names: dict[str, str] | None = None) -> None:
    names = names or {n: n for n in ref["factors"]}
    assert sorted(names.values()) == sorted(ref["factors"])
    for name, ref_name in names.items():
        held = [r["factors"][name] for r in runs if r["factors"][name] is not None]
        assert len(held) == 1, (name, len(held))  # the owner's only
        f = ref["factors"][ref_name]
        assert rel(held[0].A, f.A) <= 1e-12 and rel(held[0].G, f.G) <= 1e-12, name
        computed = [r["computes"].get(name, 0) for r in runs]
        assert sorted(computed) == [0] * (len(runs) - 1) + [ref["computes"][ref_name]], (name, computed)
    for step in range(cfg["steps"]):
        for r in runs:
            assert all(torch.equal(a, b) for a, b in zip(r["params"][step], runs[0]["params"][step], strict=True))
        for a, b in zip(runs[0]["params"][step], ref["params"][step], strict=True):
            assert rel(a, b) <= 1e-10, step
    assert runs[0]["damping"] == pytest.approx(ref["damping"], rel=1e-12)
    if cfg["kfc"].get("mode", "pre") == "pre":
        assert runs[0]["last_step"]["nu"] == pytest.approx(ref["last_step"]["nu"], rel=1e-10)


@pytest.mark.parametrize("world", [2, 3])
def test_owner_preconditioning_matches_single_process(world):
    """FSDP2 (root unit, nested units; 3 ranks: uneven and empty shards) and DDP with distributed="owner".

    Each layer's factors are on its owner only and equal the concatenated batch's; every inverse is computed by
    exactly one rank, as often as in the single process; 5 steps (empirical / type-2 Fisher, factored / eigen
    damping, exact and factored clipping, adaptive with Levenberg–Marquardt, SGD and Adam fallbacks) give the
    single-process parameters, bitwise equal on all ranks.
    """
    fsdp, ddp = _configs(world), _ddp_configs(world)
    out = run_ranks(world, _both, fsdp, ddp)
    from distributed_cases import train

    for c, cfg in enumerate(fsdp[:-1]):
        runs = [r["fsdp"][c] for r in out]
        assert all(t == "DTensor" for t in runs[0]["sharded"])
        _check(cfg, runs, train(0, 0, cfg), NESTED if cfg.get("block") else None)
    for c, cfg in enumerate(ddp[:-1]):
        _check(cfg, [r["ddp"][c] for r in out], train(0, 0, cfg))
    twin = out[0]["ddp"][-1]  # the subset pass under FSDP2 = under DDP (each rank's leading examples)
    for r in out:
        for step in range(SUBSET(world)["steps"]):
            for a, b in zip(r["fsdp"][-1]["params"][step], twin["params"][step], strict=True):
                assert rel(a, b) <= 1e-10, step
    if world == 3:  # the 4 layers' owners: all 3 ranks take part
        assert all(any(r["fsdp"][0]["computes"]) for r in out)


def test_fsdp_checkpoints_and_refused_setups(tmp_path):
    """FSDP2 checkpoints, and the set-ups owner preconditioning refuses, in one 2-rank group.

    * Rank 0 saves (``state_dict()`` gathers the owners' layers and the sharded buffers), every rank loads; the
      resume is bitwise the uninterrupted run, and a single-process checkpoint continues as one process does.
    * Refused with an error naming the problem: ``distributed="broadcast"`` with FSDP2, a KFC weight sharded on
      dim 1 (tensor parallelism), ``torch.compile(fsdp_model, backend="kfc")`` (a live registry under FSDP2;
      ``torch.compile(DDP(model), backend="kfc")`` is supported: tests/test_distributed_compile.py).
    """
    cfg = {"sizes": [4, 4], "kfc": dict(BASE, fisher="empirical", damping_method="eigen")}
    single = str(tmp_path / "single.pt")
    x, y = data(0, 0, cfg)
    model, _, opt = build(0, cfg)
    run_steps(model, opt, x, y, 3, False)
    save(model, opt, single)
    single_after = run_steps(model, opt, x, y, 2, False)["params"][-1]
    out = run_ranks(2, checkpoints_and_setups, cfg, str(tmp_path), single)
    for bad in (r["bad"] for r in out):
        assert bad["broadcast"].startswith("ValueError: distributed='broadcast' with sharded DTensor parameters")
        assert bad["dim1"].startswith("NotImplementedError: parameters are sharded DTensors in a way KFC cannot")
        assert "the weight of KFC layer '0'" in bad["dim1"] and "Shard(dim=1)" in bad["dim1"]
        assert bad["compiled_fsdp"].startswith("NotImplementedError: FSDP2 with torch.compile(..., backend='kfc')")
    out = [r["resume"] for r in out]
    for r in out:
        assert all(torch.equal(p, q) for p, q in zip(r["straight"], r["resumed"], strict=True))
        assert all(torch.equal(p, q) for p, q in zip(r["straight"], out[0]["straight"], strict=True))
        for p, q in zip(r["from_single"], single_after, strict=True):
            assert rel(p, q) <= 1e-10
