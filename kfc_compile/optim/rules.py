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


CLIP_SCALINGS = ("fixed", "lr")
CLIP_TARGETS = ("auto", "update", "step")


def clip_threshold(clip: float, scaling: str, lr: float) -> float:
    """The bound on ν of KFC-pre's trust region: ``clip`` itself (``"fixed"``) or clip·lr (``"lr"``).

    With a fixed bound a clipped step has ν = C whatever the learning rate, so ``lr`` stops mattering once the clip
    binds; with ``"lr"`` the trust region's radius grows with lr (ν ≤ C·lr: a clipped step is lr·‖u‖ shortened to
    KL size sqrt(C·lr)), so a larger lr still takes a larger step.
    """
    if scaling == "fixed":
        return clip
    if scaling == "lr":
        return clip * lr
    raise ValueError(f"unknown clip_scaling {scaling!r}: expected one of {CLIP_SCALINGS}")


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


#: a 2×2 model whose directions are this close to parallel in C's metric (1 − cos² below it) is solved along Δ
#: alone: the solve would amplify the noise of the estimated C into large opposite α and μ
COLLINEAR_TOL = 1e-6
#: the largest share of the current loss h(θ) that one adaptive step may be predicted to remove: the supported
#: losses are ≥ 0, so a quadratic model predicting more than h(θ) is wrong, and near interpolation (h → 1e-3) it is
#: dominated by its errors; the step is shortened until the prediction is MAX_PREDICTED_DECREASE·h(θ)
MAX_PREDICTED_DECREASE = 0.5


def solve_alpha_mu(C: torch.Tensor, d: torch.Tensor) -> tuple[float, float]:
    """Minimiser (α, μ) of ``d·x + ½ xᵀ C x`` (KFAC-S §E.4 / KFC-S Eqs. 30–31): x = −C⁻¹ d.

    ``C`` is 2×2 (Δ and δ₀ rows) or 1×1 (no previous update). Guards (docs/algorithm.md §6.1): a 2×2 C that is
    not positive definite or whose directions are nearly parallel (1 − C₀₁²/(C₀₀C₁₁) < ``COLLINEAR_TOL``: δ₀ ∥ Δ,
    zero directions) falls back to the α-only solve; non-positive or non-finite curvature along Δ, or a non-finite
    d, gives the null step α = μ = 0 (the loss is then left unchanged).
    """
    C = C.double()
    d = d.double()
    if not (bool(torch.isfinite(C).all()) and bool(torch.isfinite(d).all())):
        return 0.0, 0.0
    if C.shape[0] == 2:
        c00, c11, c01 = float(C[0, 0]), float(C[1, 1]), 0.5 * float(C[0, 1] + C[1, 0])
        if c00 > 0 and c11 > 0 and c00 * c11 - c01 * c01 > COLLINEAR_TOL * c00 * c11:
            x = -torch.linalg.solve(C, d)
            return float(x[0]), float(x[1])
    if C[0, 0] > 0:
        return float(-d[0] / C[0, 0]), 0.0
    return 0.0, 0.0


def model_change(C: torch.Tensor, d: torch.Tensor, coef: torch.Tensor) -> float:
    """M(δ) − M(0) = c·d + ½ cᵀCc for the step δ = Σ cᵢxᵢ over the model's directions."""
    return float(coef @ d + 0.5 * coef @ C @ coef)


def decrease_bound_scale(C: torch.Tensor, d: torch.Tensor, coef: torch.Tensor, loss: float,
                         share: float | None = None) -> float:
    """The factor s ∈ (0, 1] on the step's coefficients that keeps the predicted decrease ≤ share·loss.

    1 when M(δ) − M(0) ≥ −share·loss already; else the smallest root of s·(c·d) + ½s²·cᵀCc = −share·loss, the
    first point along the step where the model predicts that much (it exists: the parabola starts at 0 and is
    below −share·loss at s = 1). A loss that is not finite and ≥ 0 leaves the step alone. ``share`` defaults to
    ``MAX_PREDICTED_DECREASE``.
    """
    share = MAX_PREDICTED_DECREASE if share is None else share
    change = model_change(C, d, coef)
    if not (math.isfinite(loss) and loss >= 0 and -change > share * loss):
        return 1.0
    q1, q2 = float(coef @ d), float(coef @ C @ coef)
    target = share * loss
    if q2 == 0:  # linear along the step (q1 < 0 here): q1·s = −target
        return min(1.0, target / -q1)
    disc = max(q1 * q1 - 2.0 * q2 * target, 0.0)  # the smallest positive root, for q2 > 0 and q2 < 0 alike
    return min(1.0, max(0.0, (-q1 - math.sqrt(disc)) / q2))


def rescaling(C: torch.Tensor, d: torch.Tensor, lr: float, loss: float | None = None,
              share: float | None = None) -> tuple[float, float, float]:
    """The adaptive step's coefficients (α, μ) minimising M, and the model change M(δ) − M(0).

    The step is δ = lr·(αΔ + μδ₀); μ is 0 with a single direction. With the current ``loss`` h(θ) given, (α, μ)
    are shortened by :func:`decrease_bound_scale` so that the model predicts at most ``share``·h(θ) of decrease
    (default ``MAX_PREDICTED_DECREASE``).
    """
    alpha, mu = solve_alpha_mu(C, d)
    coef = torch.tensor([alpha, mu][:d.shape[0]], dtype=torch.float64) * lr
    if loss is not None:
        s = decrease_bound_scale(C, d, coef, loss, share)
        if s < 1.0:
            alpha, mu, coef = alpha * s, mu * s, coef * s
    return alpha, mu, model_change(C, d, coef)


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


#: a predicted decrease below this share of |h| is under the resolution of the (fp32) loss values: ρ is noise
RATIO_RESOLUTION = 1e-6


def reduction_ratio(h_before: float, h_after: float, model_change: float) -> float:
    """ρ = (h(θ) − h(θ+δ)) / (M(0) − M(δ)).

    −∞ when the model predicts no decrease (``model_change`` ≥ 0) or the loss after the update is not finite (a
    step into a region where the loss overflows: the damping must grow); NaN (λ is left alone) when h(θ) is not
    finite or the predicted decrease is below ``RATIO_RESOLUTION``·|h| (a tiny denominator: the ratio of two
    rounding errors).
    """
    if model_change >= 0 or not math.isfinite(h_after):
        return float("-inf")
    if not math.isfinite(h_before) or -model_change <= RATIO_RESOLUTION * max(abs(h_before), abs(h_after)):
        return float("nan")
    return (h_before - h_after) / -model_change


def levenberg_marquardt(damping: float, rho: float, decay: float, min_damping: float) -> float:
    """The next λ: ω₁λ if ρ > 3/4, λ/ω₁ if ρ < 1/4, else λ (also for a NaN ρ); floored at ``min_damping``.

    A zero λ stays 0.
    """
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
