"""The inverse cost model of the sharded refresh: silent Ω coordinates leave the cost (the inverse skips them).

Checked against the inverse the project computes: a factored inverse of an Ω with 70 of 100 coordinates silent is
computed on its 30-wide live block, and ``live_cost`` charges 30³ for it; the owner-mode cost from the summed
diagonals (``owner._diag_cost``) agrees with it; and the assignment then follows the real costs.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch

from kfc_compile.curvature.blocks import Layout
from kfc_compile.curvature.inverses import compute_inverse
from kfc_compile.curvature.owner import _diag_cost
from kfc_compile.curvature.sharding import assign, inverse_cost, live_cost


def _state(d: int, live: int, g: int = 4) -> SimpleNamespace:
    """A layer state with an Ω of width d whose first ``live`` coordinates see inputs, and its inverse."""
    torch.manual_seed(0)
    x = torch.zeros(50, d, dtype=torch.float64)
    x[:, :live] = torch.randn(50, live, dtype=torch.float64)
    A, G = (x.T @ x / 50).unsqueeze(0), torch.eye(g, dtype=torch.float64).unsqueeze(0)
    layout = Layout(1, d, g)
    inv = compute_inverse("factored", A, G, 1e-3, 1.0, "layer", layout)
    return SimpleNamespace(layout=layout, inverse=inv, running=SimpleNamespace(A=A, G=G))


def test_live_cost_follows_the_live_block():
    s = _state(100, 30)
    assert s.inverse.live is not None and s.inverse.live.numel() == 30  # the inverse covers the live block only
    assert live_cost(s) == 30 ** 3 + 4 ** 3
    assert inverse_cost(s.layout) == 100 ** 3 + 4 ** 3
    assert _diag_cost(s.layout, torch.diagonal(s.running.A, dim1=-2, dim2=-1)) == live_cost(s)
    dense = _state(100, 100)
    assert dense.inverse.live is None and live_cost(dense) == inverse_cost(dense.layout)
    no_inverse = SimpleNamespace(layout=s.layout, inverse=None, running=None)
    assert live_cost(no_inverse) == inverse_cost(s.layout)  # before the first inverse: the stored d³
    # a mostly silent wide layer and two dense narrower ones: d³ gives the wide one a rank of its own and both
    # real costs to the other; the live cost puts the dense ones on different ranks
    states = [_state(100, 30), _state(90, 90), _state(90, 90)]
    by_d3 = assign([inverse_cost(t.layout) for t in states], 2)
    by_live = assign([live_cost(t) for t in states], 2)
    assert by_d3[1] == by_d3[2] != by_d3[0]
    assert by_live[1] != by_live[2]
