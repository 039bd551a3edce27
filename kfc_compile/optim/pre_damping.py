"""Levenberg–Marquardt damping for KFC-pre (``adapt_damping``, docs/algorithm.md §5.5).

KFC-pre's step δ (preconditioned, clipped, with momentum) is not the minimiser of a quadratic model, but the model
still says how far the curvature can be trusted: every ``lm_interval`` steps, with a closure, the reduction ratio
ρ = (h(θ) − h(θ + δ)) / (M(0) − M(δ)) of the applied δ, with M(δ) = ∇hᵀδ + ½δᵀ(F + (λ + wd)I)δ, drives
λ = ``damping`` by the rule of §5.4 (ρ > 3/4: λ·ω₁; ρ < 1/4: λ/ω₁); the new λ is the factored damping of the next
inverses. δᵀ(F + wd·I)δ costs nothing: δ = c·s is the clipped step s = μp + v whose ν = sᵀ(F + wd·I)s the trust
region measured (exact Fisher on the batch's first ``clip_fraction``, at θ), so it is c²ν; hence the option needs
``clip_on="step"`` with exact ν (what ``clip_curvature="auto"`` resolves to with ``adapt_damping``). The price is
the closure's second forward and backward.
"""
from __future__ import annotations

import warnings
from collections.abc import MutableMapping

from kfc_compile.curvature.distributed import Distributed
from kfc_compile.optim.options import KFCOptions
from kfc_compile.optim.rules import inner, l2_term, sum_squares
from kfc_compile.optim.updates import GramFn, GroupPart, _as_float, lm_adapt, pre_update


def applied_model_change(parts: list[GroupPart], state: MutableMapping, info: dict, damping: float) -> float:
    """M(δ) − M(0) = ∇hᵀδ + ½(c²ν + λ‖δ‖²) of the step δ = c·s just applied (the parameters' momentum buffers).

    ν = sᵀ(F + wd·I)s and c are the trust region's (``info["nu"]``, ``info["clip_scale"]``), λ = ``damping``.
    """
    grads = [g for part in parts for g in part.grads]
    delta = [state[p]["momentum_buffer"] for part in parts for p in part.params]
    return inner(grads, delta) + 0.5 * (info["clip_scale"] ** 2 * info["nu"] + damping * sum_squares(delta))


def pre_lm_update(parts: list[GroupPart], state: MutableMapping, options: KFCOptions, exact_gram: GramFn,
                  info: dict, loss, closure, k: int, warned: set[str], param_groups: list[dict],
                  dist: Distributed | None = None) -> None:
    """KFC-pre's update (``updates.pre_update``), then with ``adapt_damping`` every ``lm_interval`` steps LM on λ.

    The rule needs ``closure`` (re-evaluated after the update); without one the damping stays fixed, silently for
    ``adapt_damping="auto"`` (a plain training loop) and with a once-only warning for ``True``. The new λ is
    written into every group of ``param_groups`` and ``info`` gets ρ and λ. A skipped
    update adapts nothing. Distributed (``dist``): the loss values are their mean over ranks.
    """
    due = bool(options.adapt_damping) and k % options.lm_interval == 0
    l2_groups = [(part.group["params"], part.group["weight_decay"]) for part in parts]
    l2_before = l2_term(l2_groups) if due else 0.0  # ½·wd·‖θ‖² of h(θ), before the step moves θ
    pre_update(parts, state, options, exact_gram, info)
    if not due or info.get("skipped"):
        return
    if closure is None or loss is None:
        if options.adapt_damping is True and "pre_lm" not in warned:
            warned.add("pre_lm")
            warnings.warn("adapt_damping=True adapts KFC-pre's damping only when step() gets a closure that "
                          "re-evaluates the loss; the damping stays fixed", stacklevel=4)
        return
    lam = parts[0].group["damping"]
    change = applied_model_change(parts, state, info, lam)
    info["model_change"] = change
    lm_adapt(lam, _as_float(loss, dist) + l2_before, change, closure, l2_groups, options, param_groups, info, dist)
