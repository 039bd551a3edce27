"""Keyword calls of captured and kfc-compiled modules: the optimizer replays them as the same positional call.

``kc.KFC``'s exact Fisher products and statistics subsets run extra forwards on the recorded batch; a module called
``model(x=..., mask=...)`` (every HF model) is recorded as the positional tuple of the same call
(``runtime.taps.replay_inputs``), so keyword and positional calls give the same trajectory.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import kfc_compile as kc
from kfc_compile.runtime.taps import replay_inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _f(a, b=2, c=None, *args, d=1, **kw):
    return a


SIG = inspect.signature(_f)


@pytest.mark.parametrize(("args", "kwargs", "expected"), [
    ((1,), {}, (1,)),
    ((1, 5), {}, (1, 5)),
    ((), {"a": 1}, (1,)),
    ((1,), {"c": 3}, (1, 2, 3)),  # the skipped b gets its default
    ((), {"c": 3, "a": 1, "b": 4}, (1, 4, 3)),
    ((1, 2, 3, 4), {}, (1, 2, 3, 4)),
    ((1,), {"d": 5}, None),  # keyword-only: no positional place
    ((1,), {"zz": 5}, None),  # **kw
    ((), {"b": 5}, None),  # a required argument is missing
])
def test_replay_inputs(args, kwargs, expected):
    assert replay_inputs(SIG, args, kwargs) == expected
    if expected is not None:  # the replay is the same call
        assert _f(*expected) == _f(*args, **kwargs)


def test_replay_without_signature():
    assert replay_inputs(None, (1, 2), {}) == (1, 2)
    assert replay_inputs(None, (1,), {"b": 2}) is None


class Net(nn.Module):
    """Defaults in the forward: ``frontend="auto"`` captures it with dynamo."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x, mask=None, scale: float = 1.0):
        h = torch.tanh(self.fc1(x)) * scale
        if mask is not None:
            h = h * mask
        return self.fc2(h)


class KeywordOnly(Net):
    def forward(self, x, *, mask=None):
        return super().forward(x, mask)


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 6, generator=g)
    mask = (torch.rand(16, 8, generator=g) > 0.2).double()
    y = torch.randint(0, 4, (16,), generator=g)
    return x.double(), mask, y


def _train(model, call, steps=3, **opts):
    x, mask, y = _batch()
    opt = kc.KFC(model, lr=0.1, damping=0.1, clip_fraction=0.5, stats_fraction=0.5, **opts)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(call(model, x, mask), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("wrap", ["captured", "compiled"])
def test_keyword_call_trains_like_the_positional_call(wrap):
    """Exact ν clipping (forward-mode products on the replayed batch) and factors agree to the last bit."""
    torch.manual_seed(0)
    base = Net().double()
    runs = {}
    for how, call in (("positional", lambda m, x, mask: m(x, mask, 0.5)),
                      ("keyword", lambda m, x, mask: m(x=x, scale=0.5, mask=mask))):
        model = copy.deepcopy(base)
        torch.manual_seed(1)  # the same MC targets in both runs
        if wrap == "compiled":
            model = torch.compile(model, backend="kfc", options={"inner": "eager"})
        opt, params = _train(model, call)
        assert opt.last_step["nu"] is not None and opt.last_step["nu"] > 0
        runs[how] = (params, opt.factors("fc1"), opt.factors("fc2"))
    (p1, a1, b1), (p2, a2, b2) = runs["positional"], runs["keyword"]
    for t1, t2 in zip([*p1, a1.A, a1.G, b1.A, b1.G], [*p2, a2.A, a2.G, b2.A, b2.G], strict=True):
        assert torch.equal(t1, t2)
    assert not torch.equal(p1[0], base.fc1.weight)  # it trained


def test_unreplayable_keyword_call_is_reported():
    """A keyword-only argument has no positional place: a warning says so, and the exact clip cannot run."""
    torch.manual_seed(0)
    model = KeywordOnly().double()
    x, mask, y = _batch()
    opt = kc.KFC(model, lr=0.1, damping=0.1, stats_fraction=1.0)
    with pytest.warns(UserWarning, match="no positional place"):
        loss = nn.functional.cross_entropy(model(x, mask=mask), y)
    loss.backward()
    with pytest.raises(RuntimeError, match="no recorded model inputs"):
        opt.step()
    # without the exact products it trains
    torch.manual_seed(0)
    model = KeywordOnly().double()
    opt = kc.KFC(model, lr=0.1, damping=0.1, stats_fraction=1.0, clip_curvature="factored")
    with pytest.warns(UserWarning, match="no positional place"):
        nn.functional.cross_entropy(model(x, mask=mask), y).backward()
    opt.step()
    assert opt.factors("fc1") is not None


class Branchy(nn.Module):
    """Data-dependent control flow in the root forward: the fx pass keeps the root as a black box."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x, mask):
        h = torch.tanh(self.fc1(x))
        if h.sum() > -1e9:
            h = h * mask
        return self.fc2(h)


def test_keyword_call_of_an_fx_black_box_root():
    torch.manual_seed(0)
    base = Branchy().double()
    runs = []
    for call in (lambda m, x, mask: m(x, mask), lambda m, x, mask: m(mask=mask, x=x)):
        model = copy.deepcopy(base)
        torch.manual_seed(1)
        tm = kc.transform(model, frontend="fx")
        assert [b.name for b in tm.kfc.black_boxes] == ["<root>"]
        opt, params = _train(tm, call)
        assert opt.last_step["nu"] > 0
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
