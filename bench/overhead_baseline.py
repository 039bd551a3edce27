"""The per-call overheads of a KFC step before issue 17's dispatch work, as patches for A/B runs in one process.

``PATCHES`` is a list of (object, attribute, old value); :func:`applied` sets them for a block. Restored together
they give the code before these changes (same results, more overhead):

* every kernel call through the ``torch.library`` dispatcher (``dispatch.direct`` off);
* an ``autocast(enabled=False)`` context around every torch-twin call, also outside autocast;
* the step guard's finite checks: one ``aminmax`` per gradient, and the loss read by a second host sync;
* the statistics subset's forward under ``functional_call`` with every parameter and buffer;
* the finite checks of the factors tensor by tensor;
* the factored inverse's host syncs: four for the π split's range check, one per Cholesky factorisation;
* ``PER_CALL`` (also alone: ``--baseline percall``; its halves ``fvp-walk`` / ``record-autocast``): the exact
  Fisher products walking the module tree on every call (``named_parameters`` / ``named_buffers``,
  ``functional_call`` untying tied names), and the taps' statistics under an ``autocast(enabled=False)`` context
  also outside autocast.

Used by ``step_breakdown.py --baseline overhead`` / ``--baseline percall`` and ``ttt_step_breakdown.py --before``.
"""
from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from torch.func import functional_call

from kfc_compile.curvature import blocks as bl
from kfc_compile.curvature import decompositions as dec
from kfc_compile.curvature import estimator as estimator_mod
from kfc_compile.curvature import guard as guard_mod
from kfc_compile.curvature import inverses as inverses_mod
from kfc_compile.curvature.blocks import Layout
from kfc_compile.curvature.guard import all_finite
from kfc_compile.curvature.owner import without_fsdp_hooks
from kfc_compile.optim import fvp, safety
from kfc_compile.runtime import state as state_mod
from kfc_compile.runtime.taps import model_output
from triton_kernels import dispatch, reference


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _non_finite_and_unscale_(grads: Sequence[torch.Tensor], inv_scale: float) -> bool:
    found = []
    by_kind: dict[tuple, list[torch.Tensor]] = defaultdict(list)
    for g in grads:
        by_kind[(g.device, g.dtype)].append(g)
    for (device, _), gs in by_kind.items():
        if inv_scale == 1.0:
            found.append(~torch.stack([all_finite(g) for g in gs]).all())
        else:
            flag = torch.zeros((), dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(
                gs, flag, torch.full((), inv_scale, dtype=torch.float32, device=device))
            found.append(flag > 0)
    return any(bool(f) for f in found)


def _check(self, optimizer, loss, loss_scale: float):
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and bool(found_inf):
        return "scaler", "the GradScaler found inf/NaN in the scaled gradients"
    grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    inv = 1.0 / loss_scale if getattr(optimizer, "grad_scale", None) is not None else 1.0
    bad_grad = bool(grads) and _non_finite_and_unscale_(grads, inv)
    if loss is not None:
        value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
        if not math.isfinite(value):
            return "loss", f"the closure's loss is {value}"
    if bad_grad:
        return "gradient", "a parameter gradient has inf/NaN entries (a non-finite loss or model output?)"
    return None


def _forward_with_private_buffers(model, call, select=None):
    params = {n: p.detach().full_tensor().requires_grad_(p.requires_grad) if hasattr(p, "full_tensor") else p
              for n, p in model.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    with without_fsdp_hooks(model):
        return model_output(functional_call(model, (params, bufs), call.args, call.kwargs), select)


def _finite_flags(groups) -> list[bool]:
    flags = [torch.stack([all_finite(t) for t in ts]).all() for ts in groups]
    if not flags:
        return []
    if len({f.device for f in flags}) == 1:
        return [bool(f) for f in torch.stack(flags).tolist()]
    return [bool(f) for f in flags]


def _split_damping(pi, s, dtype, name):
    ca, cg = (pi * s).to(dtype), (s / pi).to(dtype)
    if not (bool(torch.isfinite(ca).all()) and bool(torch.isfinite(cg).all()) and bool((ca > 0).all())
            and bool((cg > 0).all())):
        raise dec.DecompositionError(f"the π split of layer {name!r}'s damping is outside the {dtype} range",
                                     f"factors of layer {name!r}")
    return ca, cg


def _factored_inverses(A, G, eta, scale=1.0, name="?", live=None, layout=None):
    A = A * scale if scale != 1.0 else A
    lay = layout or Layout(A.shape[0], A.shape[-1], G.shape[-1])
    if eta > 0:
        s = eta ** 0.5
        pi = dec.pi_split(dec._traces64(A, lay.groups) / lay.a_dim, dec._traces64(G, lay.groups) / lay.g_dim)
        pa, pg = _split_damping(pi, s, A.dtype, name)
        ca = torch.maximum(pa.repeat_interleave(lay.a_blocks)[:, None, None], dec._rounding_floor(A))
        cg = torch.maximum(pg.repeat_interleave(lay.g_blocks)[:, None, None], dec._rounding_floor(G))
    else:
        ca = torch.zeros(A.shape[0], 1, 1, dtype=A.dtype, device=A.device)
        cg = torch.zeros(G.shape[0], 1, 1, dtype=G.dtype, device=G.device)
    if live is not None:
        A = A.index_select(-1, live).index_select(-2, live)
    Ad = bl.pad_identity_(A + ca * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device), lay.a_blocks, lay.a_dim)
    Gd = bl.pad_identity_(G + cg * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device), lay.g_blocks, lay.g_dim)
    what_a, what_g = f"factor Ω of layer {name!r}", f"factor Γ of layer {name!r}"
    exact = eta <= 0
    if exact:
        dec.check_nonsingular(dec._eigvalsh(Ad, what_a), what_a)
        dec.check_nonsingular(dec._eigvalsh(Gd, what_g), what_g)
    return dec._spd_inverse(Ad, what_a, exact), dec._spd_inverse(Gd, what_g, exact), ca


def _walked_members(self):
    self.params = list(self.model.named_parameters())
    self.buffers = list(self.model.named_buffers())
    return self


def _untying_call(self, tensors, call):
    return functional_call(self.model, tensors, call.args, call.kwargs)


def _record_autocast_off(device_type: str):
    return torch.autocast(device_type=device_type, enabled=False)


FVP_WALK = [(fvp.ModelMembers, "current", _walked_members), (fvp.FisherProducts, "_call", _untying_call)]
RECORD_AUTOCAST = [(state_mod, "no_autocast", _record_autocast_off)]
PER_CALL = FVP_WALK + RECORD_AUTOCAST
PATCHES = [(dispatch, "_direct_ok", False), (reference, "_no_autocast", _no_autocast),
           (safety.StepGuard, "check", _check),
           (estimator_mod, "forward_with_private_buffers", _forward_with_private_buffers),
           (estimator_mod, "finite_flags", _finite_flags),
           (guard_mod, "finite_flags", _finite_flags),
           (inverses_mod, "factored_inverses", _factored_inverses), *PER_CALL]


@contextlib.contextmanager
def applied(patches) -> Iterator[None]:
    """Within the block, each (object, attribute, value) of ``patches`` is set; the old values come back after."""
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in patches]
    for obj, attr, value in patches:
        setattr(obj, attr, value)
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)
