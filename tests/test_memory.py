"""Curvature memory: ``kc.report``'s per-layer bytes are what ``kc.KFC`` holds; ``memory_budget`` plans layouts."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.blocks import Layout
from kfc_compile.curvature.memory import MIN_BLOCK, layer_memory, peak_bytes, plan_layouts

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def net(dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    # tanh, not ReLU: no input coordinate is exactly 0 over the batch, so no inverse shrinks to a live block
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(8 * 64, 300), nn.Tanh(),
                         nn.Linear(300, 5)).to(dtype)


def one_step(model, **kw):
    opt = kc.KFC(model, lr=0.01, damping=1e-2, **kw)
    x = torch.randn(16, 3, 8, 8, dtype=next(model.parameters()).dtype)
    F.cross_entropy(model(x), torch.randint(0, 5, (16,))).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("method", ["factored", "eigen"])
@pytest.mark.parametrize("cap", [None, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_memory_is_what_the_optimizer_holds(method, cap, dtype):
    opt = one_step(net(dtype), damping_method=method, max_factor_dim=cap)
    for s in opt.layer_states():
        m = layer_memory(s.layer, s.layout, method)
        assert m.layout == Layout.of(s.layer.groups, s.layer.a_dim, s.layer.g_dim, cap)
        assert m.factors == s.running.nbytes(), s.name
        assert s.inverse.live is None and m.held == s.nbytes(), s.name  # (silent coordinates only shrink it)


def test_a_budget_shrinks_the_widest_layers_until_the_peak_fits():
    layers = kc.transform(net()).kfc.layers
    free = plan_layouts(layers, 8192, None)
    need = peak_bytes([layer_memory(la, free[la.name]) for la in layers])
    budget = need // 2
    plan = plan_layouts(layers, 8192, budget)
    assert peak_bytes([layer_memory(la, plan[la.name]) for la in layers]) <= budget
    assert plan["3"] == Layout(1, 513, 300, 3, 2) and plan["0"] == free["0"] and plan["5"] == free["5"]  # the widest
    smaller = plan_layouts(layers, 8192, need // 5)
    assert peak_bytes([layer_memory(la, smaller[la.name]) for la in layers]) <= need // 5
    with pytest.raises(kc.MemoryBudgetError, match=rf"memory_budget=1,000 bytes .*blocks of {MIN_BLOCK}"):
        plan_layouts(layers, 8192, 1000)


def test_kfc_with_a_memory_budget_warns_trains_and_refuses_too_small_budgets():
    layers = kc.transform(net()).kfc.layers
    free = plan_layouts(layers, 8192, None)
    budget = peak_bytes([layer_memory(la, free[la.name]) for la in layers]) // 2
    model = net()
    with pytest.warns(UserWarning, match=r"memory_budget=[\d,]+ bytes: 1 KFC layer\(s\) keep smaller diagonal "
                                         r"blocks .*'3' \(Ω 3×171, Γ 2×150\)"):
        opt = one_step(model, memory_budget=budget)
    assert opt.layer_state("3").layout.a_blocks > 1
    assert peak_bytes([layer_memory(s.layer, s.layout) for s in opt.layer_states()]) <= budget
    assert all(torch.isfinite(p).all() for p in model.parameters())
    with pytest.raises(kc.MemoryBudgetError, match="raise memory_budget"):
        kc.KFC(net(), lr=0.01, memory_budget=1000)
    with pytest.raises(ValueError, match="memory_budget must be a positive integer"):
        kc.KFC(net(), lr=0.01, memory_budget=0.5)


def test_report_lists_each_layers_curvature_memory():
    tm = kc.transform(net())
    text = kc.report(tm)
    mib = 2.0 ** 20
    for layer in tm.kfc.layers:
        m = layer_memory(layer, Layout.of(layer.groups, layer.a_dim, layer.g_dim, 8192))
        assert re.search(rf"^{layer.name}\s+dense\s+dense\s+{m.factors / mib:.2f}\s+{m.inverses / mib:.2f}\s+"
                         rf"{m.held / mib:.2f}", text, re.M), layer.name
    assert "peak of a statistics step with an inverse refresh" in text
    blocked = kc.report(tm, max_factor_dim=100)
    assert re.search(r"^3\s+6×86\s+3×100\s", blocked, re.M)  # Ω 513 in 6 blocks of 86, Γ 300 in 3 of 100


def test_a_budget_applies_to_layers_a_compiled_model_reveals_later():
    """The kfc backend: layers join at the first forward; the budget plans them then (and warns once)."""
    torch._dynamo.reset()
    model = net()
    cm = torch.compile(model, backend="kfc", options={"inner": "aot_eager"})
    layers = kc.transform(net()).kfc.layers
    free = plan_layouts(layers, 8192, None)
    budget = peak_bytes([layer_memory(la, free[la.name]) for la in layers]) // 2
    opt = kc.KFC(cm, lr=0.01, damping=1e-2, memory_budget=budget)
    x = torch.randn(16, 3, 8, 8)
    with pytest.warns(UserWarning, match="memory_budget"):
        F.cross_entropy(cm(x), torch.randint(0, 5, (16,))).backward()
        opt.step()
    wide = [s for s in opt.layer_states() if s.layer.a_dim == 513]
    assert len(wide) == 1 and wide[0].layout == Layout(1, 513, 300, 3, 2)
