#!/usr/bin/env python
"""KFC under FSDP2 (``fully_shard``): the digits conv net of train_ddp.py, parameters sharded over the ranks.

    torchrun --nproc_per_node 2 examples/train_fsdp.py           # CPU (gloo), or one GPU per rank (NCCL)

The only KFC-specific line is ``opt = kc.KFC(model, ...)`` on the sharded model: every rank computes the factors
of its own shard of the batch, each layer's factors are pooled on the layer's owner rank, which alone keeps them
and their inverse; at every step the owner receives every rank's shard of its layers' gradients, preconditions the
whole gradient and sends each rank its rows back (docs/algorithm.md §12.2b).

Checkpoints go through ``torch.distributed.checkpoint``: every rank writes its own shards of the model, the layers
it owns and its shards of the momentum (``opt.distributed_state_dict()``), and ``--resume`` loads them in place into
a fresh model and optimizer, at this world size or another (DCP reshards; the layers are re-owned).
"""
import argparse
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.fsdp import fully_shard

import kfc_compile as kc

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=150)
p.add_argument("--batch", type=int, default=128, help="global batch, split evenly over the ranks")
p.add_argument("--checkpoint", default="fsdp_checkpoint", help="a directory (one file per rank)")
p.add_argument("--resume", action="store_true", help="continue from --checkpoint")
args = p.parse_args()
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")  # torch's forward-AD, first use

cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
if cuda:
    torch.cuda.set_device(device)
else:
    torch.set_num_threads(1)  # tiny layers, several ranks on one machine

d = load_digits()
x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
x = ((x - x.mean()) / x.std()).to(device)
y = torch.tensor(d.target).to(device)

torch.manual_seed(0)  # the same initial model everywhere
features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2))
model = nn.Sequential(features, nn.Flatten(), nn.Linear(32 * 4 * 4, 10)).to(device)
fully_shard(features)  # an FSDP unit inside the model (its layers are instrumented with FSDP's hooks running)
fully_shard(model)
# KFC-pre; statistics every 5 steps, inverses every 10; MC targets seeded per rank from this generator's seed
opt = kc.KFC(model, lr=1e-3, stats_every=5, inverse_every=10, generator=torch.Generator(device).manual_seed(0))
if args.resume:  # the fresh model's and optimizer's state dicts are the template DCP loads into, in place
    sd = {"model": get_model_state_dict(model), "optim": opt.distributed_state_dict()}
    dcp.load(sd, checkpoint_id=args.checkpoint)
    set_model_state_dict(model, sd["model"])
    opt.load_distributed_state_dict(sd["optim"])
start = opt.steps

per_rank = args.batch // world
t0 = time.perf_counter()
for step in range(start + 1, start + args.steps + 1):
    sampler = torch.Generator().manual_seed(1234 + step)  # the global batch of this step, then this rank's shard
    idx = torch.randint(0, len(y), (world * per_rank,), generator=sampler)[rank * per_rank:(rank + 1) * per_rank]
    idx = idx.to(device)
    loss = F.cross_entropy(model(x[idx]), y[idx])
    loss.backward()  # FSDP reduce-scatters the gradients: each rank holds its shard of the mean
    opt.step()
    opt.zero_grad()
    if step % 25 == 0:
        with torch.no_grad():
            full = F.cross_entropy(model(x), y)  # every rank runs the forward (FSDP all-gathers the weights)
        if rank == 0:
            print(f"step {step:4d}  rank-0 batch loss {loss.item():.4f}  full training loss {full.item():.5f}  "
                  f"{time.perf_counter() - t0:.1f}s")
nbytes = opt.curvature_nbytes()
if rank == 0:
    print(f"curvature bytes on rank 0: {nbytes:,} (the layers it owns)")
warnings.filterwarnings("ignore", message="Detected an existing checkpoint")  # a --resume run writes it anew
dcp.save({"model": get_model_state_dict(model), "optim": opt.distributed_state_dict()}, checkpoint_id=args.checkpoint)
if rank == 0:
    print(f"checkpoint: {args.checkpoint}/ (step {opt.steps})")
dist.destroy_process_group()
