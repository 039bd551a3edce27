"""The update rules of ``kc.KFC`` as functions of lists of tensors (no optimizer object inside).

* shared: the ℓ2 term of h, iterate averaging (∇h itself: ``curvature.precondition.regularised_grad``);
* KFC-pre (docs/algorithm.md §6.2, KFC-S Alg. 1): the clipping statistic ν under the factored curvature, the
  clipping scale, and the momentum update p ← μp + s·v; θ ← θ + p;
* adaptive K-FAC (docs/algorithm.md §6.1): the quadratic model M over the directions (Δ, δ₀), its minimiser
  (α, μ) and the model change M(δ) − M(0), and the update δ = lr·(αΔ + μδ₀);
* Levenberg–Marquardt damping (docs/algorithm.md §5): the reduction ratio ρ and the new λ;
* the Adam fallback: ``torch.optim``'s functional Adam.

Inner products and norms are accumulated in fp64 Python floats, term by term in the order given: the callers pass
tensors in a fixed order (the KFC layers, then the fallback parameters), so the scalars are reproducible.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch.optim.adam import adam

from kfc_compile.curvature.comm import total

# -- shared --------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def swapped_in(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block ``params`` hold ``values`` (copied in); their own values are put back after."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        torch._foreach_copy_(list(params), list(values))
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(list(params), saved)


def sum_squares(tensors: Iterable[torch.Tensor]) -> float:
    """Σ ‖t‖² over the tensors (each norm in fp64)."""
    return sum(total(t.double().pow(2).sum()) for t in tensors)


def inner(a: Sequence[torch.Tensor | None], b: Sequence[torch.Tensor | None]) -> float:
    """Σ_i ⟨a_i, b_i⟩ (fp64) over the positions where both lists hold a tensor."""
    return sum(total((x.double() * y.double()).sum())
               for x, y in zip(a, b, strict=True) if x is not None and y is not None)


def l2_term(groups: Iterable[tuple[Sequence[torch.Tensor], float]]) -> float:
    """½·wd·Σ‖θ‖² of the objective h, over (parameters, weight decay) groups (one sum over all of them)."""
    return sum(0.5 * wd * total(p.detach().double().pow(2).sum()) for params, wd in groups if wd for p in params)


def average_iterates_(averages: Sequence[torch.Tensor], params: Sequence[torch.Tensor], tau: float) -> None:
    """θ̄ ← ξθ̄ + (1−ξ)θ in place, with ξ = exp(−1/τ) (iterate averaging over a timescale of τ steps)."""
    xi = math.exp(-1.0 / tau)
    for avg, p in zip(averages, params, strict=True):
        avg.mul_(xi).add_(p.detach(), alpha=1.0 - xi)


# -- KFC-pre -------------------------------------------------------------------------------------------------------


def factored_nu(naturals: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], lr: float) -> float:
    """ν = vᵀF̂v of the update v = −lr·F̂⁻¹∇h under the damped factored curvature F̂ itself: lr²·Σ⟨F̂⁻¹∇h, ∇h⟩.

    Args:
        naturals: F̂⁻¹∇h per parameter (F̂ holds the damping and the weight decay).
        grads: ∇h per parameter, in the same order.
        lr: the learning rate of the update.
    """
    nu = 0.0
    for u, g in zip(naturals, grads, strict=True):
        nu += lr ** 2 * total((u.double() * g.double()).sum())
    return nu


def clip_scale(nu: float, clip: float) -> float | None:
    """KFC-pre's step-size clipping: sqrt(C/ν) when ν > C, else None (no scaling)."""
    return math.sqrt(clip / nu) if nu > clip else None


def momentum_step_(params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor | None],
                   updates: Sequence[torch.Tensor], momentum: float, scale: float | None) -> list[torch.Tensor]:
    """KFC-pre's update in place: p ← μp + s·v; θ ← θ + p.

    One ``torch._foreach_*`` pass over the parameters that have a momentum buffer; a missing buffer starts as s·v.

    Args:
        params: θ, updated in place.
        buffers: the momentum buffers p (None where there is none yet), updated in place.
        updates: the directions v (cast to each parameter's dtype).
        momentum: μ.
        scale: the clipping scale s (None: 1).

    Returns:
        The momentum buffers after the step (the given ones, or new ones where there were none).
    """
    out = list(buffers)
    old_params, old_buffers, old_updates = [], [], []
    for i, (p, buf, v) in enumerate(zip(params, buffers, updates, strict=True)):
        v = v.to(p.dtype)
        if buf is None:
            out[i] = v.mul(scale) if scale is not None else v.clone()
            p.add_(out[i])
            continue
        old_params.append(p)
        old_buffers.append(buf)
        old_updates.append(v)
    if old_params:
        torch._foreach_mul_(old_buffers, momentum)
        torch._foreach_add_(old_buffers, old_updates, alpha=1.0 if scale is None else scale)
        torch._foreach_add_(old_params, old_buffers)
    return out


# -- adaptive K-FAC ------------------------------------------------------------------------------------------------


