"""Adaptive mode: α/μ from the exact-F quadratic model and the LM damping rule.

See docs/algorithm.md §6.1, §11.1 item 4 (the quadratic model) and §5.4 (the LM rule).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.losses import loss_spec
from kfc_compile.optim import fvp, rules

from kfc_test_helpers import dense_ce_fisher

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def tiny():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def scipy_alpha_mu(Fd, eta, g, Delta, d0):
    K = Fd + eta * torch.eye(Fd.shape[0], dtype=torch.float64)

    def M(c):
        delta = c[0] * Delta + c[1] * d0
        return float(g @ delta + 0.5 * delta @ K @ delta)

    # the minimiser of the dense 2-D quadratic model: its normal equations solved exactly (BFGS, even at
    # gtol 1e-12, stops ~1e-6 relative short of it on μ), and checked to be a minimum against scipy's BFGS
    A = np.array([[float(u @ K @ v) for v in (Delta, d0)] for u in (Delta, d0)])
    x = np.linalg.solve(A, -np.array([float(g @ Delta), float(g @ d0)]))
    res = minimize(M, np.zeros(2), method="BFGS", options={"gtol": 1e-12})
    assert M(x) <= res.fun + 1e-12 * abs(res.fun)
    return x, M


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_two_jvp_scalars_and_solve_match_dense_quadratic_model():
    torch.manual_seed(0)
    model = tiny()
    plain = copy.deepcopy(model)
    tm = kc.transform(model)
    x, y = torch.randn(20, 4, dtype=torch.float64), torch.randint(0, 3, (20,))
    F.cross_entropy(model(x), y).backward()
    params = list(model.parameters())
    g = flat([p.grad for p in params])
    Delta = {p: torch.randn_like(p) for p in params}
    d0 = {p: torch.randn_like(p) for p in params}
    eta = 0.05
    spec = loss_spec("cross_entropy")
    f, jv = fvp.FisherProducts(tm, spec).outputs_and_jvps((x,), [Delta, d0])
    C = fvp.gram(spec, f, jv)
    Df, d0f = flat(Delta.values()), flat(d0.values())
    Fd = dense_ce_fisher(plain, x)
    ref_C = torch.stack([torch.stack([Df @ Fd @ Df, Df @ Fd @ d0f]), torch.stack([d0f @ Fd @ Df, d0f @ Fd @ d0f])])
    torch.testing.assert_close(C, ref_C, rtol=1e-10, atol=1e-12)

    C = C + eta * torch.tensor([[Df @ Df, Df @ d0f], [d0f @ Df, d0f @ d0f]])
    alpha, mu = rules.solve_alpha_mu(C, torch.stack([g @ Df, g @ d0f]))
    (a_ref, m_ref), M = scipy_alpha_mu(Fd, eta, g, Df, d0f)
    np.testing.assert_allclose([alpha, mu], [a_ref, m_ref], rtol=1e-6, atol=1e-9)
    # at the optimum of the subspace, M(δ) − M(0) = ½ ∇hᵀδ
    delta = alpha * Df + mu * d0f
    assert M([alpha, mu]) == pytest.approx(0.5 * float(g @ delta), rel=1e-9)


def test_alpha_only_without_previous_update():
    C = torch.tensor([[2.0]], dtype=torch.float64)
    assert rules.solve_alpha_mu(C, torch.tensor([-3.0], dtype=torch.float64)) == (1.5, 0.0)
    # δ₀ parallel to Δ: the 2×2 system is singular, fall back to α alone
    C2 = torch.tensor([[2.0, 4.0], [4.0, 8.0]], dtype=torch.float64)
    assert rules.solve_alpha_mu(C2, torch.tensor([-3.0, -6.0], dtype=torch.float64)) == (1.5, 0.0)


def test_adaptive_step_is_the_quadratic_model_minimiser():
    """End to end: the second adaptive step moves by α*Δ + μ*δ₀ where (α*, μ*) minimise the dense-F model."""
    torch.manual_seed(1)
    model = tiny()
    plain = copy.deepcopy(model)
    damping = 0.1
    opt = kc.KFC(model, lr=1.0, mode="adaptive", damping=damping, momentum=0.9, clip_fraction=1.0, fisher="type-2")
    params = list(model.parameters())
    thetas = [flat([p.detach() for p in params]).clone()]
    for k in range(2):
        x, y = torch.randn(24, 4, dtype=torch.float64), torch.randint(0, 3, (24,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if k == 1:
            with torch.no_grad():
                for p, q in zip(plain.parameters(), params, strict=True):
                    p.copy_(q)
            Fd = dense_ce_fisher(plain, x)
        opt.step()
        thetas.append(flat([p.detach() for p in params]).clone())
    g = flat([p.grad for p in params])
    nat = opt.precondition()  # same inverses as step 2 (no weight decay, so .grad is ∇h at θ₁)
    Delta = -flat([nat[p] for p in params])
    d0 = thetas[1] - thetas[0]
    (a_ref, m_ref), M = scipy_alpha_mu(Fd, damping, g, Delta, d0)
    assert opt.last_step["alpha"] == pytest.approx(a_ref, rel=1e-6)
    assert opt.last_step["mu"] == pytest.approx(m_ref, rel=1e-6, abs=1e-9)
    torch.testing.assert_close(thetas[2] - thetas[1], a_ref * Delta + m_ref * d0, rtol=1e-6, atol=1e-10)
    assert opt.last_step["model_change"] == pytest.approx(M([a_ref, m_ref]), rel=1e-6)


@pytest.mark.parametrize("lr,direction", [(1.0, "down"), (3.0, "up")])
def test_levenberg_marquardt_rule(lr, direction):
    """Every lm_interval steps: ρ > 3/4 → λ·ω₁, ρ < 1/4 → λ/ω₁ (ω₁ = (19/20)^5).

    lr = 3 overshoots the model's minimiser, so the model predicts no decrease (ρ = −∞ by convention) and λ grows.
    """
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    lam0 = 1.0
    omega = (19 / 20) ** 5
    opt = kc.KFC(model, lr=lr, mode="adaptive", damping=lam0, lm_interval=2, clip_fraction=1.0)
    x, y = torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,))
    seen = []
    for k in range(1, 9):
        lam = opt.param_groups[0]["damping"]
        losses = []

        def closure(losses=losses):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            losses.append(loss.item())
            return loss

        opt.step(closure)
        info = opt.last_step
        if k % 2:
            assert len(losses) == 1 and "rho" not in info and opt.param_groups[0]["damping"] == lam
            continue
        assert len(losses) == 2  # h(θ) and h(θ + δ)
        change = info["model_change"]
        rho = (losses[0] - losses[1]) / -change if change < 0 else float("-inf")
        assert info["rho"] == pytest.approx(rho, rel=1e-12)
        expect = lam * omega if rho > 0.75 else lam / omega if rho < 0.25 else lam
        assert opt.param_groups[0]["damping"] == pytest.approx(expect, rel=1e-12)
        seen.append((rho, opt.param_groups[0]["damping"]))
    final = opt.param_groups[0]["damping"]
    assert (final < lam0) if direction == "down" else (final > lam0), seen


# -- guards against degenerate quadratic models (docs/algorithm.md §6.1) --------------------------------------------


def test_nearly_parallel_directions_fall_back_to_alpha_only():
    """δ₀ almost ∥ Δ in C's metric (1 − cos² = 1e-9): the 2×2 solve would give huge opposite α, μ; α alone is used."""
    eps = 1e-9
    C = torch.tensor([[2.0, 2.0 * (1 - eps / 2)], [2.0 * (1 - eps / 2), 2.0]], dtype=torch.float64)
    d = torch.tensor([-3.0, -2.9], dtype=torch.float64)
    raw = -torch.linalg.solve(C, d)
    assert abs(float(raw[0])) > 1e6  # what the unguarded solve returns
    assert rules.solve_alpha_mu(C, d) == (1.5, 0.0)
    # well separated directions keep the 2×2 minimiser
    C_ok = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    x = rules.solve_alpha_mu(C_ok, d)
    np.testing.assert_allclose(x, (-torch.linalg.solve(C_ok, d)).tolist(), rtol=1e-12)


