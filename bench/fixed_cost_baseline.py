"""A KFC step's fixed per-step costs before issue 17's third round (small layers), as patches for A/B runs.

``PATCHES`` is a list of (object, attribute, old value), as ``overhead_baseline.PATCHES``; set together they give
the code before these changes (same results, more per-call cost):

* the exact Fisher products through ``functional_call`` (``torch.nn.utils.stateless``'s swap and its context
  managers) instead of the kept module entries (``fvp.ModelMembers.swap_in``);
* every dual tensor through ``fwAD.make_dual`` (its Python checks and imports per parameter);
* FSDP2's hooks looked up by walking the module tree on every pass;
* the Gram matrix built by one indexed store per entry;
* the step guard's finite check as 0-d ``isfinite`` flags (``guard.fused_finite_flags``) read by ``bool``.

Used by ``step_breakdown.py --baseline fixed-cost``.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call

from kfc_compile.curvature import owner
from kfc_compile.curvature.guard import all_finite
from kfc_compile.optim import fvp, safety


def _functional_call(self, tensors, call):
    return functional_call(self.model, self.members.tied(tensors), call.args, call.kwargs, tie_weights=False)


def _make_duals(primals, tangents, level):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
        return {n: fwAD.make_dual(prim, tangents[n].to(prim.dtype) if n in tangents else torch.zeros_like(prim))
                for n, prim in primals.items()}


def _walking_fsdp_hooks(module, modules=None):
    return owner.without_fsdp_hooks(module)


def _gram(spec, f, jvps, scale=1.0, mask=None, c=None):
    k = len(jvps)
    C = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            C[i, j] = C[j, i] = float(spec.fisher_inner(f, jvps[i], jvps[j], mask, c)) * scale
    return C


def _check(self, optimizer, loss, loss_scale):
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and bool(found_inf):
        return "scaler", "the GradScaler found inf/NaN in the scaled gradients"
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    inv = 1.0 / loss_scale if getattr(optimizer, "grad_scale", None) is not None else 1.0
    grad_flags = safety._non_finite_and_unscale_(grads, inv) if grads else []
    loss_t = loss.detach() if isinstance(loss, torch.Tensor) else None
    loss_flags = [all_finite(loss_t)] if loss_t is not None else []
    if safety._all_true(grad_flags + loss_flags) and (loss is None or loss_t is not None
                                                      or math.isfinite(float(loss))):
        return None
    if loss is not None:
        value = float(loss_t if loss_t is not None else loss)
        if not math.isfinite(value):
            return "loss", f"the closure's loss is {value}"
    if not safety._all_true(grad_flags):
        return "gradient", "a parameter gradient has inf/NaN entries (a non-finite loss or model output?)"
    return None


PATCHES = [(fvp.FisherProducts, "_call", _functional_call), (fvp, "make_duals", _make_duals),
           (fvp, "without_fsdp_hooks", _walking_fsdp_hooks), (fvp, "gram", _gram),
           (safety.StepGuard, "check", _check)]
