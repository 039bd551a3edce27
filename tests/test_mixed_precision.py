"""Mixed precision: autocast forwards keep fp32 factors and inverses; GradScaler steps go through ``scaler.step(opt)``.

The scaled backward's Γ (``fisher="empirical"``) is unscaled, the gradients are unscaled before preconditioning, and
the steps the scaler skips are skipped by KFC (without counting toward divergence). With a power-of-two scale the
scaled run equals the unscaled one bit for bit.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated",
                                        "ignore:KFC step:RuntimeWarning")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 64, 10))


def data(k: int):
    g = torch.Generator().manual_seed(k)
    return torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)


def run(fisher="mc", scaler=None, inf_at=None, steps=6, autocast=None, unscale_first=False, **kw):
    model = net()
    opts = dict(lr=0.05, fisher=fisher, stats_fraction=1.0 if fisher == "empirical" else 0.125, inverse_every=2,
                generator=torch.Generator().manual_seed(1))
    opt = kc.KFC(model, **{**opts, **kw})
    for k in range(steps):
        x, y = data(k)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = F.cross_entropy(model(x), y)
        if k == inf_at:
            loss = loss * math.inf
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if unscale_first:
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize("fisher", ["empirical", "mc"])
def test_grad_scaler_run_equals_the_unscaled_run_and_skips_the_same_inf_step(fisher):
    a, oa = run(fisher, inf_at=3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    b, ob = run(fisher, scaler=scaler, inf_at=3)
    assert scaler.get_scale() == 2.0 ** 9  # the scaler saw the inf step and backed off
    assert oa.steps == ob.steps == 5
    assert oa.health.skipped_steps["gradient"] == 1 and ob.health.skipped_steps["scaler"] == 1
    assert ob.health.consecutive_skips == 0  # the scaler's skips do not count toward divergence
    for layer in oa.layers:
        fa, fb = oa.factors(layer.name), ob.factors(layer.name)
        assert torch.equal(fa.A, fb.A) and torch.equal(fa.G, fb.G), layer.name
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_unscale_before_step_with_empirical_fisher_needs_the_scaler():
    with pytest.raises(ValueError, match="grad_scaler=scaler"):
        run("empirical", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 10), unscale_first=True, steps=1)
    a, oa = run("empirical")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    b, ob = run("empirical", scaler=scaler, unscale_first=True, grad_scaler=scaler)
    for layer in oa.layers:
        assert torch.equal(oa.factors(layer.name).G, ob.factors(layer.name).G), layer.name
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_grad_scaler_option_requires_scaler_step():
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match=r"call scaler.step\(opt\)"):
        run("mc", grad_scaler=scaler, steps=1)  # opt.step() called directly: the gradients are still scaled
    with pytest.raises(ValueError, match="grad_scaler must be a torch.amp.GradScaler"):
        kc.KFC(net(), lr=0.1, grad_scaler="yes")


def test_a_disabled_scaler_is_a_plain_step():
    a, oa = run("mc")
    b, ob = run("mc", scaler=torch.amp.GradScaler("cpu", enabled=False))
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


def test_fp16_autocast_with_a_scaler_that_overflows_first():
    """fp16 semantics on CPU: a scale of 2^24 overflows fp16 gradients until the scaler has backed off enough."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 24)
    model, opt = run("empirical", scaler=scaler, steps=14, autocast=torch.float16)
    skips = round(math.log2(2.0 ** 24 / scaler.get_scale()))
    assert skips >= 1 and opt.health.skipped_steps["scaler"] == skips and opt.steps == 14 - skips
    for layer in opt.layers:
        f = opt.factors(layer.name)
        assert f.A.dtype == f.G.dtype == torch.float32
        assert torch.isfinite(f.A).all() and torch.isfinite(f.G).all()
        assert opt.layer_state(layer.name).inverse.dtype == torch.float32
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("autocast", [torch.bfloat16, torch.float16])
def test_autocast_statistics_accumulate_in_fp32(autocast):
    """In-pass statistics of an autocast forward: fp32 factors within the low precision's error of an fp32 run's."""
    _, ref = run("empirical", steps=1)
    _, opt = run("empirical", steps=1, autocast=autocast)
    tol = 3e-2 if autocast == torch.bfloat16 else 1e-2  # 8 and 11 mantissa bits
    for layer in opt.layers:
        f, r = opt.factors(layer.name), ref.factors(layer.name)
        inv = opt.layer_state(layer.name).inverse
        assert f.A.dtype == f.G.dtype == inv.dtype == torch.float32
        for got, want in ((f.A, r.A), (f.G, r.G)):
            assert (got - want).norm() / want.norm() < tol, layer.name
