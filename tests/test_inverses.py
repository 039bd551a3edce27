"""Inverse kinds as classes.

The method table, typed attributes, bucket keys, checkpoints of the saved format, and the singularity criterion without
damping (λ_min ≤ d·eps·λ_max).
"""
from __future__ import annotations

import pytest
import torch

import kfc_compile as kc
from kfc_compile.curvature import inverses as inv_mod
from kfc_compile.curvature.blocks import Layout
from kfc_compile.curvature.decompositions import check_nonsingular
from kfc_compile.curvature.inverses import DAMPING_METHODS, EigenInverse, FactoredInverse, LayerInverse


def spd(groups, d, gen, rank=None):
    X = torch.randn(groups, d, rank or 3 * d, dtype=torch.float64, generator=gen)
    return X @ X.mT / X.shape[-1] + (0.05 * torch.eye(d, dtype=torch.float64) if rank is None else 0.0)


def test_method_table():
    assert DAMPING_METHODS == ("factored", "eigen")
    assert inv_mod.inverse_kind("factored") is FactoredInverse and inv_mod.inverse_kind("eigen") is EigenInverse
    with pytest.raises(ValueError, match="damping method"):
        inv_mod.inverse_kind("tikhonov")
    gen = torch.Generator().manual_seed(0)
    A, G = spd(2, 5, gen), spd(2, 3, gen)
    for method, cls in (("factored", FactoredInverse), ("eigen", EigenInverse)):
        inv = inv_mod.compute_inverse(method, A, G, 0.1, 2.0, "x")
        assert type(inv) is cls and inv.method == method and isinstance(inv, LayerInverse)
        assert (inv.eta, inv.scale, inv.layout, inv.live, inv.silent, inv.groups) == (0.1, 2.0, None, None, None, 2)
        assert inv.bucket_key == (method, 5, 3, torch.float64, "cpu", 0.1)


def test_live_and_blocked_inverses_are_applied_alone():
    gen = torch.Generator().manual_seed(1)
    A = spd(1, 80, gen)
    A[:, :20, :] = 0
    A[:, :, :20] = 0
    G = spd(1, 3, gen)
    for method in DAMPING_METHODS:
        inv = inv_mod.compute_inverse(method, A, G, 0.1, 1.0, "x")
        assert inv.live.tolist() == list(range(20, 80)) and inv.silent.tolist() == list(range(20))
        assert inv.bucket_key is None
        lay = Layout.of(1, 80, 3, 30)
        blocked = inv_mod.compute_inverse(method, *lay.to_blocks(spd(1, 80, gen), G), 0.1, 1.0, "x", lay)
        assert blocked.layout == lay and blocked.bucket_key is None and blocked.groups == 1
    assert inv_mod.compute_inverse("factored", A, G, 0.1, 1.0, "x").silent_scale.shape == (1, 1, 1)


@pytest.mark.parametrize("method", DAMPING_METHODS)
def test_state_keeps_the_saved_format(method):
    """state() writes the dict format of existing checkpoints (string keys of the tensors), and such a dict loads."""
    gen = torch.Generator().manual_seed(2)
    A, G = spd(2, 5, gen), spd(2, 3, gen)
    inv = inv_mod.compute_inverse(method, A, G, 0.1, 3.0, "x")
    s = inv.state()
    keys = ["Ainv", "Ginv"] if method == "factored" else ["QA", "lA", "QG", "lG"]
    assert s.keys() == {"method", "eta", "scale", "tensors", "layout"} and list(s["tensors"]) == keys
    assert (s["method"], s["eta"], s["scale"], s["layout"]) == (method, 0.1, 3.0, None)
    saved = {"method": method, "eta": 0.1, "scale": 3.0, "layout": None,
             "tensors": {k: getattr(inv, k).clone() for k in keys}}  # as an older version wrote it
    again = LayerInverse.from_state(saved, torch.device("cpu"))
    assert type(again) is type(inv)
    g = torch.randn(2, 3, 5, dtype=torch.float64, generator=gen)
    assert torch.equal(again.apply(g), inv.apply(g))


def test_singularity_criterion_is_relative_to_the_largest_eigenvalue():
    eps = torch.finfo(torch.float64).eps
    with pytest.raises(kc.SingularFactorError, match="layer 'l'"):
        check_nonsingular(torch.tensor([[2 * eps, 0.5, 1.0]], dtype=torch.float64), "factor Ω of layer 'l'")
    check_nonsingular(torch.tensor([[4 * eps, 0.5, 1.0]], dtype=torch.float64), "ok")
    check_nonsingular(torch.tensor([[1e-300, 1e-299]], dtype=torch.float64), "tiny but well conditioned")
    with pytest.raises(kc.SingularFactorError):  # per matrix of a stack: one singular block is enough
        check_nonsingular(torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64), "x")
    eps32 = torch.finfo(torch.float32).eps  # the dtype's own epsilon
    with pytest.raises(kc.SingularFactorError):
        check_nonsingular(torch.tensor([[eps32, 1.0]]), "x")


@pytest.mark.parametrize("method", DAMPING_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_undamped_rank_deficient_factor_raises_even_when_cholesky_succeeds(method, dtype):
    """An exactly rank-deficient Ω (rank 3 of 8) whose rounding errors make it look positive definite."""
    gen = torch.Generator().manual_seed(3)
    A, G = spd(2, 8, gen, rank=3).to(dtype), spd(2, 3, gen).to(dtype)
    with pytest.raises(kc.SingularFactorError, match="factor Ω of layer 'fc' is singular"):
        inv_mod.compute_inverse(method, A, G, 0.0, 1.0, "fc")
    with pytest.raises(kc.SingularFactorError, match="factor Γ of layer 'fc' is singular"):
        inv_mod.compute_inverse(method, G, A, 0.0, 1.0, "fc")
    inv_mod.compute_inverse(method, A, G, 1e-3, 1.0, "fc")  # damped: fine
