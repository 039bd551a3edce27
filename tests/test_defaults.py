"""The default configuration and KFC-pre's lr-scaled trust region (issue 17).

* ``clip_scaling="lr"``: ν ≤ clip·lr, checked against a dense Fisher on a tiny net, and ``lr`` matters while the
  clip binds (with the fixed bound it does not);
* training sanity per task type of ``bench/time_to_target.py`` (2-D conv, 1-D conv, deep autoencoder): KFC with the
  demo's defaults reaches a loose target in fewer steps than SGD with momentum at its best rate of a small grid.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from test_factored_step_nu import _dense_curvature, _vec
from torch import nn

import kfc_compile as kc
from kfc_compile.optim import rules

from kfc_test_helpers import dense_ce_fisher

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
              pytest.mark.usefixtures("one_thread")]


def test_clip_threshold_rule():
    assert rules.clip_threshold(0.3, "fixed", 1e-2) == 0.3
    assert rules.clip_threshold(30.0, "lr", 1e-2) == pytest.approx(0.3, rel=1e-15)
    with pytest.raises(ValueError, match="clip_scaling"):
        rules.clip_threshold(0.3, "linear", 1e-2)
    with pytest.raises(ValueError, match="clip_scaling"):
        kc.KFC(nn.Linear(2, 2), lr=0.1, clip_scaling="quadratic")


def _first_step(lr: float, scaling: str, clip: float):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    plain = copy.deepcopy(model)
    # clip_curvature="exact": the property is about the exact Fisher's ν (the default's: test below)
    opt = kc.KFC(model, lr=lr, momentum=0.0, clip=clip, clip_fraction=1.0, clip_scaling=scaling,
                 clip_curvature="exact")
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    Fd = dense_ce_fisher(plain, x)
    opt.step()
    v = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before, strict=True)])
    return v, float(v @ Fd @ v), opt.last_step


@pytest.mark.parametrize("lr", [0.5, 2.0])
def test_lr_scaled_trust_region_against_the_dense_ce_fisher(lr):
    """When it binds, the applied step's exact vᵀFv is clip·lr; the step grows with lr (a fixed bound: it does not)."""
    clip = 1e-3
    v, nu, info = _first_step(lr, "lr", clip)
    assert info["clip_scale"] < 1.0
    assert nu == pytest.approx(clip * lr, rel=1e-9)
    v_fixed, nu_fixed, _ = _first_step(lr, "fixed", clip)
    assert nu_fixed == pytest.approx(clip, rel=1e-9)
    # the same direction either way, lengths in the ratio sqrt(lr)
    torch.testing.assert_close(v, v_fixed * lr ** 0.5, rtol=1e-9, atol=1e-12)


