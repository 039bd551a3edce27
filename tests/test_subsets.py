"""The statistics and ν subsets: how many leading examples they take, and that small batches train with the defaults.

docs/algorithm.md §4.3: a subset is ceil(fraction·N) examples, at least 2 (train-mode BatchNorm), and the defaults'
(``stats_fraction`` / ``clip_fraction`` left at None: 1/8 and 1/4) at least ``MIN_STATS_SUBSET`` = 16 and
``MIN_CLIP_SUBSET`` = 32 where the batch has them; gradient accumulation spreads the subset over the step's
micro-batches in order.
"""
from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.subset import leading_subset
from kfc_compile.runtime.calls import RecordedCall
from kfc_compile.runtime.subsets import MIN_CLIP_SUBSET, MIN_STATS_SUBSET, Share, default_share, subset_size

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

SIZES = (1, 2, 7, 16, 31, 128, 1024)


def brute_force(n: int, fraction: float, floor: int) -> int:
    """The smallest k ≤ n with k ≥ fraction·n and k ≥ floor, or all n examples when there are fewer."""
    return next((k for k in range(n + 1) if k >= fraction * n - 1e-12 and k >= floor), n)


@pytest.mark.parametrize("fraction, floor, want", [
    (0.125, 16, (1, 2, 7, 16, 16, 16, 128)),     # the statistics default: 1/8, at least 16
    (0.25, 32, (1, 2, 7, 16, 31, 32, 256)),      # the ν default: 1/4, at least 32
    (0.125, None, (1, 2, 2, 2, 4, 16, 128)),     # an explicit fraction: as given, at least 2
    (0.25, None, (1, 2, 2, 4, 8, 32, 256)),
    (1.0, 32, SIZES),
    (1.0, None, SIZES),
])
def test_subset_size_exact_counts(fraction, floor, want):
    share = default_share(fraction, floor) if floor else fraction
    got = tuple(subset_size(n, share) for n in SIZES)
    assert got == want
    assert got == tuple(brute_force(n, fraction, floor or 2) for n in SIZES)


def test_subset_size_matches_the_rule_everywhere():
    for floor in (2, 3, 16, 32, 64):
        for n in range(1, 300):
            for fraction in (1e-3, 0.1, 0.125, 0.25, 1 / 3, 0.5, 0.99, 1.0):
                assert subset_size(n, Share(fraction, floor)) == brute_force(n, fraction, floor), (n, fraction)


def test_share_is_a_float_that_survives_pickling_and_copies():
    s = default_share(0.125, 16)
    assert s == 0.125 and s < 1.0 and isinstance(s, float) and s.floor == 16
    for t in (pickle.loads(pickle.dumps(s)), copy.deepcopy(s), copy.copy(s)):
        assert isinstance(t, Share) and t == s and t.floor == s.floor
    with pytest.raises(ValueError, match="floor"):
        Share(0.5, 1)


def test_options_defaults_and_explicit_fractions():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    o = kc.KFC(model, lr=0.1).options
    assert isinstance(o.stats_fraction, Share) and isinstance(o.clip_fraction, Share)
    assert (o.stats_fraction, o.stats_fraction.floor) == (0.125, MIN_STATS_SUBSET) == (0.125, 16)
    assert (o.clip_fraction, o.clip_fraction.floor) == (0.25, MIN_CLIP_SUBSET) == (0.25, 32)
    o = kc.KFC(copy.deepcopy(model), lr=0.1, stats_fraction=0.125, clip_fraction=0.25).options
    assert getattr(o.stats_fraction, "floor", 2) == 2 and getattr(o.clip_fraction, "floor", 2) == 2
    for name in ("stats_fraction", "clip_fraction"):
        with pytest.raises(ValueError, match=name):
            kc.KFC(copy.deepcopy(model), lr=0.1, **{name: 0.0})


def calls_of(sizes):
    return [RecordedCall((torch.arange(n, dtype=torch.float64).unsqueeze(1) + 100 * i,)) for i, n in enumerate(sizes)]


