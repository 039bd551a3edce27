"""Keyword calls of dynamo-captured and kfc-compiled modules train exactly like the positional call.

``kc.KFC``'s exact Fisher products and statistics subsets replay the recorded call (``runtime.calls.RecordedCall``);
``tests/test_recorded_calls.py`` covers the fx and ``kfc``-compiled paths, this file the dynamo capture of
``frontend="auto"``, skipped defaults and keyword-only parameters (every HF model is called ``model(input_ids=...)``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kfc_compile as kc


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


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


def test_keyword_only_call_trains_like_the_positional_call():
    """A keyword-only argument is replayed as a keyword: the same trajectory as the positional twin."""
    torch.manual_seed(0)
    base = Net().double()
    runs = []
    for model, call in ((copy.deepcopy(base), lambda m, x, mask: m(x, mask)),
                        (KeywordOnly().double(), lambda m, x, mask: m(x, mask=mask))):
        model.load_state_dict(base.state_dict())
        torch.manual_seed(1)
        opt, params = _train(model, call)
        assert opt.last_step["nu"] > 0
        runs.append(params)
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
