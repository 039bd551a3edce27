"""KFC's updates over its parameter groups.

The glue between ``param_groups`` / the optimizer state and the list-of-tensor rules of ``rules.py``.

A step's share of one group is a :class:`GroupPart`: its parameters with their ∇h and preconditioned ∇h (F̂⁻¹∇h
for the KFC group, ∇h itself for the SGD fallback, whose preconditioner is the identity). KFC-pre and the
adaptive rule treat the parts as one update vector: the KFC layers first, then the fallback parameters.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

import torch

from kfc_compile.curvature.curvature_product import bucket_quadratic
from kfc_compile.curvature.distributed import Distributed
from kfc_compile.curvature.precondition import grad_matrix, regularised_grad
from kfc_compile.optim.options import CLIP_DEFAULTS, KFCOptions
from kfc_compile.optim.rules import (
    adam_step_,
    adaptive_step_,
    clip_scale,
    clip_threshold,
    l2_term,
    levenberg_marquardt,
    momentum_step_,
    reduction_ratio,
    rescaling,
)
from kfc_compile.optim.scalars import factored_nu, flat64, quadratic_model, sharded, sum_squares

log = logging.getLogger(__name__)

#: the Gram matrix of the exact Fisher among directions, on a leading fraction of the batch (``KFC._exact_gram``)
GramFn = Callable[[list[dict[torch.Tensor, torch.Tensor]], float], torch.Tensor]


@dataclass
class GroupPart:
    """One parameter group's share of a step."""

    group: dict
    params: list[torch.Tensor]
    grads: list[torch.Tensor]  # ∇h
    naturals: list[torch.Tensor]  # F̂⁻¹∇h (∇h for the SGD fallback)


def group_parts(kfc_group: dict | None, sgd_group: dict | None,
                naturals: dict[torch.Tensor, torch.Tensor]) -> list[GroupPart]:
    """The parts of a step, KFC group first; groups that are None are left out.

    The KFC part has the parameters with a preconditioned gradient (a missing ``.grad`` is 0 in ∇h), the SGD
    fallback's part its parameters that have a gradient.
    """
    parts = []
    if kfc_group is not None:
        wd = kfc_group["weight_decay"]
        params = list(naturals)
        grads = [regularised_grad(p, p.grad if p.grad is not None else torch.zeros_like(p), wd) for p in params]
        parts.append(GroupPart(kfc_group, params, grads, list(naturals.values())))
    if sgd_group is not None:
        params = [p for p in sgd_group["params"] if p.grad is not None]
        grads = [regularised_grad(p, p.grad, sgd_group["weight_decay"]) for p in params]
        parts.append(GroupPart(sgd_group, params, grads, grads))
    return parts


def pre_update(parts: list[GroupPart], state: MutableMapping, options: KFCOptions, exact_gram: GramFn,
               info: dict) -> None:
    """KFC-pre (docs/algorithm.md §6.2): v = −lr·F̂⁻¹∇h; if ν > C, v ← v·sqrt(C/ν); p ← μp + v; θ ← θ + p.

    C is ``clip``, or clip·lr with ``clip_scaling="lr"`` (``rules.clip_threshold``, lr of the first part).

    ν is vᵀFv + wd·vᵀv with the exact Fisher on the batch's first ``clip_fraction`` (``clip_curvature="exact"``,
    wd of the first part) or vᵀF̂v = lr²·⟨F̂⁻¹∇h, ∇h⟩ plus the fallback's wd·vᵀv (``"factored"``); with
    ``clip_on="step"`` of d = μp + v instead of v (the factored dᵀF̂d adds :func:`buffer_terms`). A non-finite ν
    changes nothing and sets ``info["skipped"]`` (the optimizer then skips the step). ``info`` receives ν and the
    clipping scale. Some part must have a parameter.
    """
    updates = [[u.mul(-part.group["lr"]) for u in part.naturals] for part in parts]
    # clip_on="step": ν of the applied step μp + v (the previous buffers; none yet: v alone)
    measured = updates if options.clip_on == "update" else [
        [v if state[p].get("momentum_buffer") is None else state[p]["momentum_buffer"] * part.group["momentum"] + v
         for p, v in zip(part.params, ts, strict=True)] for part, ts in zip(parts, updates, strict=True)]
    scale, clip = None, options.clip
    if clip is not None:
        curvature = _curvature(options, parts, exact_gram)
        if curvature != options.clip_curvature and options.clip_auto:  # clip="auto": the exact ν's own constant
            clip = CLIP_DEFAULTS[curvature, options.clip_on]
        if curvature == "exact":
            wd = parts[0].group["weight_decay"]
            v = {p: t for part, ts in zip(parts, measured, strict=True) for p, t in zip(part.params, ts, strict=True)}
            nu = float(exact_gram([v], options.clip_fraction)[0, 0])
            if wd:
                nu += wd * sum_squares(v.values())
        else:  # dᵀF̂d (F̂ holds the damping and the weight decay): vᵀF̂v = lr²·uᵀ∇h with u = F̂⁻¹∇h
            nu = 0.0
            for part, ds in zip(parts, measured, strict=True):
                if part.group["role"] == "kfc":
                    nu += factored_nu(part.naturals, part.grads, part.group["lr"])
                    if options.clip_on == "step":
                        nu += buffer_terms(part, state, exact_gram)
                elif part.group["weight_decay"]:
                    nu += part.group["weight_decay"] * sum_squares(ds)
        info["nu"] = nu
        if not math.isfinite(nu):  # inf/NaN in the model's output on the clip subset: no safe step size exists
            info["skipped"] = True  # the caller skips the step (nothing was changed here)
            return
        scale = clip_scale(nu, clip_threshold(clip, options.clip_scaling, parts[0].group["lr"]))
        info["clip_scale"] = 1.0 if scale is None else scale
    for part, ts in zip(parts, updates, strict=True):
        buffers = [state[p].get("momentum_buffer") for p in part.params]
        mom = part.group["momentum"]
        if scale is not None and options.clip_on == "step":
            mom *= scale  # p ← s·(μp + v)
        new_buffers = momentum_step_(part.params, buffers, ts, mom, scale)
        for p, buf in zip(part.params, new_buffers, strict=True):
            state[p]["momentum_buffer"] = buf


