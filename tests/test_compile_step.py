"""``kc.compile_step``: the compiled step equals the eager ``transform`` + ``KFC`` step; arguments."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kfc_compile as kc


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, stride=2, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 10))


def test_compile_step_matches_eager_step():
    """6 steps of KFC-pre with the optimizer's defaults: the compiled step matches the eager one.

    Defaults: MC Fisher, exact-Fisher clipping, momentum. Statistics every 2 steps, inverses at steps 1-3 and 6, a
    grouped conv and BN (fallback SGD), float32, inductor. Same MC generator seed on both sides. Tolerance: 2e-5
    relative on factors, 1e-5 absolute on parameters (float32 reassociation in inductor's kernels, amplified a little
    by the inverses).
    """
    torch.manual_seed(0)
    base = _net()
    opts = dict(lr=0.02, damping=0.01, stats_every=2, inverse_every=6, stats_fraction=1.0)
    eager = kc.compile_step(copy.deepcopy(base), nn.CrossEntropyLoss(), compile=False,
                            generator=torch.Generator().manual_seed(1), **opts)
    step = kc.compile_step(copy.deepcopy(base), nn.CrossEntropyLoss(), generator=torch.Generator().manual_seed(1),
                           **opts)
    assert step.compiled and not eager.compiled and step.compiles == 0
    g = torch.Generator().manual_seed(2)
    for _ in range(6):
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        le, lc = eager(x, y), step(x, y)
        assert lc.shape == () and not lc.requires_grad
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    assert step.compiles == 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    assert [layer.name for layer in step.optimizer.layers] == ["0", "3", "6"]
    assert step.optimizer.fallback_names == ["1.weight", "1.bias"]
    for layer in eager.optimizer.layers:
        fe, fc = eager.optimizer.factors(layer.name), step.optimizer.factors(layer.name)
        for a, b in ((fc.A, fe.A), (fc.G, fe.G)):
            torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5 * b.abs().max().item())
    for (name, pe), pc in zip(eager.model.named_parameters(), step.model._orig_mod.parameters(), strict=True):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-5, msg=name)
    assert "nu" in step.optimizer.last_step  # clipping ran (its JVPs use the eager module)


def test_compile_step_arguments():
    with pytest.raises(TypeError, match="lr"):
        kc.compile_step(_net(), nn.CrossEntropyLoss())
    with pytest.raises(TypeError, match="nn.Module"):
        kc.compile_step(lambda x: x, nn.CrossEntropyLoss(), lr=0.1)
    with pytest.raises(ValueError, match="unknown loss"):
        kc.compile_step(_net(), "hinge", lr=0.1)
    step = kc.compile_step(_net(), "cross_entropy", lr=0.1, backend_options={"inner": "aot_eager"})
    assert isinstance(step.optimizer, kc.KFC) and step.model.kfc is step.optimizer.model.kfc
    loss = step(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,)))
    assert torch.isfinite(loss) and step.compiles == 1
    assert "compiled" in repr(step)
