"""Gradient accumulation: micro-batches before one ``opt.step()`` give the statistics of the whole batch.

The twin runs: one optimizer sees 1 × 16 examples per step, the other 2 × 8 with each micro-batch's mean loss
divided by 2 (README, "Gradient accumulation"), in float64 from the same initial weights and, for MC, the same
seeded generator. Factors after every step and the parameters after three steps must agree to rounding, in every
statistics mode: the subset pass in ``step()`` (whose subset spans both micro-batches), in-pass capture
(``stats_fraction=1``), the empirical Fisher (from the user's gradients), KFAC-reduce, a sum loss, and a model
compiled with the kfc backend. The exact clipping statistic runs on a fraction that spans both micro-batches too.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

AOT_EAGER = {"inner": "aot_eager"}
TOL = dict(rtol=1e-10, atol=1e-12)


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(4 * 2 * 2, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def batches(steps: int, n: int = 16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 6, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (n,), generator=g))
            for _ in range(steps)]


def run(model, opt, data, splits, reduction="mean", runner=None):
    """Train on ``data``; each batch in micro-batches of the sizes ``splits``, losses scaled to the whole batch's."""
    runner = model if runner is None else runner
    factors = []
    for x, y in data:
        opt.zero_grad()
        start = 0
        for k in splits:
            xs, ys = x[start:start + k], y[start:start + k]
            loss = F.cross_entropy(runner(xs), ys, reduction=reduction)
            if reduction == "mean":
                loss = loss * (k / x.shape[0])  # the whole batch's mean: 1/M for M equal micro-batches
            loss.backward()
            start += k
        opt.step()
        factors.append({layer.name: opt.factors(layer.name) for layer in opt.layers})
    return factors


def assert_same(one, acc, m1, m2):
    assert one and len(one) == len(acc)
    for f1, f2 in zip(one, acc, strict=True):
        assert f1.keys() == f2.keys() and len(f1) == 4
        for name in f1:
            torch.testing.assert_close(f2[name].A, f1[name].A, **TOL)
            torch.testing.assert_close(f2[name].G, f1[name].G, **TOL)
    moved = max(float((p - q).detach().abs().max()) for p, q in zip(m1.parameters(), net().parameters(), strict=True))
    assert moved > 1e-3  # the runs trained
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(q, p, **TOL)