def quadratic_model(fisher_gram: torch.Tensor, directions: Sequence[Sequence[torch.Tensor | None]],
                    grads: Sequence[torch.Tensor], eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The terms of M(x) = dᵀx + ½ xᵀCx, the quadratic model of h on the span of the directions.

    Args:
        fisher_gram: (k, k) fp64 Gram matrix of the exact Fisher among the k directions.
        directions: k lists of tensors, one per parameter in the order of ``grads`` (None: 0 for that parameter).
        grads: ∇h per parameter.
        eta: the identity weight λ + wd added to the curvature.

    Returns:
        (C, d): C = fisher_gram + η·⟨xᵢ, xⱼ⟩, d = ⟨∇h, xᵢ⟩ (fp64).
    """
    tikhonov = torch.tensor([[inner(x, y) for y in directions] for x in directions], dtype=torch.float64)
    C = fisher_gram + eta * tikhonov
    d = torch.tensor([inner(grads, x) for x in directions], dtype=torch.float64)
    return C, d


def solve_alpha_mu(C: torch.Tensor, d: torch.Tensor) -> tuple[float, float]:
    """Minimiser (α, μ) of ``d·x + ½ xᵀ C x`` (KFAC-S §E.4 / KFC-S Eqs. 30–31): x = −C⁻¹ d.

    ``C`` is 2×2 (Δ and δ₀ rows) or 1×1 (no previous update). A singular or non-positive C (δ₀ parallel to Δ,
    zero directions) falls back to the α-only solve; a non-positive curvature along Δ gives α = 0.
    """
    C = C.double()
    d = d.double()
    if C.shape[0] == 2:
        det = C[0, 0] * C[1, 1] - C[0, 1] * C[1, 0]
        if C[0, 0] > 0 and C[1, 1] > 0 and det > 1e-12 * C[0, 0] * C[1, 1]:
            x = -torch.linalg.solve(C, d)
            return float(x[0]), float(x[1])
    if C[0, 0] > 0:
        return float(-d[0] / C[0, 0]), 0.0
    return 0.0, 0.0


def rescaling(C: torch.Tensor, d: torch.Tensor, lr: float) -> tuple[float, float, float]:
    """The adaptive step's coefficients (α, μ) minimising M, and the model change M(δ) − M(0).

    The step is δ = lr·(αΔ + μδ₀); μ is 0 with a single direction.
    """
    alpha, mu = solve_alpha_mu(C, d)
    coef = torch.tensor([alpha, mu][:d.shape[0]], dtype=torch.float64) * lr
    return alpha, mu, float(coef @ d + 0.5 * coef @ C @ coef)


def adaptive_step_(params: Sequence[torch.Tensor], deltas: Sequence[torch.Tensor],
                   previous: Sequence[torch.Tensor | None] | None, alpha: float, mu: float,
                   lr: float) -> list[torch.Tensor]:
    """θ ← θ + δ in place with δ = lr·(αΔ + μδ₀).

    Args:
        params: θ.
        deltas: Δ = −F̂⁻¹∇h per parameter.
        previous: δ₀, the previous update per parameter (None: none for that parameter), or None to use Δ only.
        alpha: the coefficient of Δ, from :func:`rescaling`.
        mu: the coefficient of δ₀.
        lr: the learning-rate multiplier.

    Returns:
        δ per parameter (in the parameter's dtype): the next step's δ₀.
    """
    steps = []
    for i, (p, t) in enumerate(zip(params, deltas, strict=True)):
        upd = t.mul(lr * alpha)
        if previous is not None and previous[i] is not None:
            upd = upd.add(previous[i], alpha=lr * mu)
        upd = upd.to(p.dtype)
        p.add_(upd)
        steps.append(upd)
    return steps


# -- Levenberg–Marquardt damping -----------------------------------------------------------------------------------


def reduction_ratio(h_before: float, h_after: float, model_change: float) -> float:
    """ρ = (h(θ) − h(θ+δ)) / (M(0) − M(δ)).

    −∞ when the model predicts no decrease (``model_change`` ≥ 0) or the loss after the update is not finite (a
    step into a region where the loss overflows: the damping must grow).
    """
    if model_change >= 0 or not math.isfinite(h_after):
        return float("-inf")
    return (h_before - h_after) / -model_change


def levenberg_marquardt(damping: float, rho: float, decay: float, min_damping: float) -> float:
    """The next λ: ω₁λ if ρ > 3/4, λ/ω₁ if ρ < 1/4, else λ; floored at ``min_damping`` (a zero λ stays 0)."""
    new = damping
    if rho > 0.75:
        new = damping * decay
    elif rho < 0.25:
        new = damping / decay
    return max(new, min_damping) if damping > 0 or new > 0 else new


# -- the Adam fallback ---------------------------------------------------------------------------------------------


def adam_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], states: Sequence[dict], lr: float,
               betas: tuple[float, float], eps: float) -> None:
    """One Adam step in place with ``torch.optim.adam.adam`` (the per-tensor implementation).

    Args:
        params: the parameters.
        grads: their gradients, weight decay already added (``regularised_grad``).
        states: one optimizer-state dict per parameter; ``exp_avg``, ``exp_avg_sq`` and ``step`` (a 0-d tensor)
            are created on first use, as ``torch.optim.Adam`` does.
        lr: the learning rate.
        betas: (β₁, β₂).
        eps: the denominator's ε.
    """
    for p, state in zip(params, states, strict=True):
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float64)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    adam(list(params), list(grads), [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
         [s["step"] for s in states], foreach=False, amsgrad=False, beta1=betas[0], beta2=betas[1], lr=lr,
         weight_decay=0.0, eps=eps, maximize=False)
