"""What the ranks of tests/test_distributed_fsdp.py run: the model of distributed_cases.py under FSDP2.

Rank r trains ``fully_shard(model)`` (the root, or the root and some of its children as their own FSDP units) on
its shard of the global batch with ``kc.KFC``; the results are gathered into whole tensors so that the parent can
compare them with the single-process run (``distributed_cases.train`` on the global batch).
"""
from __future__ import annotations

import torch
from distributed_cases import counting_inverses, error_of, global_batch, make_model, recording_samples, run_steps, shard
from torch import nn

import kfc_compile as kc


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole tensor (a collective: every rank calls it in the same order)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def nested(model: nn.Sequential) -> nn.Sequential:
    """The same modules, the two convs and their activations as one child block (``0``): an FSDP unit to trace."""
    return nn.Sequential(nn.Sequential(*model[:4]), *model[4:])


def fsdp_model(units: tuple[int, ...] = (), silent: bool = False, block: bool = False) -> nn.Module:
    """The test model with ``fully_shard`` on the children ``units`` and on the root (``block``: :func:`nested`)."""
    from torch.distributed.fsdp import fully_shard

    model = make_model(silent)
    if block:
        model = nested(model)
    for i in units:
        fully_shard(model[i])
    fully_shard(model)
    return model


def train_fsdp(rank: int, world: int, cfg: dict) -> dict:
    """One rank of an FSDP2 run; like ``distributed_cases.train``, with whole parameters and per-rank factors."""
    X, Y = global_batch(sum(cfg["sizes"]))
    x, y = shard(X, cfg["sizes"], rank), shard(Y, cfg["sizes"], rank)
    model = fsdp_model(cfg.get("units", ()), cfg.get("silent", False), cfg.get("block", False))
    kwargs = dict(cfg["kfc"])
    kwargs["loss"] = nn.CrossEntropyLoss(reduction=cfg.get("reduction", "mean"))
    counts: dict[str, int] = {}
    drawn: list = []
    with counting_inverses(counts), recording_samples(drawn):
        opt = kc.KFC(model, **kwargs)
        out = run_steps(model, opt, x, y, cfg["steps"], cfg.get("closure", False), cfg.get("reduction", "mean"))
    out["params"] = [[full(p) for p in ps] for ps in out["params"]]
    out.update(computes=counts, last_step=opt.last_step, damping=opt.param_groups[0]["damping"],
               nbytes=opt.curvature_nbytes(), sharded=[type(p).__name__ for p in model.parameters()])
    return out


def train_many_fsdp(rank: int, world: int, cfgs: list[dict]) -> list[dict]:
    """:func:`train_fsdp` for each configuration in turn, in one process group."""
    return [train_fsdp(rank, world, cfg) for cfg in cfgs]


def build_fsdp(cfg: dict, checkpoint: str | None = None) -> tuple[nn.Module, kc.KFC]:
    """(FSDP2 model, its KFC), restored from a checkpoint of whole tensors (rank 0's, or a single process's)."""
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    saved = None if checkpoint is None else torch.load(checkpoint, weights_only=False)
    if saved is not None:
        model.load_state_dict(saved["model"])  # before sharding: fully_shard shards the loaded values
    fully_shard(model)
    opt = kc.KFC(model, **cfg["kfc"])
    if saved is not None:
        opt.load_state_dict(saved["opt"])
    return model, opt


def fsdp_resume(rank: int, world: int, cfg: dict, directory: str, single: str) -> dict:
    """Checkpoint round trips under FSDP2 (whole parameters after the last step of each).

    Save after 3 steps on rank 0 (``state_dict()`` is a collective) and go on for 2 ("straight"); a fresh run
    resumed from it ("resumed"); a run resumed from the single-process checkpoint ``single`` ("from_single").
    """
    import torch.distributed as dist

    X, Y = global_batch(sum(cfg["sizes"]))
    x, y = shard(X, cfg["sizes"], rank), shard(Y, cfg["sizes"], rank)
    path = f"{directory}/fsdp.pt"
    model, opt = build_fsdp(cfg)
    run_steps(model, opt, x, y, 3, False)
    params = {n: full(t.detach()) for n, t in model.state_dict().items()}
    sd = opt.state_dict()
    if rank == 0:
        torch.save({"model": params, "opt": sd}, path)
    dist.barrier()
    out = {"straight": [full(p) for p in run_steps(model, opt, x, y, 2, False)["params"][-1]]}
    for key, source in (("resumed", path), ("from_single", single)):
        model, opt = build_fsdp(cfg, source)
        out[key] = [full(p) for p in run_steps(model, opt, x, y, 2, False)["params"][-1]]
    return out


def fsdp_bad_setups(rank: int, world: int) -> dict:
    """The errors of set-ups owner preconditioning refuses (their messages, by case)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    column = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)).double()  # tensor-parallel style: dim-1 shards
    for m in column:
        m.weight = nn.Parameter(distribute_tensor(m.weight.detach(), mesh, [Shard(1)]))
        m.bias = nn.Parameter(distribute_tensor(m.bias.detach(), mesh, [Shard(0)]))
    return {"broadcast": error_of(lambda: kc.KFC(fsdp_model(), lr=0.1, distributed="broadcast")),
            "dim1": error_of(lambda: kc.KFC(column, lr=0.1)),
            "compiled_fsdp": error_of(lambda: kc.KFC(torch.compile(fsdp_model(), backend="kfc"), lr=0.1))}


def checkpoints_and_setups(rank: int, world: int, cfg: dict, directory: str, single: str) -> dict:
    """One group for :func:`fsdp_resume` and :func:`fsdp_bad_setups`."""
    return {"resume": fsdp_resume(rank, world, cfg, directory, single), "bad": fsdp_bad_setups(rank, world)}
