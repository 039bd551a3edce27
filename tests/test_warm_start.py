"""The warm start (``warmup``): statistics and inverses every step for the first steps, then the periods (issue 17)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.schedule import inverses_due, statistics_due

pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
              pytest.mark.usefixtures("one_thread")]


def _pattern(steps: int, **opts) -> tuple[list[int], list[int]]:
    """(statistics steps, inverse-recompute steps) of a KFC run on a tiny net, observed on its layer states."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    opt = kc.KFC(model, lr=1e-2, **opts)
    g = torch.Generator().manual_seed(1)
    stats, inverses, last_updates, last_inverse = [], [], 0, None
    for k in range(1, steps + 1):
        x, y = torch.randn(8, 3, dtype=torch.float64, generator=g), torch.randint(0, 2, (8,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        s = opt.layer_states()[0]
        if s.running.updates != last_updates:
            stats.append(k)
        if s.inverse is not last_inverse:
            inverses.append(k)
        last_updates, last_inverse = s.running.updates, s.inverse
    return stats, inverses


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_warm_start_schedule_exact_step_pattern(fraction):
    stats, inverses = _pattern(25, stats_every=5, inverse_every=10, warmup=6, stats_fraction=fraction)
    assert stats == [1, 2, 3, 4, 5, 6, 11, 16, 21]
    assert inverses == [1, 2, 3, 4, 5, 6, 10, 20]


def test_without_warm_start_the_periods_alone():
    stats, inverses = _pattern(25, stats_every=5, inverse_every=10)
    assert stats == [1, 6, 11, 16, 21]
    assert inverses == [1, 2, 3, 10, 20]


def test_schedule_rules():
    assert [k for k in range(1, 13) if statistics_due(k, 4, 2)] == [1, 2, 5, 9]
    assert [k for k in range(1, 13) if inverses_due(k, 4, 2)] == [1, 2, 3, 4, 8, 12]
    assert [k for k in range(1, 13) if inverses_due(k, 5, 7)] == [1, 2, 3, 4, 5, 6, 7, 10]


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_warmup_validation(bad):
    with pytest.raises(ValueError, match="warmup must be a non-negative integer"):
        kc.KFC(nn.Linear(2, 2), lr=0.1, warmup=bad)
