"""Recorded calls: the optimizer's replays (statistics subset, exact Fisher products) use the call as written.

Keyword arguments, a batch dimension found in a keyword argument, arguments that are not batched: the replay of
``model(x=x, mask=mask)`` must give what ``kc.curvature`` gives on the leading examples passed positionally.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.subset import leading_subset
from kfc_compile.runtime.calls import RecordedCall

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

AOT_EAGER = {"inner": "aot_eager"}


class Masked(nn.Module):
    """Per-token features times a mask, mean-pooled, times a scalar temperature that is not batched."""

    def __init__(self, untraceable: bool = False):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.out = nn.Linear(6, 3)
        self.untraceable = untraceable

    def forward(self, x, mask, temperature):
        if self.untraceable and float(temperature) <= 0:  # fx cannot trace this: the root runs as a black box
            raise ValueError("temperature must be positive")
        h = torch.tanh(self.inp(x)) * mask.unsqueeze(-1)
        return self.out(h.mean(1)) / temperature


def data(n=12):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, 4, dtype=torch.float64, generator=g)
    mask = (torch.rand(n, 5, generator=g) > 0.3).double()
    return x, mask, torch.tensor(1.5, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def test_recorded_call_batch_size_and_leading_slice():
    x, mask, t, _ = data()
    other = torch.randn(5, 2)  # leading dim is not N: passed through
    call = RecordedCall((None, 3), {"x": x, "mask": mask, "t": t, "other": other})
    assert call.batch_size() == 12  # the first tensor with a dimension, here a keyword argument
    part = call.leading(4)
    assert part.args == (None, 3)
    assert torch.equal(part.kwargs["x"], x[:4]) and torch.equal(part.kwargs["mask"], mask[:4])
    assert part.kwargs["t"] is not t and torch.equal(part.kwargs["t"], t) and part.kwargs["other"].shape == (5, 2)
    assert RecordedCall((t,), {}).batch_size() is None
    with pytest.raises(RuntimeError, match="no tensor argument with a batch dimension"):
        leading_subset([RecordedCall((t,), {})], 0.5)


def test_leading_subset_spans_micro_batches():
    a, b = torch.arange(8.0), torch.arange(8.0, 14.0)
    parts = leading_subset([RecordedCall((a,)), RecordedCall((b,)), RecordedCall((a,))], 0.5)  # 11 of 22
    assert [p.args[0].tolist() for p in parts] == [a.tolist(), [8.0, 9.0, 10.0]]
    parts = leading_subset([RecordedCall((a,)), RecordedCall((a,))], 9 / 16)  # 9: 8 + 1, but 2 per forward
    assert [p.batch_size() for p in parts] == [8, 2]


@pytest.mark.parametrize("compiled, untraceable", [(False, False), (False, True), (True, False)])
def test_keyword_calls_feed_the_statistics_pass_and_the_fisher_products(compiled, untraceable):
    """model(x=..., mask=..., temperature=...) vs the same model called positionally: identical training."""
    torch.manual_seed(0)
    base = Masked(untraceable).double()
    kw_model, pos_model, ref = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    opts = dict(lr=0.5, fisher="type-2", stats_fraction=0.5, clip=1e-3, clip_fraction=0.5)
    if compiled:  # in-pass capture of the subset's rows; the exact Fisher products replay the keyword call
        runner = torch.compile(kw_model, backend="kfc", options=AOT_EAGER)
        opts["stats_fraction"] = 1.0
    else:
        runner = kw_model
    kw_opt, pos_opt = kc.KFC(runner, **opts), kc.KFC(pos_model, **opts)
    x, mask, t, y = data()
    F.cross_entropy(runner(x=x, mask=mask, temperature=t), y).backward()
    F.cross_entropy(pos_model(x, mask, t), y).backward()
    kw_opt.step()
    pos_opt.step()
    assert kw_opt.last_step["clip_scale"] < 1
    assert kw_opt.last_step["nu"] == pytest.approx(pos_opt.last_step["nu"], rel=1e-12)
    m = 12 if compiled else 6
    want = kc.curvature(ref, "cross_entropy", (x[:m], mask[:m], t), y[:m], fisher="type-2")
    assert set(want) == {"inp", "out"}
    for name, f in want.items():
        torch.testing.assert_close(kw_opt.factors(name).A, f.A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kw_opt.factors(name).G, f.G, rtol=1e-12, atol=1e-12)
    for p, q in zip(kw_model.parameters(), pos_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
