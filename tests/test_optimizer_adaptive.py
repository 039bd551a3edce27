"""Adaptive mode: α/μ from the exact-F quadratic model and the LM damping rule.

See docs/algorithm.md §6.1, §11.1 item 4 (the quadratic model) and §5.4 (the LM rule).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn
from torch.func import functional_call, jacrev, vmap

import kfc_compile as kc
from kfc_compile.curvature.losses import loss_spec
from kfc_compile.optim import fvp, rules

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def tiny():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def dense_fisher(model, x):
    """Exact Fisher of the per-example softmax-CE loss averaged over examples, all parameters (float64)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),))[0]

    J = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    Jf = torch.cat([J[n].reshape(x.shape[0], -1, params[n].numel()) for n in names], -1)
    p = torch.softmax(vmap(lambda xi: f(params, xi))(x), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nka,nkl,nlb->ab", Jf, H, Jf) / x.shape[0]


def scipy_alpha_mu(Fd, eta, g, Delta, d0):
    K = Fd + eta * torch.eye(Fd.shape[0], dtype=torch.float64)

    def M(c):
        delta = c[0] * Delta + c[1] * d0
        return float(g @ delta + 0.5 * delta @ K @ delta)

    res = minimize(M, np.zeros(2), method="BFGS", options={"gtol": 1e-12})
    return res.x, M


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
    Fd = dense_fisher(plain, x)
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
            Fd = dense_fisher(plain, x)
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
