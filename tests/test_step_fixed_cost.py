"""A KFC step's fixed per-step costs cut in issue 17 (item 3) give what the code they replace gives.

The step guard's one-read finite check (``safety._finite_read``: one ``aminmax`` per device over the small tensors
concatenated, the larger ones alone, all read by one ``tolist``) against ``torch.isfinite(t).all()`` per tensor, with
inf/NaN in small and large tensors of mixed dtypes; and the cause the guard names.
"""
from __future__ import annotations

import math

import pytest
import torch

from kfc_compile.optim import safety

from kfc_test_helpers import guard_check


def _tensors(gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(3, 3, generator=gen), torch.randn(4, generator=gen, dtype=torch.float64),
            torch.randn(safety.SMALL_NUMEL + 5, generator=gen), torch.randn(2, 5, generator=gen).half(),
            torch.zeros(0), torch.randn(7, generator=gen).bfloat16(), torch.randn(3, 4, generator=gen).mT]


@pytest.mark.parametrize("where", [None, 0, 1, 2, 3, 5, 6])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_finite_read_is_isfinite_all(where, value):
    ts = _tensors(torch.Generator().manual_seed(2))
    if where is not None:
        t = ts[where]
        t[(0,) * (t.dim() - 1) + (1,)] = value  # (the last tensor is a non-contiguous view)
    expected = all(bool(torch.isfinite(t).all()) for t in ts)
    assert safety._finite_read(ts) == expected
    assert expected == (where is None)  # the reference sees the bad entry: the check above can fail


@pytest.mark.parametrize("bad", [None, 0, 1, 2])
@pytest.mark.parametrize("loss", [None, torch.tensor(0.25), torch.tensor(math.nan), torch.tensor(1.0).half()])
def test_guard_cause_with_small_and_large_gradients(bad, loss):
    grads = [torch.ones(3, 2), torch.ones(safety.SMALL_NUMEL + 1), torch.ones(4, dtype=torch.float64)]
    if bad is not None:
        grads[bad].view(-1)[-1] = math.nan
    found = guard_check(loss, grads)
    loss_bad = loss is not None and not math.isfinite(float(loss))
    cause = "loss" if loss_bad else "gradient" if bad is not None else None
    assert (found and found[0]) == cause


def _gram_by_stores(spec, f, jvps, scale=1.0, mask=None, c=None):
    """The Gram matrix as it was built before: an fp64 zeros matrix and one indexed store per entry."""
    k = len(jvps)
    C = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            C[i, j] = C[j, i] = float(spec.fisher_inner(f, jvps[i], jvps[j], mask, c)) * scale
    return C


@pytest.mark.parametrize("k", [0, 1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_gram_from_floats_is_bitwise_the_stored_one(k, masked):
    from kfc_compile.curvature.losses import loss_spec
    from kfc_compile.optim.fvp import gram

    gen = torch.Generator().manual_seed(3)
    spec = loss_spec("cross_entropy")
    f = torch.randn(6, 5, generator=gen)
    jvps = [torch.randn(6, 5, generator=gen) for _ in range(k)]
    mask = torch.tensor([True, False, True, True, False, True]) if masked else None
    C = gram(spec, f, jvps, 6.0, mask, 1.5 if masked else None)
    C0 = _gram_by_stores(spec, f, jvps, 6.0, mask, 1.5 if masked else None)
    assert C.dtype == torch.float64 and C.shape == (k, k) and torch.equal(C, C0)
    if k:
        assert C[0, 0] > 0  # a real Gram matrix: the comparison can fail