@pytest.mark.parametrize("C,d", [
    ([[float("nan"), 0.0], [0.0, 1.0]], [-1.0, 0.0]),  # non-finite curvature
    ([[1.0, 0.0], [0.0, 1.0]], [float("inf"), 0.0]),  # non-finite gradient term
    ([[-1.0, 0.0], [0.0, 1.0]], [-1.0, -1.0]),  # non-positive curvature along Δ
    ([[0.0]], [-1.0]),  # zero curvature: no finite minimiser
])
def test_degenerate_models_give_the_null_step(C, d):
    alpha, mu = rules.solve_alpha_mu(torch.tensor(C, dtype=torch.float64), torch.tensor(d, dtype=torch.float64))
    assert (alpha, mu) == (0.0, 0.0)


def test_decrease_bound_against_the_dense_quadratic_model():
    """The shortened step's predicted decrease, evaluated with the dense Fisher, is exactly half the loss."""
    torch.manual_seed(3)
    model = tiny()
    plain = copy.deepcopy(model)
    tm = kc.transform(model)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    params = list(model.parameters())
    g = flat([p.grad for p in params])
    h0, lr = float(loss.detach()), 1.0
    eta = 1e-6  # tiny damping: the Newton step of the model predicts far more decrease than the loss itself
    Fd = dense_ce_fisher(plain, x)
    K = Fd + eta * torch.eye(Fd.shape[0], dtype=torch.float64)
    newton = -torch.linalg.solve(K, g)
    Delta, d0, i = {}, {}, 0
    for p in params:
        Delta[p] = newton[i:i + p.numel()].reshape(p.shape)
        d0[p] = torch.randn_like(p)
        i += p.numel()
    spec = loss_spec("cross_entropy")
    f, jv = fvp.FisherProducts(tm, spec).outputs_and_jvps((x,), [Delta, d0])
    C, d = rules.quadratic_model(fvp.gram(spec, f, jv), [list(Delta.values()), list(d0.values())],
                                 [p.grad for p in params], eta)
    a_raw, m_raw = rules.solve_alpha_mu(C, d)
    Df, d0f = flat(Delta.values()), flat(d0.values())

    def dense_change(a, m):
        step = lr * (a * Df + m * d0f)
        return float(g @ step + 0.5 * step @ K @ step)

    assert dense_change(a_raw, m_raw) < -0.9 * h0  # the unguarded model predicts almost all the loss away
    alpha, mu, change = rules.rescaling(C, d, lr, h0)
    assert change == pytest.approx(-rules.MAX_PREDICTED_DECREASE * h0, rel=1e-9)
    assert dense_change(alpha, mu) == pytest.approx(change, rel=1e-8)
    s = alpha / a_raw
    assert 0 < s < 1 and mu == pytest.approx(s * m_raw, rel=1e-12)  # the same direction, shortened
    # the first such point along the step: every shorter step predicts less
    assert all(dense_change(t * a_raw, t * m_raw) > change for t in np.linspace(0.0, s, 20)[:-1])
    # a step that predicts less than half the loss is left alone, and so is an unknown loss
    assert rules.rescaling(C, d, lr, 1e6) == rules.rescaling(C, d, lr)
    assert rules.rescaling(C, d, lr, float("nan")) == rules.rescaling(C, d, lr)


