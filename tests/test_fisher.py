"""Fisher types: MC agrees with type-2 as the sample count grows; type-2 for losses with several terms per example."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import kfc_compile as kc

from kfc_test_helpers import kron_block, rel_err


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _targets(kind: str, n: int):
    g = torch.Generator().manual_seed(1)
    if kind == "ce":
        return nn.CrossEntropyLoss(), torch.randint(0, 3, (n,), generator=g)
    if kind == "mse":
        return nn.MSELoss(), torch.randn(n, 3, generator=g, dtype=torch.float64)
    return nn.BCEWithLogitsLoss(), torch.randint(0, 2, (n, 3), generator=g).double()


@pytest.mark.parametrize("kind", ["ce", "mse", "bce"])
def test_mc_converges_to_type2(kind):
    """kron(G_mc, A) → kron(G_type2, A) like 1/√S.

    Per layer, A is the same in both (one forward); G_mc is the mean of N·S i.i.d. rank-one terms g gᵀ whose
    expectation is exactly G_type2 (sampled targets from the predictive distribution: categorical, N(f, 1/2) for
    φ = (f − y)², Bernoulli). So E‖G_mc − G_type2‖²_F = σ²/(N·S) and the relative Frobenius error of the
    Kronecker block falls like 1/√S: from S = 16 to S = 1024 by √64 = 8 in expectation. We average the error over
    3 seeds (the error of one seed has a spread of about ±50% here) and require a drop by more than 4 (half the
    expected 8), and an absolute error at S = 1024 below 0.1 (measured ≈ 0.01–0.03; a wrong sampling variance,
    e.g. N(f, 1) for MSE, would leave a bias of 100% that no S removes).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~3000 backward passes on tiny tensors: threading only adds sync (and contention)
    try:
        _check_mc_convergence(kind)
    finally:
        torch.set_num_threads(threads)


def _check_mc_convergence(kind):
    model = mlp()
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    loss, y = _targets(kind, 8)
    exact = {k: kron_block(f) for k, f in kc.curvature(model, loss, x, y, fisher="type-2").items()}
    tm = kc.transform(model)
    errors = {}
    for S in (16, 1024):
        per_seed = []
        for seed in range(3):
            g = torch.Generator().manual_seed(100 + seed)
            mc = kc.curvature(tm, loss, x, y, fisher="mc", mc_samples=S, generator=g)
            per_seed.append(max(rel_err(kron_block(mc[k]), exact[k]) for k in exact))
        errors[S] = sum(per_seed) / len(per_seed)
    assert errors[1024] < errors[16] / 4, errors
    assert errors[1024] < 0.1, errors


def test_mc_is_reproducible_with_a_generator():
    model = mlp()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    a = kc.curvature(model, nn.CrossEntropyLoss(), x, y, fisher="mc", mc_samples=2,
                     generator=torch.Generator().manual_seed(3))
    b = kc.curvature(model, nn.CrossEntropyLoss(), x, y, fisher="mc", mc_samples=2,
                     generator=torch.Generator().manual_seed(3))
    for k in a:
        assert torch.equal(a[k].G, b[k].G) and torch.equal(a[k].A, b[k].A)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_type2_cross_entropy_per_location_terms(reduction):
    """CE on (N, C, L) logits has L terms per example: ℓ_n = c·Σ_l CE_l with c = 1/L (mean) or 1 (sum).

    For a conv producing the logits, type-2 Γ = c/(N·L) Σ_{n,l} (diag p − p pᵀ) exactly (no mixing across terms).
    """
    torch.manual_seed(4)
    conv = nn.Conv1d(2, 3, 3, padding=1).double()
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 5))
    f = kc.curvature(nn.Sequential(conv), nn.CrossEntropyLoss(reduction=reduction), x, y, fisher="type-2")["0"]
    p = torch.softmax(conv(x).detach(), dim=1).permute(0, 2, 1).reshape(-1, 3)  # (N·L, C)
    H = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    c = 1 / 5 if reduction == "mean" else 1.0
    torch.testing.assert_close(f.G, c * H.mean(0), rtol=1e-10, atol=1e-12)


def test_type2_bce_with_logits():
    """BCE-with-logits: per-element Hessian σ(1 − σ).

    The type-2 Γ of the logit layer is its mean over examples (diagonal, divided by the K = 3 terms for a mean
    reduction).
    """
    torch.manual_seed(5)
    lin = nn.Linear(4, 3).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randint(0, 2, (6, 3)).double()
    f = kc.curvature(nn.Sequential(lin), nn.BCEWithLogitsLoss(), x, y, fisher="type-2")["0"]
    s = torch.sigmoid(lin(x).detach())
    torch.testing.assert_close(f.G, torch.diag((s * (1 - s)).mean(0)) / 3, rtol=1e-10, atol=1e-12)
    xb = torch.cat([x, torch.ones(6, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(f.A, xb.T @ xb / 6, rtol=1e-10, atol=1e-12)
    assert math.isclose(f.A[-1, -1].item(), 1.0)