def _curvature(options: KFCOptions, parts: list[GroupPart], exact_gram: GramFn) -> str:
    """``options.clip_curvature``, or "exact" where the factored ν of the step cannot be formed (warned why).

    ``KFC`` refuses the cases it can know at construction (distributed KFC, DTensor parameters:
    ``options.model_curvature``); what is left is a Fisher-product function that cannot reach F̂.
    """
    if options.clip_curvature != "factored" or options.clip_on != "step":
        return options.clip_curvature
    why = None
    if getattr(exact_gram, "estimator", None) is None:
        why = "the Fisher-product function has no estimator"
    elif getattr(exact_gram, "distributed", None) is not None:
        why = "distributed KFC (a rank may not hold every inverse)"
    elif sharded([p for part in parts for p in part.params]):
        why = "DTensor (sharded) parameters"
    if why is None:
        return "factored"
    log.debug("factored ν of the applied step not taken: %s; exact ν", why)
    constant = (f"its own constant clip={CLIP_DEFAULTS['exact', 'step']} (clip='auto')" if options.clip_auto else
                f"clip={options.clip}, a constant meant for the factored ν")
    warnings.warn(f"clip_curvature='factored' with clip_on='step' is not available here ({why}): the exact ν is "
                  f"measured, against {constant}; pass clip_curvature='exact'", stacklevel=4)
    return "exact"


def buffer_terms(part: GroupPart, state: MutableMapping, exact_gram: GramFn) -> float:
    """μ²·pᵀF̂p − 2μ·lr·⟨p, ∇h⟩: the momentum buffers' share of the factored ν(μp + v) of the KFC part (F̂v = −lr·∇h).

    F̂ is the estimator's (``exact_gram.estimator``; ``curvature_product.bucket_quadratic``).
    """
    bufs = {p: state[p].get("momentum_buffer") for p in part.params}
    bufs = {p: b for p, b in bufs.items() if b is not None}
    if not bufs:
        return 0.0
    mats = {}
    for i, s in enumerate(exact_gram.estimator.states):
        w, b = s.layer.weight, s.layer.bias
        m = grad_matrix(s.layer, 0.0, (bufs.get(w), None if b is None else bufs.get(b)))
        if m is not None:
            mats[i] = m
    q = float(bucket_quadratic(exact_gram.estimator.buckets, mats))
    g = dict(zip(part.params, part.grads, strict=True))
    mu, lr = part.group["momentum"], part.group["lr"]
    ps = list(bufs)
    return mu * mu * q - 2.0 * mu * lr * float(flat64([g[p] for p in ps], ps) @ flat64(list(bufs.values()), ps))


