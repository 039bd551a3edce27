"""What the ranks of tests/test_distributed_checkpoint.py run: KFC checkpoints through torch.distributed.checkpoint.

A run is the float64 test model of distributed_cases.py on the global batch ``global_batch(N)``, rank r training on
its contiguous shard (equal shards, so a mean loss is the global batch's under any world size): plain (world 0),
``DDP(model)`` or ``fully_shard(model)``. A checkpoint is ``dcp.save({"model": get_model_state_dict(model),
"optim": opt.distributed_state_dict()})``; a resume builds a fresh model and KFC, takes their dicts as the
template, ``dcp.load``s into it and applies it. Parameters are returned as whole tensors.
"""
from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from distributed_cases import global_batch, make_model, run_steps, shard
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

import kfc_compile as kc

N = 12  # the global batch: equal shards at 1, 2 and 3 ranks
BEFORE, AFTER = 4, 3  # steps before the checkpoint (inverse_every=2: step 5 uses the saved inverses) and after


def full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole tensor (a collective), or ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def data(world: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard of the global batch (world 0 or 1: all of it)."""
    X, Y = global_batch(N)
    if world <= 1:
        return X, Y
    sizes = [N // world] * world
    return shard(X, sizes, rank), shard(Y, sizes, rank)


def build(kind: str, kfc: dict) -> tuple[nn.Module, nn.Module, kc.KFC]:
    """(model, what is trained and checkpointed, its KFC) for kind ``"plain"``, ``"ddp"``, ``"ddp_owner"``, ``"fsdp"``.

    ``"ddp_owner"``: DDP with ``distributed="owner"`` (each layer's factors and inverse on its owner only).
    """
    model = make_model()
    if kind == "ddp_owner":
        kfc = dict(kfc, distributed="owner")
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        trained = model
    elif kind.startswith("ddp"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        trained = DDP(model)
    else:
        trained = model
    return model, trained, kc.KFC(trained, **kfc)


def params(model: nn.Module) -> list[torch.Tensor]:
    """The model's parameters as whole tensors."""
    return [full(p.detach()).clone() for p in model.parameters()]


def save_dcp(model: nn.Module, opt: kc.KFC, path: str) -> dict:
    """Write the DCP checkpoint; what this rank's optimizer dict held (layer names, DTensor slots, local bytes)."""
    sd = {"model": get_model_state_dict(model), "optim": opt.distributed_state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # a single process
        dcp.save(sd, checkpoint_id=path)
    optim = sd["optim"]
    local = [v.to_local() if hasattr(v, "to_local") else v for v in optim.values() if isinstance(v, torch.Tensor)]
    return {"layers": sorted({k.split(".")[2] for k in optim if k.startswith("kfc.layers.")}),
            "dtensors": sorted(k for k, v in optim.items() if hasattr(v, "device_mesh")),
            "layer_bytes": sum(v.numel() * v.element_size() for k, v in optim.items()
                               if k.startswith("kfc.layers.") and isinstance(v, torch.Tensor)),
            "bytes": sum(t.numel() * t.element_size() for t in local)}


def resume_dcp(kind: str, kfc: dict, path: str) -> tuple[nn.Module, nn.Module, kc.KFC]:
    """A fresh run restored from the DCP checkpoint at ``path`` (any world size it was written at)."""
    model, trained, opt = build(kind, kfc)
    sd = {"model": get_model_state_dict(model), "optim": opt.distributed_state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    opt.load_distributed_state_dict(sd["optim"])
    return model, trained, opt


def resume_plain(kind: str, kfc: dict, path: str) -> tuple[nn.Module, nn.Module, kc.KFC]:
    """A fresh run restored from the plain (``torch.save`` of ``state_dict()``) checkpoint at ``path``."""
    saved = torch.load(path, weights_only=False)
    model = make_model()
    model.load_state_dict(saved["model"])  # before sharding: fully_shard shards the loaded values
    if kind == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
    trained = model
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        trained = DDP(model)
    opt = kc.KFC(trained, **kfc)
    opt.load_state_dict(saved["opt"])
    return model, trained, opt


def go_on(model: nn.Module, trained: nn.Module, opt: kc.KFC, world: int, rank: int) -> list[torch.Tensor]:
    """AFTER more steps on this rank's shard; the whole parameters after them."""
    x, y = data(world, rank)
    run_steps(trained, opt, x, y, AFTER, False)
    return params(model)


def write(kind: str, kfc: dict, directory: str, world: int, rank: int) -> dict:
    """BEFORE steps, then the DCP checkpoint and the plain one (rank 0's ``torch.save``), then AFTER more steps."""
    model, trained, opt = build(kind, kfc)
    x, y = data(world, rank)
    run_steps(trained, opt, x, y, BEFORE, False)
    out = {"saved": save_dcp(model, opt, f"{directory}/{kind}{world}")}
    plain = opt.state_dict()  # a collective under FSDP2
    whole = {k: full(v) for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save({"model": whole, "opt": plain}, f"{directory}/{kind}{world}.pt")
    if world > 1:
        dist.barrier()
    out["straight"] = go_on(model, trained, opt, world, rank)
    return out


def two_ranks(rank: int, world: int, kfc: dict, directory: str) -> dict:
    """FSDP2 and DDP: write their checkpoints and resume each at the same world size; FSDP2 from a single process."""
    out = {}
    for kind in ("fsdp", "ddp", "ddp_owner"):
        out[kind] = write(kind, kfc, directory, world, rank)
        out[kind]["resumed"] = go_on(*resume_dcp(kind, kfc, f"{directory}/{kind}{world}"), world, rank)
    out["from_single"] = go_on(*resume_dcp("fsdp", kfc, f"{directory}/plain0"), world, rank)
    return out


def three_ranks(rank: int, world: int, kfc: dict, directory: str) -> dict:
    """The 2-rank FSDP2 checkpoint under FSDP2 at 3 ranks: through DCP and through the plain state_dict."""
    return {"dcp": go_on(*resume_dcp("fsdp", kfc, f"{directory}/fsdp2"), world, rank),
            "plain": go_on(*resume_plain("fsdp", kfc, f"{directory}/fsdp2.pt"), world, rank)}
