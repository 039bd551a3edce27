"""Extra passes on the recorded batch: its leading subset, and a forward that leaves the model's buffers alone.

The optimizer's statistics pass (``stats_fraction``) and its exact Fisher products (``clip_fraction``) run on the
first examples of the batch the user's forwards saw; they must not move BatchNorm running statistics. With gradient
accumulation the batch is the step's micro-batches in order, and its leading subset a leading part of each of the
first ones (one replay per micro-batch: their shapes, e.g. sequence lengths, need not agree).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.func import functional_call

from kfc_compile.curvature.owner import without_fsdp_hooks
from kfc_compile.runtime.calls import RecordedCall
from kfc_compile.runtime.subsets import subset_size
from kfc_compile.runtime.taps import model_output


def batch_size(call: RecordedCall) -> int:
    """The batch size of a recorded call (``RuntimeError`` naming the fix when it has no batched tensor argument)."""
    n = call.batch_size()
    if n is None:
        raise RuntimeError("a recorded model call has no tensor argument with a batch dimension: KFC replays the "
                           "batch's leading examples (dim 0 of the first tensor argument) for its statistics and "
                           "Fisher products; pass at least one batched tensor to the model")
    return n


def leading_subset(calls: Sequence[RecordedCall], fraction: float) -> list[RecordedCall]:
    """The first m = ``subset_size(N, fraction)`` examples of the step's batch, N examples over all ``calls``.

    The batch is the calls' examples in call order (the micro-batches of gradient accumulation); the subset is
    returned as the leading part of each call it reaches, at least 2 examples of each where that call has them
    (train-mode BatchNorm needs more than one per forward), so it may hold a few more than m.

    Raises:
        RuntimeError: no call was recorded, or a call has no batched tensor argument.
    """
    if not calls:
        raise RuntimeError("no recorded model inputs: run a forward pass with grad enabled before opt.step()")
    sizes = [batch_size(c) for c in calls]
    left = subset_size(sum(sizes), fraction)
    parts = []
    for call, n in zip(calls, sizes, strict=True):
        if left <= 0:
            break
        k = max(min(n, left), min(2, n))
        parts.append(call.leading(k))
        left -= k
    return parts


def forward_with_private_buffers(model: nn.Module, call: RecordedCall, select=None) -> torch.Tensor:
    """``model(*call.args, **call.kwargs)``'s output tensor, run on copies of the buffers.

    An extra forward thus leaves BatchNorm running statistics alone; the parameters are the model's own, so
    autograd reaches them and the taps. ``select`` picks the logits from the output (``model_output``). Only what
    must be replaced is: the buffers (none: a plain call) and, under FSDP2, the sharded parameters.
    """
    # FSDP2: sharded parameters as whole tensors (leaves, so that autograd reaches the taps), FSDP's hooks off
    params = {n: p.detach().full_tensor().requires_grad_(p.requires_grad)
              for n, p in model.named_parameters() if hasattr(p, "full_tensor")}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    with without_fsdp_hooks(model):
        if not params and not bufs:
            return model_output(model(*call.args, **call.kwargs), select)
        return model_output(functional_call(model, {**params, **bufs}, call.args, call.kwargs), select)