def adaptive_update(parts: list[GroupPart], state: MutableMapping, options: KFCOptions, exact_gram: GramFn,
                    info: dict, h0: float | None = None) -> float:
    """Adaptive K-FAC (docs/algorithm.md §6.1): θ ← θ + δ with δ = lr·(αΔ + μδ₀).

    Δ = −F̂⁻¹∇h, δ₀ the previous update, (α, μ) minimising the quadratic model M from the exact Fisher plus
    (λ + wd)·I (λ, wd, lr, μ > 0 of the first part's group). ``info`` receives α, μ, C, d, the model change and λ.
    Some part must have a parameter. A non-finite C or d changes nothing and sets ``info["skipped"]``. With the
    objective's value ``h0`` the step is shortened to a predicted decrease of at most half of it
    (``rules.rescaling``).

    Returns:
        M(δ) − M(0), the change the model predicts (for the Levenberg–Marquardt ratio).
    """
    params = [p for part in parts for p in part.params]
    deltas = [-u for part in parts for u in part.naturals]
    grads = [g for part in parts for g in part.grads]
    lead = parts[0].group
    lam, wd, lr = lead["damping"], lead["weight_decay"], lead["lr"]
    prev = [state[p].get("momentum_buffer") for p in params]
    use_mu = lead["momentum"] > 0 and any(b is not None for b in prev)
    dirs = [deltas, prev] if use_mu else [deltas]
    gram = exact_gram([{p: t for p, t in zip(params, x, strict=True) if t is not None} for x in dirs],
                      options.clip_fraction)
    C, d = quadratic_model(gram, dirs, grads, lam + wd)
    if not (bool(torch.isfinite(C).all()) and bool(torch.isfinite(d).all())):  # the exact Fisher products overflowed
        info.update(C=C, d=d, skipped=True)  # the caller skips the step (nothing was changed here)
        return 0.0
    alpha, mu, model_change = rescaling(C, d, lr, h0)
    info.update(alpha=alpha, mu=mu, C=C, d=d, model_change=model_change, damping=lam)
    for p, upd in zip(params, adaptive_step_(params, deltas, prev if use_mu else None, alpha, mu, lr), strict=True):
        state[p]["momentum_buffer"] = upd
    return model_change


def adaptive_lm_update(parts: list[GroupPart], state: MutableMapping, options: KFCOptions, exact_gram: GramFn,
                       info: dict, loss, closure, k: int, warned: set[str], param_groups: list[dict],
                       dist: Distributed | None = None) -> None:
    """The adaptive update, and every ``lm_interval`` steps the Levenberg–Marquardt damping rule.

    The rule needs ``closure`` (re-evaluated after the update; without one a once-only warning says the damping
    stays fixed); the new λ is written into every group of ``param_groups``. Distributed (``dist``): the loss
    values are their mean over ranks (the objective DDP differentiates), so every rank takes the same λ.
    """
    l2_groups = [(part.group["params"], part.group["weight_decay"]) for part in parts]
    lm_due = k % options.lm_interval == 0
    h0 = None if loss is None else _as_float(loss, dist) + l2_term(l2_groups)
    if lm_due:
        if closure is None or loss is None:
            if "lm" not in warned:
                warned.add("lm")
                warnings.warn("mode='adaptive' adapts the damping (Levenberg–Marquardt) only when step() gets a "
                              "closure that re-evaluates the loss; the damping stays fixed", stacklevel=4)
            lm_due = False
    lam = parts[0].group["damping"]
    model_change = adaptive_update(parts, state, options, exact_gram, info, h0)
    if lm_due and not info.get("skipped"):
        lm_adapt(lam, h0, model_change, closure, l2_groups, options, param_groups, info, dist)


def lm_adapt(lam: float, h0: float, model_change: float, closure, l2_groups: list, options: KFCOptions,
             param_groups: list[dict], info: dict, dist: Distributed | None = None) -> None:
    """The Levenberg–Marquardt step on λ after an update: ρ from ``closure``'s new loss, λ into every group.

    ``h0`` is h(θ) before the update, ``model_change`` M(δ) − M(0) of the step applied; ``info`` gets ρ and λ.
    """
    with torch.enable_grad():
        h1 = _as_float(closure(), dist) + l2_term(l2_groups)
    rho = reduction_ratio(h0, h1, model_change)
    new = levenberg_marquardt(lam, rho, options.lm_decay, options.min_damping)
    for g in param_groups:
        g["damping"] = new
    info.update(rho=rho, damping=new)


def _as_float(loss, dist: Distributed | None = None) -> float:
    v = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    return v if dist is None else dist.mean("loss", v)  # distributed: the mean of the ranks' losses


def adam_update(group: dict, state: MutableMapping) -> None:
    """The Adam fallback's step on the parameters of ``group`` that have a gradient (∇h = grad + wd·θ)."""
    params = [p for p in group["params"] if p.grad is not None]
    grads = [regularised_grad(p, p.grad, group["weight_decay"]) for p in params]
    adam_step_(params, grads, [state[p] for p in params], group["lr"], group["betas"], group["eps"])