CASES = {
    # the subset pass in step(): 12 of 16 examples = 8 of the first micro-batch and 4 of the second
    "subset-pass-mc": dict(fisher="mc", stats_fraction=0.75, clip_fraction=0.75),
    "subset-pass-type2": dict(fisher="type-2", stats_fraction=0.75, clip_fraction=0.75, mode="adaptive"),
    "in-pass-mc": dict(fisher="mc", stats_fraction=1.0, clip_fraction=0.75),
    "in-pass-type2-reduce": dict(fisher="type-2", stats_fraction=1.0, approx="reduce"),
    "empirical": dict(fisher="empirical", stats_fraction=1.0),
    "empirical-reduce-eigen": dict(fisher="empirical", stats_fraction=1.0, approx="reduce", damping_method="eigen"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_micro_batches_equal_one_batch(case):
    opts = dict(lr=0.2, damping=1e-2, weight_decay=1e-3, stat_decay=0.6, inverse_every=1, clip=1e-2, **CASES[case])
    m1, m2 = net(), net()
    o1 = kc.KFC(m1, generator=torch.Generator().manual_seed(5), **opts)
    o2 = kc.KFC(m2, generator=torch.Generator().manual_seed(5), **opts)
    data = batches(3)
    one = run(m1, o1, data, [16])
    acc = run(m2, o2, data, [8, 8])
    assert_same(one, acc, m1, m2)
    if opts.get("mode") != "adaptive":
        assert o1.last_step["clip_scale"] < 1  # the exact ν (on 12 examples, over both micro-batches) mattered
        assert o2.last_step["nu"] == pytest.approx(o1.last_step["nu"], rel=1e-10)


@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
def test_unequal_micro_batches_and_a_sum_loss(fisher):
    """6 + 10 examples; with a sum loss the micro-batch sums add and the curvature scale is the total N."""
    for reduction in ("mean", "sum"):
        opts = dict(lr=0.01 if reduction == "sum" else 0.2, damping=1e-2, fisher=fisher, stats_fraction=1.0,
                    loss=nn.CrossEntropyLoss(reduction=reduction), clip=None)
        m1, m2 = net(), net()
        o1, o2 = kc.KFC(m1, **opts), kc.KFC(m2, **opts)
        data = batches(3)
        one = run(m1, o1, data, [16], reduction)
        acc = run(m2, o2, data, [6, 10], reduction)
        assert_same(one, acc, m1, m2)
        assert o2._estimator.scale == (16.0 if reduction == "sum" else 1.0)


@pytest.mark.parametrize("fisher", ["empirical", "type-2"])
def test_compiled_model_accumulates(fisher):
    """A kfc-compiled model (in-pass capture through kfc::record) against an eager one-batch run."""
    opts = dict(lr=0.2, damping=1e-2, fisher=fisher, stats_fraction=1.0, clip=1e-2, clip_fraction=0.75)
    m1, m2 = net(), net()
    o1 = kc.KFC(m1, **opts)
    cm = torch.compile(m2, backend="kfc", options=AOT_EAGER)
    o2 = kc.KFC(cm, **opts)
    data = batches(3)
    one = run(m1, o1, data, [16])
    acc = run(m2, o2, data, [8, 8], runner=cm)
    assert_same(one, acc, m1, m2)


@pytest.mark.parametrize("fisher, compiled", [("empirical", False), ("empirical", True), ("type-2", True)])
def test_in_pass_subset_takes_the_leading_examples_of_each_micro_batch(fisher, compiled):
    """In-pass capture with stats_fraction < 1 cannot know the step's N while a micro-batch runs.

    Each micro-batch contributes its own leading subset_size(N_i, fraction) examples; the factors are those of
    kc.curvature on the concatenation of these subsets (and for the empirical Fisher, with the per-example
    gradients of the whole batch's mean loss).
    """
    model = net()
    twin = copy.deepcopy(model)
    runner = torch.compile(model, backend="kfc", options=AOT_EAGER) if compiled else model
    opt = kc.KFC(runner, lr=0.0, fisher=fisher, stats_fraction=0.25, clip=None)
    (x, y), = batches(1)
    run(model, opt, [(x, y)], [8, 8], runner=runner)  # subset_size(8, 0.25) = 2 from each
    idx = [0, 1, 8, 9]
    want = kc.curvature(twin, "cross_entropy", x[idx], y[idx], fisher=fisher)
    assert len(want) == 4
    for name, f in want.items():
        torch.testing.assert_close(opt.factors(name).A, f.A, **TOL)
        torch.testing.assert_close(opt.factors(name).G, f.G, **TOL)


def test_a_forward_before_zero_grad_is_not_a_micro_batch():
    """Forwards with grad enabled but followed by zero_grad() (e.g. an evaluation) do not join the next step."""
    for opts in (dict(stats_fraction=0.5, fisher="type-2"), dict(stats_fraction=1.0, fisher="empirical")):
        m1, m2 = net(), net()
        o1, o2 = kc.KFC(m1, lr=0.1, **opts), kc.KFC(m2, lr=0.1, **opts)
        data = batches(2)
        one = run(m1, o1, data, [16])
        for x, y in data:
            F.cross_entropy(m2(x.flip(0)), y).backward()  # some other pass, then discarded
            run(m2, o2, [(x, y)], [16])
        for name, f in one[-1].items():
            torch.testing.assert_close(o2.factors(name).A, f.A, **TOL)
            torch.testing.assert_close(o2.factors(name).G, f.G, **TOL)


def test_recorded_calls_are_dropped_after_the_step():
    model = net()
    opt = kc.KFC(model, lr=0.1, fisher="type-2", stats_fraction=0.5)
    state = model.kfc.state
    (x, y), = batches(1)
    for _ in range(2):
        F.cross_entropy(model(x[:4]), y[:4]).backward()
    assert [c.batch_size() for c in state.recorded_calls()] == [4, 4]
    opt.step()
    assert state.recorded_calls() == []
    with torch.no_grad():
        model(x)
    assert state.recorded_calls() == []  # no grad, no micro-batch
    opt.zero_grad()
    with pytest.raises(RuntimeError, match="no recorded model inputs"):
        opt.step()
