"""Extra passes on the recorded batch: its leading subset, and a forward that leaves the model's buffers alone.

The optimizer's statistics pass (``stats_fraction``) and its exact Fisher products (``clip_fraction``) run on the
first examples of the batch the user's forward saw; they must not move BatchNorm running statistics.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from kfc_compile.runtime.state import subset_size
from kfc_compile.runtime.taps import model_output


def batch_subset(inputs: tuple, fraction: float) -> tuple:
    """The first ``subset_size(N, fraction)`` examples of every tensor input whose leading dim is the batch size N."""
    if not inputs or not isinstance(inputs[0], torch.Tensor):
        raise RuntimeError("no recorded model inputs: run a forward pass with grad enabled before opt.step()")
    n = inputs[0].shape[0]
    m = subset_size(n, fraction)
    out = []
    for a in inputs:
        if isinstance(a, torch.Tensor):
            a = a.detach()
            if a.dim() > 0 and a.shape[0] == n and m < n:
                a = a[:m]
        out.append(a)
    return tuple(out)


def forward_with_private_buffers(model: nn.Module, inputs: tuple, select=None) -> torch.Tensor:
    """``model(*inputs)``'s output tensor, run on copies of the buffers.

    An extra forward thus leaves BatchNorm running statistics alone; the parameters are the model's own, so
    autograd reaches them and the taps. ``select`` picks the logits from the output (``model_output``).
    """
    params = dict(model.named_parameters())
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    return model_output(functional_call(model, (params, bufs), inputs), select)
