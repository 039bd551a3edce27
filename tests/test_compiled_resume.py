"""Resuming a kfc-compiled run: ``load_state_dict`` into a fresh optimizer over a fresh compiled model.

Before its first forward the fresh model has no layers (dynamo compiles them then); the optimizer restores the
step count, RNG and schedule at once and the groups, ``torch.optim`` state and per-layer factors and inverses when
the layers appear. The resumed run must be bit-identical to the uninterrupted one.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

AOT_EAGER = {"inner": "aot_eager"}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # each test compiles a few modules of one class: stay below dynamo's recompile limit
    yield
    torch._dynamo.reset()


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def data(steps):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 2, 6, 6, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(steps)]


def make(model, **kw):
    cm = torch.compile(model, backend="kfc", options=AOT_EAGER)
    opts = {**dict(lr=0.1, damping=1e-2, inverse_every=2, stats_every=2, stats_fraction=0.5, max_factor_dim=20,
                   generator=torch.Generator().manual_seed(7)), **kw}
    return cm, kc.KFC(cm, **opts)


def train(cm, opt, batches, closure=False):
    for x, y in batches:
        if closure:
            def fn(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(cm(x), y)
                loss.backward()
                return loss
            opt.step(fn)
        else:
            opt.zero_grad()
            F.cross_entropy(cm(x), y).backward()
            opt.step()


@pytest.mark.parametrize("kw", [dict(), dict(mode="adaptive", lr=1.0, lm_interval=2), dict(fallback="adam")])
def test_compiled_resume_is_bit_identical(kw):
    batches = data(6)
    model = net()
    cm, opt = make(model, **kw)
    adaptive = kw.get("mode") == "adaptive"
    train(cm, opt, batches[:2], adaptive)  # the resumed step 3 collects statistics before its layers exist
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(cm, opt, batches[2:], adaptive)

    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    model2 = net()
    model2.load_state_dict(saved["model"])
    cm2, opt2 = make(model2, **kw)
    assert opt2.layers == []  # nothing compiled yet
    opt2.load_state_dict(saved["opt"])
    assert opt2.steps == 2
    train(cm2, opt2, batches[2:], adaptive)

    assert [layer.name for layer in opt2.layers] == [layer.name for layer in opt.layers] and len(opt.layers) == 3
    assert any(s.layout.blocked for s in opt2.layer_states())  # Ω of the second conv: 37 wide, blocks of ≤ 20
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    for layer in opt.layers:
        f, f2 = opt.factors(layer.name), opt2.factors(layer.name)
        assert torch.equal(f.A, f2.A) and torch.equal(f.G, f2.G)
    sd, sd2 = opt.state_dict(), opt2.state_dict()
    assert sd["kfc"]["step"] == sd2["kfc"]["step"] == 6
    assert sd["param_groups"] == sd2["param_groups"]
    for i, st in sd["state"].items():
        for k, v in st.items():
            assert torch.equal(v, sd2["state"][i][k]) if isinstance(v, torch.Tensor) else v == sd2["state"][i][k]


def test_state_dict_of_a_resumed_optimizer_before_its_layers_appear():
    model = net()
    cm, opt = make(model)
    train(cm, opt, data(2))
    saved = copy.deepcopy(opt.state_dict())
    cm2, opt2 = make(net())
    opt2.load_state_dict(saved)
    again = opt2.state_dict()  # nothing applied yet: the loaded state, not an empty one
    assert [e["name"] for e in again["kfc"]["layers"]] == [layer.name for layer in opt.layers]
    assert again["kfc"]["step"] == 2


def test_mismatched_layers_are_refused_when_they_appear():
    model = net()
    cm, opt = make(model)
    train(cm, opt, data(1))
    saved = opt.state_dict()
    saved["kfc"]["layers"][0]["name"] = "renamed"
    other = net()
    cm2, opt2 = make(other)
    opt2.load_state_dict(saved)
    before = [p.detach().clone() for p in other.parameters()]
    (x, y), = data(1)
    F.cross_entropy(cm2(x), y).backward()
    with pytest.raises(ValueError, match="do not match"):
        opt2.step()
    assert all(torch.equal(p, b) for p, b in zip(other.parameters(), before, strict=True))
    with pytest.raises(ValueError, match="do not match"):  # still refused: never silently a fresh optimizer
        opt2.step()


def test_a_step_before_the_layers_appear_is_refused():
    cm, opt = make(net())
    train(cm, opt, data(1))
    saved = opt.state_dict()
    cm2, opt2 = make(net())
    opt2.load_state_dict(saved)
    with pytest.raises(RuntimeError, match="waits for its layers"):
        opt2.step()  # no forward yet
