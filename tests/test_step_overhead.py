"""The fused forms of a step's per-layer work equal the per-layer forms they replace (issue 17, per-call overhead).

Finite checks over all groups at once (the same flags), the step guard's single host sync (the same cause
named), the subset forward without ``functional_call`` where nothing needs replacing, and the factored inverses
with fewer host syncs (bitwise, and the same errors).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from kfc_compile.curvature import decompositions as dec
from kfc_compile.curvature.guard import all_finite, finite_flags
from kfc_compile.curvature.subset import forward_with_private_buffers
from kfc_compile.runtime.calls import RecordedCall

from kfc_test_helpers import guard_check


def _sym(d, gen, dtype=torch.float32, groups=1):
    X = torch.randn(groups, 3 * d, d, generator=gen, dtype=torch.float64)
    return (X.mT @ X / (3 * d)).to(dtype)


@pytest.mark.parametrize("bad", [None, (0, 0, math.nan), (1, 0, math.inf), (2, 0, -math.inf)])
def test_finite_flags_fused_equals_per_group(bad):
    gen = torch.Generator().manual_seed(1)
    groups = [[torch.randn(3, 3, generator=gen), torch.randn(4, generator=gen, dtype=torch.float64)],
              [torch.randn(70000, generator=gen)], [torch.randn(2, 5, generator=gen).half(), torch.zeros(0)]]
    if bad is not None:
        g, t, value = bad
        groups[g][t].view(-1)[1] = value
    expected = [all(bool(all_finite(t)) for t in ts) for ts in groups]
    assert finite_flags(groups) == expected
    assert expected == [bad is None or bad[0] != i for i in range(3)]


@pytest.mark.parametrize("loss,grad_bad,cause", [
    (torch.tensor(0.5), False, None), (torch.tensor(math.nan), False, "loss"), (torch.tensor(0.5), True, "gradient"),
    (torch.tensor(math.inf), True, "loss"), (float("nan"), False, "loss"), (None, True, "gradient"),
    (None, False, None), (2.0, False, None)])
def test_guard_names_the_cause_in_order(loss, grad_bad, cause):
    grads = [torch.ones(3, 2), torch.ones(70000), torch.ones(4, dtype=torch.float64)]
    if grad_bad:
        grads[1][5] = math.inf
    found = guard_check(loss, grads)
    assert (found and found[0]) == cause
    if cause == "loss":
        assert "loss is" in found[1]


def test_subset_forward_without_buffers_is_the_plain_call():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    x = torch.randn(6, 4)
    out = forward_with_private_buffers(model, RecordedCall((x,), {}))
    assert torch.equal(out, model(x)) and out.requires_grad


def test_subset_forward_with_buffers_leaves_them_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 2)).train()
    x = torch.randn(6, 4)
    before = {n: b.clone() for n, b in model.named_buffers()}
    out = forward_with_private_buffers(model, RecordedCall((x,), {}))
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n])
    copies = {n: b.clone() for n, b in model.named_buffers()}
    assert torch.equal(out, functional_call(model, copies, (x,)))


@pytest.mark.parametrize("eta", [1e-3, 0.0])
def test_factored_inverses_unchanged(eta):
    """Bitwise the Cholesky inverses of Ω_d = 2Ω + π√η I and Γ_d = Γ + √η/π I (rounding floors included)."""
    gen = torch.Generator().manual_seed(3)
    A, G = _sym(6, gen, groups=2), _sym(4, gen, groups=2)
    Ainv, Ginv, ca = dec.factored_inverses(A, G, eta, 2.0)
    cg = torch.zeros(2, 1, 1)
    if eta:
        pi = dec.pi_split(dec._traces64(2.0 * A, 2) / 6, dec._traces64(G, 2) / 4)
        cg = torch.maximum((eta ** 0.5 / pi).float()[:, None, None], dec._rounding_floor(G))
    for inv, M in ((Ainv, 2.0 * A + ca * torch.eye(6)), (Ginv, G + cg * torch.eye(4))):
        assert torch.equal(inv, torch.cholesky_inverse(torch.linalg.cholesky(M)))


def test_factored_inverses_range_error_still_raised():
    A = torch.eye(3)[None] * 2e-38
    G = torch.eye(2)[None] * 1e38
    with pytest.raises(dec.DecompositionError, match="outside the"):  # √η/π overflows float32
        dec.factored_inverses(A, G, 1e10)