@pytest.mark.parametrize("sizes, share, want", [
    ([5, 20, 3, 40], default_share(0.125, 32), [5, 20, 3, 4]),  # N = 68: m = 32 over the first four
    ([5, 20, 3, 40], default_share(0.125, 16), [5, 11]),        # N = 68: m = 16 over the first two
    ([5, 20, 3, 40], 0.125, [5, 4]),                            # explicit 1/8: m = ceil(8.5) = 9
    ([7, 9], 0.5, [7, 2]),                                      # m = 8, but the second call gets 2 (BatchNorm)
    ([1, 6, 6], 0.25, [1, 3]),                                  # m = ceil(3.25) = 4; a call of one keeps its one
    ([10, 10, 10], default_share(0.25, 32), [10, 10, 10]),      # N = 30 < 32: the whole batch
    ([64, 64, 64, 64], default_share(0.125, 32), [32]),         # N = 256: 32 from the first micro-batch
    ([512, 512], default_share(0.25, 32), [256]),
    ([3, 2], default_share(0.125, 16), [3, 2]),
])
def test_leading_subset_over_unequal_micro_batches(sizes, share, want):
    calls = calls_of(sizes)
    parts = leading_subset(calls, share)
    assert [p.batch_size() for p in parts] == want
    m = subset_size(sum(sizes), share)
    assert sum(want) >= m and sum(want) - m <= 1  # at most one extra example, from the BatchNorm guard
    for part, call in zip(parts, calls, strict=False):  # the leading examples of each call, in order
        k = part.batch_size()
        assert torch.equal(part.args[0], call.args[0][:k])


class BNNet(nn.Module):
    """conv → BatchNorm → linear; records the batch size of every train-mode BatchNorm forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 3)
        self.seen: list[int] = []
        self.bn.register_forward_pre_hook(lambda m, a: self.seen.append(a[0].shape[0]) if m.training else None)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.mark.parametrize("options", [{}, dict(stats_fraction=0.1, clip_fraction=0.1),
                                     dict(fisher="type-2", stats_fraction=0.3), dict(mode="adaptive", lr=1.0)])
def test_batchnorm_never_sees_one_example(options):
    """Every forward of the optimizer's passes (statistics subset, ν / Fisher products) has ≥ 2 examples."""
    torch.manual_seed(0)
    model = BNNet().double()
    opt = kc.KFC(model, **{"lr": 1e-2, **options})
    gen = torch.Generator().manual_seed(1)
    for sizes in ([2, 7], [9, 3], [2], [40, 2, 5], [3, 3, 3]):
        n = sum(sizes)
        x, y = torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)

        def closure(x=x, y=y, sizes=sizes, n=n):
            opt.zero_grad()
            total = 0.0
            for xs, ys in zip(x.split(sizes), y.split(sizes), strict=True):
                loss = F.cross_entropy(model(xs), ys) * (xs.shape[0] / n)
                loss.backward()
                total += loss.item()
            return torch.tensor(total)

        model.seen.clear()
        closure()
        opt.step(closure)
        assert model.seen and min(model.seen) >= 2, model.seen
        assert len(model.seen) > len(sizes)  # the optimizer ran passes of its own
    assert opt._step_count == 5 and all(torch.isfinite(p).all() for p in model.parameters())


class SizeLog(nn.Module):
    """A tanh net that records the batch size of every forward (at its activation, a leaf module)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        self.seen: list[int] = []
        self.net[1].register_forward_pre_hook(lambda m, a: self.seen.append(a[0].shape[0]))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("n", [16, 48, 128, 1024])
def test_the_default_passes_run_on_the_floored_subsets(n):
    """Default subsets (MC Fisher: a separate statistics pass): max(N/8, 16), and max(N/4, 32) for the exact ν.

    The default trust region (the factored ν of the step) adds no pass.
    """
    want_stats, want_nu = min(n, max(math.ceil(n / 8), 16)), min(n, max(math.ceil(n / 4), 32))
    for curvature, want in (("exact", [n, want_stats, want_nu]), ("auto", [n, want_stats])):
        torch.manual_seed(0)
        model = SizeLog()
        opt = kc.KFC(model, lr=1e-2, generator=torch.Generator().manual_seed(0), clip_curvature=curvature)
        model.seen.clear()  # the trace's
        x, y = torch.randn(n, 6), torch.randint(0, 3, (n,))
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert model.seen == want, curvature


@pytest.fixture(scope="module")
def digits():
    from kfc_compile.tools.demo import load_task
    return load_task("digits")


@pytest.mark.parametrize("lr", [1e-2, 3e-3, 1e-3])
def test_batch_16_trains_at_every_point_of_the_default_grid(digits, lr):
    """Digits at batch 16, the demo's conv net and periods, KFC's defaults: no divergence at any lr of the grid.

    With the subsets a fraction alone (2 examples for the statistics, 4 for ν) lr 1e-2 and 3e-3 diverged
    (docs/benchmarks.md, "Small batches").
    """
    from kfc_compile.tools.demo import GRIDS, KFC_OPTIONS, train_run
    assert lr in GRIDS["kfc"]
    r = train_run(digits, "convnet", "kfc", lr, steps=150, batch_size=16, target=0.0, eval_every=50, seed=0,
                  kfc_options=dict(KFC_OPTIONS), test=False)
    assert not r.diverged
    assert r.train_loss[-1] < 0.5 * r.train_loss[0], r.train_loss
