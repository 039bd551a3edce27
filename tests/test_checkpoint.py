"""Checkpoints: ``weights_only`` loads, other devices and dtypes, structural mismatches refused, format versions."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.optim.checkpoint import STATE_VERSION

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated",
                                        "ignore:KFC step:RuntimeWarning")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 36, 20), nn.ReLU(), nn.Linear(20, 3))


def batch(k: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + k)
    return torch.randn(16, 2, 6, 6, generator=g).to(dtype), torch.randint(0, 3, (16,), generator=g)


KW = dict(lr=0.05, damping=1e-2, inverse_every=3, fallback="adam", averaging=4.0)


def train(model, opt, start, steps, nan_at=None):
    dtype = next(model.parameters()).dtype
    for k in range(start, start + steps):
        x, y = batch(k, dtype)
        if k == nan_at:
            x[0] = math.nan

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def saved(opt, model=None) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), **({"model": model.state_dict()} if model is not None else {})}, buf)
    buf.seek(0)
    return buf


@pytest.mark.parametrize("method", ["factored", "eigen"])
def test_weights_only_round_trip_is_bit_identical(method):
    model = net()
    opt = kc.KFC(model, **KW, damping_method=method, generator=torch.Generator().manual_seed(3))
    train(model, opt, 0, 4, nan_at=2)  # one skipped step: the health record is not empty
    assert opt.health.skipped_steps["loss"] == 1
    buf = saved(opt, model)
    train(model, opt, 4, 4)

    fresh = copy.deepcopy(net())
    opt2 = kc.KFC(fresh, **KW, damping_method=method, generator=torch.Generator().manual_seed(99))
    ckpt = torch.load(buf, weights_only=True)
    assert ckpt["opt"]["kfc"]["version"] == STATE_VERSION == 2
    fresh.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.health.skipped_steps["loss"] == 1 and opt2.steps == 3
    train(fresh, opt2, 4, 4)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
    for layer in opt.layers:
        assert torch.equal(opt.factors(layer.name).A, opt2.factors(layer.name).A)
    assert opt.health.state() == opt2.health.state()


def test_load_onto_another_dtype_and_map_location():
    """A float64 run's state loads into a float32 optimizer: factors, inverses and momentum become float32."""
    model = net().double()
    opt = kc.KFC(model, **KW, generator=torch.Generator().manual_seed(3))
    train(model, opt, 0, 4)
    buf = saved(opt, model)
    for where in ("cpu", torch.device("cpu"), lambda storage, loc: storage):
        buf.seek(0)
        ckpt = torch.load(buf, weights_only=True, map_location=where)
        fresh = net()
        fresh.load_state_dict(ckpt["model"])  # casts to float32
        opt2 = kc.KFC(fresh, **KW, generator=torch.Generator().manual_seed(0))
        opt2.load_state_dict(ckpt["opt"])
        for layer in opt2.layers:
            s = opt2.layer_state(layer.name)
            assert s.running.A.dtype == s.inverse.dtype == torch.float32
            torch.testing.assert_close(s.running.A, opt.layer_state(layer.name).running.A.float())
        for p in fresh.parameters():
            assert opt2.state[p]["momentum_buffer" if "momentum_buffer" in opt2.state[p] else "exp_avg"].dtype == \
                torch.float32
        train(fresh, opt2, 4, 3)
        assert all(torch.isfinite(p).all() for p in fresh.parameters()) and opt2.health.healthy


def mismatch_cases():
    return [
        ("approx", dict(approx="reduce"), r"saved with approx='expand', this optimizer uses approx='reduce'"),
        ("damping_method", dict(damping_method="eigen"),
         r"saved with damping_method='factored', this optimizer uses damping_method='eigen'"),
        ("max_factor_dim", dict(max_factor_dim=50),
         r"layer '4' have layout \(1, 145, 20, 1, 1\).*saved with max_factor_dim=8192.*this optimizer: "
         r"max_factor_dim=50"),
        ("memory_budget", dict(memory_budget=400_000),
         r"layer '4' have layout.*memory_budget=None.*this optimizer: max_factor_dim=8192, memory_budget=400000"),
    ]


@pytest.mark.parametrize(("what", "kw", "message"), mismatch_cases(), ids=[c[0] for c in mismatch_cases()])
def test_structural_mismatches_are_refused(what, kw, message):
    model = net()
    opt = kc.KFC(model, **KW)
    train(model, opt, 0, 2)
    sd = torch.load(saved(opt), weights_only=True)["opt"]
    with pytest.warns(UserWarning, match="memory_budget") if what == "memory_budget" else _nothing():
        other = kc.KFC(net(), **{**KW, **kw})
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(sd)
    assert other.steps == 0 and all(other.factors(layer.name) is None for layer in other.layers)  # nothing loaded


def test_another_layer_set_is_refused():
    model = net()
    opt = kc.KFC(model, **KW)
    sd = opt.state_dict()
    smaller = nn.Sequential(*list(net())[:-1])  # without the last layer
    with pytest.raises(ValueError, match=r"not in the state: \[\]; only in the state: \['6'\]"):
        kc.KFC(smaller, **KW).load_state_dict(sd)


def test_version_1_still_loads_and_unknown_versions_are_refused():
    model = net()
    opt = kc.KFC(model, **KW)
    train(model, opt, 0, 3)
    sd = opt.state_dict()
    v1 = copy.deepcopy(sd)
    kfc = v1["kfc"]
    kfc["version"] = 1
    for key in ("options", "health"):
        del kfc[key]
    for entry in kfc["layers"]:
        del entry["layout"]
    other = kc.KFC(net(), **KW)
    other.load_state_dict(v1)
    assert other.steps == 3 and other.health.healthy
    for layer in opt.layers:
        assert torch.equal(other.factors(layer.name).G, opt.factors(layer.name).G)
    v3 = copy.deepcopy(sd)
    v3["kfc"]["version"] = 3
    with pytest.raises(ValueError, match=r"unsupported KFC state_dict version 3 .*reads versions \(1, 2\)"):
        kc.KFC(net(), **KW).load_state_dict(v3)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
