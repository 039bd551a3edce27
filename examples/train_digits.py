#!/usr/bin/env python
"""KFC-pre in an ordinary PyTorch training loop: scikit-learn's 8×8 digits (bundled, no download), a small conv net.

The only change from an SGD loop is the optimizer line; ``kc.KFC`` instruments the model in place (its forward
now feeds the curvature statistics) and preconditions the gradient in ``step()``.

    .venv/bin/python examples/train_digits.py            # ~10 s on one CPU core
    .venv/bin/python examples/train_digits.py --sgd      # the same loop with SGD + momentum, for comparison
"""
import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import kfc_compile as kc

p = argparse.ArgumentParser()
p.add_argument("--sgd", action="store_true", help="use SGD with momentum 0.9 (lr 0.1) instead of KFC-pre")
p.add_argument("--steps", type=int, default=150)
args = p.parse_args()
torch.set_num_threads(1)  # tiny layers: threads cost more than they give
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")  # torch's forward-AD, first use
torch.manual_seed(0)

d = load_digits()
x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
x = (x - x.mean()) / x.std()
y = torch.tensor(d.target)

model = nn.Sequential(
    nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
    nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
)
if args.sgd:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
else:
    # KFC-pre (momentum 0.9, damping 1e-3, update clipping 0.3); statistics every 5 steps, inverses every 10
    opt = kc.KFC(model, lr=1e-3, stats_every=5, inverse_every=10)
    print(kc.report(model))

t0 = time.perf_counter()
for step in range(1, args.steps + 1):
    idx = torch.randint(0, len(y), (128,))
    loss = F.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 25 == 0:
        with torch.no_grad():
            full = F.cross_entropy(model(x), y).item()
        print(f"step {step:4d}  batch loss {loss.item():.4f}  full training loss {full:.5f}  "
              f"{time.perf_counter() - t0:.1f}s")
