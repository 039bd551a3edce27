#!/usr/bin/env python
"""KFC with torch.compile: the ``kfc`` backend and ``kc.compile_step``, on synthetic CIFAR-sized data.

Two ways to combine KFC with the compiler (both find the conv/linear layers in dynamo's graphs, no fx tracing of
the model needed):

* ``torch.compile(model, backend="kfc")`` + ``kc.KFC(compiled_model, ...)`` in your own loop;
* ``kc.compile_step(model, loss, lr=...)``: one call per step (forward, backward, statistics, update).

    .venv/bin/python examples/compiled_training.py          # ~1-2 min on 2 CPU cores (mostly compiling)
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc

warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")
torch.manual_seed(0)


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(32, 10))


x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))

# 1. the backend in a plain loop: layers are registered as dynamo compiles the graph
model = torch.compile(net(), backend="kfc")
opt = kc.KFC(model, lr=1e-3, stats_every=2, inverse_every=10)
for _ in range(10):
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad()
print(f"backend: loss {loss.item():.4f} after 10 steps; KFC layers {[layer.name for layer in opt.layers]}; "
      f"fallback (SGD) {opt.fallback_names}")

# 2. the whole step in one call
step = kc.compile_step(net(), nn.CrossEntropyLoss(), lr=1e-3, stats_every=2, inverse_every=10)
for _ in range(10):
    loss = step(x, y)
print(f"compile_step: loss {loss.item():.4f} after 10 steps; {step}")