def test_step_clipping_bounds_the_applied_step_against_the_dense_ce_fisher():
    """clip_on="step": the second step's applied Δθ = s·(μp + v) has exact ΔθᵀFΔθ = clip when the clip binds."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    plain = copy.deepcopy(model)
    clip, mom = 1e-3, 0.9
    # clip_curvature="exact": the property is about the exact Fisher's ν (the default's: test below)
    opt = kc.KFC(model, lr=1.0, momentum=mom, clip=clip, clip_fraction=1.0, clip_on="step",
                 clip_curvature="exact")
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    thetas = [torch.cat([p.detach().reshape(-1) for p in model.parameters()])]
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p, q in zip(plain.parameters(), model.parameters(), strict=True):
                p.copy_(q)
        Fd = dense_ce_fisher(plain, x)
        opt.step()
        assert opt.last_step["clip_scale"] < 1.0
        thetas.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        step = thetas[-1] - thetas[-2]
        assert float(step @ Fd @ step) == pytest.approx(clip, rel=1e-9)
    with pytest.raises(ValueError, match="adapt_damping=True needs KFC-pre's trust region on the applied step"):
        kc.KFC(nn.Linear(2, 2), lr=0.1, clip_on="step", clip_curvature="factored", adapt_damping=True)


@pytest.mark.parametrize("lr", [0.5, 2.0])
def test_default_trust_region_bounds_the_applied_step_against_the_dense_damped_kronecker_curvature(lr):
    """The default (factored ν of the applied step, C = clip·lr): when it binds, ΔθᵀF̂Δθ = clip·lr on both steps.

    F̂ is the dense damped Kronecker curvature built from the layers' factors (``test_factored_step_nu``); the
    inverses are refreshed at steps 1–3, so the steps' F̂ is the one of the current factors.
    """
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    clip = 1e-3
    opt = kc.KFC(model, lr=lr, clip=clip)
    o = opt.options
    assert (o.clip_curvature, o.clip_on, o.clip_scaling, o.momentum) == ("factored", "step", "lr", 0.9)
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    for k in range(2):
        before = {p: p.detach().clone() for p in model.parameters()}
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert opt.last_step["clip_scale"] < 1.0
        q = sum(float(d @ Fd @ d) for layer, Fd in _dense_curvature(opt)
                for d in [_vec(layer, {p: p.detach() - before[p] for p in before})])
        assert q == pytest.approx(clip * lr, rel=1e-9), k


# -- training sanity per task type (bench/time_to_target.py's tasks, loose targets) --------------------------------

SANITY = {  # task: (model, batch, loose target, eval_every, budget)
    "digits": ("convnet", 128, 0.05, 10, 200),
    "mnist1d": ("convnet", 128, 0.6, 20, 300),
    "mnist1d_ae": ("autoencoder", 128, 0.5, 20, 400),
}


@pytest.mark.parametrize("task", list(SANITY))
def test_defaults_reach_a_loose_target_in_fewer_steps_than_tuned_sgd(task):
    """KFC's defaults (the demo's periods), lr 3e-3 from the documented grid, against SGD's best of 0.3 and 0.1.

    (The demo grid's third SGD rate, 0.03, is the slowest on all three tasks: left out to keep the test short.)
    Measured on seed 0 (eval every 5–10 steps): digits 25 vs 50, MNIST-1D 80 vs 150, autoencoder 50 vs 80 steps.
    """
    from kfc_compile.tools.demo import load_task, train_run
    from kfc_compile.tools.demo.train import GRIDS, KFC_OPTIONS

    model, bs, target, ev, budget = SANITY[task]
    ds = load_task(task)
    common = dict(steps=budget, batch_size=bs, target=target, eval_every=ev, seed=0, stop_at_target=True,
                  test=False)
    kfc = train_run(ds, model, "kfc", 3e-3, kfc_options=KFC_OPTIONS, **common)
    assert 3e-3 in GRIDS["kfc"] and not kfc.diverged
    assert kfc.steps_to_target is not None, kfc.train_loss
    sgd = [train_run(ds, model, "sgd", lr, **common) for lr in (0.3, 0.1)]
    best = min((r.steps_to_target for r in sgd if r.steps_to_target is not None), default=budget + 1)
    assert kfc.steps_to_target < best, (kfc.steps_to_target, [r.steps_to_target for r in sgd])


def test_autoencoder_task_and_model():
    """MNIST-1D's signals as their own targets; 8 linear layers, tanh everywhere but the 8-unit code and output."""
    from kfc_compile.tools.demo import build_model, load_task
    from kfc_compile.tools.demo.train import evaluate

    ds = load_task("mnist1d_ae")
    assert ds.loss == "mse" and ds.input_shape == (40,) and ds.num_classes == 40
    assert torch.equal(ds.x_train, ds.y_train) and torch.equal(ds.x_test, ds.y_test)
    model = build_model("auto", "mnist1d_ae", ds.input_shape, ds.num_classes)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert len(linears) == 8 and min(m.out_features for m in linears) == 8
    assert sum(isinstance(m, nn.Tanh) for m in model) == 6  # not after the code layer, nor the output
    loss, acc = evaluate(model, ds, ds.x_train[:100], ds.y_train[:100])
    with torch.no_grad():
        ref = F.mse_loss(model(ds.x_train[:100]), ds.y_train[:100]).item()
    assert acc is None and loss == pytest.approx(ref, rel=1e-5)
    from kfc_compile.tools.demo import DemoError
    with pytest.raises(DemoError, match="autoencoder"):
        build_model("convnet", "mnist1d_ae", ds.input_shape, ds.num_classes)