def test_reduction_ratio_guards():
    assert rules.reduction_ratio(1.0, 0.5, -1.0) == 0.5
    assert rules.reduction_ratio(1.0, float("nan"), -1.0) == float("-inf")  # overflowing step: grow λ
    assert math.isnan(rules.reduction_ratio(float("nan"), 0.5, -1.0))  # no reference loss
    assert math.isnan(rules.reduction_ratio(1.0, 1.0 - 1e-9, -1e-9))  # decrease below the loss's resolution
    assert rules.levenberg_marquardt(0.3, float("nan"), 0.8, 1e-8) == 0.3  # a NaN ratio leaves λ alone


def _memorise(share: float | None, monkeypatch, steps: int = 100) -> tuple[list[float], int]:
    """Adaptive K-FAC (λ₀ = 1e-3, LM every 5 steps) on a full batch of 64 random points: down to interpolation."""
    if share is not None:
        monkeypatch.setattr(rules, "MAX_PREDICTED_DECREASE", share)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    # explicit subsets of 64 (statistics on 8, α/μ's Fisher products on 16): the unguarded run's blow-up was sized
    # for them (with the defaults' floor, 32 and 32 examples, it stays below the initial loss: no blow-up to show)
    opt = kc.KFC(model, lr=1.0, mode="adaptive", damping=1e-3, generator=torch.Generator().manual_seed(1),
                 max_skipped_steps=None, stats_fraction=0.125, clip_fraction=0.25)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    losses, skipped = [], 0
    for _ in range(steps):
        losses.append(float(opt.step(closure).detach()))
        skipped += bool(opt.last_step.get("skipped"))
    return losses, skipped


def test_adaptive_reaches_interpolation_without_diverging(monkeypatch):
    """Memorising a batch (loss → 1e-3 and below): the guarded model never lets the loss blow up.

    The same run with the decrease bound off (an unbounded share) shows what the guard prevents: near interpolation
    the Fisher vanishes, the model's minimiser becomes a huge step, and the loss jumps by orders of magnitude.
    """
    torch.set_num_threads(1)
    # 150 steps: the float32 path to 1e-3 depends on rounding (fp64 π-split traces moved it from step ~60 to ~115)
    losses, skipped = _memorise(None, monkeypatch, steps=150)
    assert skipped == 0
    assert losses[-1] < 1e-3 and min(losses) < 1e-4
    assert max(losses[20:]) < losses[0]  # no blow-up on the way down
    unguarded, _ = _memorise(math.inf, monkeypatch)
    assert max(unguarded[20:]) > 10 * losses[0]
