#!/usr/bin/env python
"""KFC under DistributedDataParallel: the digits conv net of train_digits.py, the batch split over the ranks.

    torchrun --nproc_per_node 2 examples/train_ddp.py            # CPU (gloo), or one GPU per rank (NCCL)
    torchrun --nproc_per_node 2 examples/train_ddp.py --sgd      # the same loop with SGD + momentum

The only KFC-specific line is ``opt = kc.KFC(ddp, ...)``: every rank computes the factors of its own shard, the
factors are averaged over ranks on statistics steps, each layer's inverse is computed by one rank and shared, and
every rank applies the same update (the parameters stay identical without any extra synchronisation). The
checkpoint is written by rank 0 and read by every rank (``--resume``); 100 steps and 50 + 50 resumed steps give
the same parameters when the CPU patch-covariance method is pinned (``KFC_PATCH_COV=im2col``: otherwise it is
chosen by timing in each process).
"""
import argparse
import os
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import kfc_compile as kc

p = argparse.ArgumentParser()
p.add_argument("--sgd", action="store_true", help="SGD with momentum 0.9 (lr 0.1) instead of KFC-pre")
p.add_argument("--steps", type=int, default=150)
p.add_argument("--batch", type=int, default=128, help="global batch, split evenly over the ranks")
p.add_argument("--checkpoint", default="ddp_checkpoint.pt")
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

torch.manual_seed(0)  # the same initial model everywhere (DDP also broadcasts rank 0's)
model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
).to(device)
start = 0
saved = torch.load(args.checkpoint, map_location=device, weights_only=False) if args.resume else None
if saved is not None:
    model.load_state_dict(saved["model"])
    start = saved["step"]
ddp = DDP(model, device_ids=[device.index] if cuda else None)
if args.sgd:
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
else:
    # KFC-pre; statistics every 5 steps, inverses every 10; MC targets seeded per rank from this generator's seed
    opt = kc.KFC(ddp, lr=1e-3, stats_every=5, inverse_every=10, generator=torch.Generator(device).manual_seed(0))
    if rank == 0:
        print(kc.report(model))
if saved is not None:
    opt.load_state_dict(saved["opt"])

per_rank = args.batch // world
t0 = time.perf_counter()
for step in range(start + 1, start + args.steps + 1):
    # the global batch of this step (the same on every rank, and after a resume), then this rank's shard
    sampler = torch.Generator().manual_seed(1234 + step)
    idx = torch.randint(0, len(y), (world * per_rank,), generator=sampler)[rank * per_rank:(rank + 1) * per_rank]
    idx = idx.to(device)
    loss = F.cross_entropy(ddp(x[idx]), y[idx])
    loss.backward()  # DDP averages the gradients over the ranks
    opt.step()
    opt.zero_grad()
    if step % 25 == 0:
        with torch.no_grad():
            full = F.cross_entropy(model(x), y)
        if rank == 0:
            print(f"step {step:4d}  rank-0 batch loss {loss.item():.4f}  full training loss {full.item():.5f}  "
                  f"{time.perf_counter() - t0:.1f}s")
opt_state = opt.state_dict()  # a collective under DDP (the ranks' pending factor shares are averaged): every rank
if rank == 0:
    torch.save({"model": model.state_dict(), "opt": opt_state, "step": start + args.steps}, args.checkpoint)
    print(f"checkpoint: {args.checkpoint}")
dist.destroy_process_group()
