"""Batch statistics as classes: the approximation table, the factory, and averaging in the kernel epilogue."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.statistics import STATISTICS, ExpandStatistics, ReduceStatistics, new_statistics


def test_table_and_factory():
    assert tuple(STATISTICS) == ("expand", "reduce")
    for approx, cls in (("expand", ExpandStatistics), ("reduce", ReduceStatistics)):
        st = new_statistics(approx, 2, 5, 3, True, torch.float64, torch.device("cpu"), a_blocks=2)
        assert type(st) is cls and st.approx == approx
        assert (st.groups, st.a_dim, st.g_dim, st.has_bias, st.a_blocks, st.g_blocks) == (2, 5, 3, True, 2, 1)
        assert st.factors(4) is None  # nothing seen yet
    with pytest.raises(ValueError, match="approx"):
        new_statistics("diagonal", 1, 2, 2, False, torch.float32, torch.device("cpu"))


def test_only_expand_averages_in_the_epilogue():
    assert ExpandStatistics.averages_in_epilogue and not ReduceStatistics.averages_in_epilogue
    running = torch.zeros(1, 3, 3)
    with pytest.raises(TypeError, match="reduce"):
        new_statistics("reduce", 1, 3, 2, False, torch.float32, torch.device("cpu")).average_into(running, 0.5, 4)


def test_epilogue_average_is_the_moving_average_of_the_batch_factor():
    """Expand statistics averaged into a running Ω give ε·Ω + (1 − ε)·Ω_batch, Ω_batch from kc.curvature."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    batch = kc.curvature(model, "cross_entropy", x, y, fisher="empirical")["0"]
    tm = kc.transform(model)
    state = tm.kfc.state
    running = torch.eye(5, dtype=torch.float64)[None].clone()
    start = running.clone()
    eps = 0.75
    state.reset()
    state.n_examples = 6
    state.ema = {0: (running, eps)}
    with state.armed_forward():
        f = tm(x)
    with state.backward_pass(inputs=True, grads=True, grad_scale=6.0):  # the per-example gradients
        torch.autograd.grad(nn.functional.cross_entropy(f, y), [state.slot], allow_unused=True, retain_graph=True)
    got = state.take()[0]
    assert got.A is running
    torch.testing.assert_close(running[0], eps * start[0] + (1 - eps) * batch.A, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got.G[0], batch.G, rtol=1e-12, atol=1e-14)
