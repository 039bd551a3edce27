"""The two front ends recognise layers through one site-kind table, so they must agree.

The same table-driven cases (module, functional and shared calls, grouped convs, weights with other uses) run
through the fx pass (``kc.transform`` / eager ``kc.KFC``) and the dynamo backend (``torch.compile(backend="kfc")``),
and give identical layer lists, identical uncovered parameters, and equal factors after one statistics step
(float64).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.frontend.dynamo.backend import registry_for


class Functional(nn.Module):
    """F.linear / F.conv2d on parameters (no modules)."""

    def __init__(self):
        super().__init__()
        self.cw = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.3)
        self.cb = nn.Parameter(torch.zeros(4))
        self.w = nn.Parameter(torch.randn(5, 4 * 6 * 6) * 0.1)

    def forward(self, x):
        h = torch.tanh(F.conv2d(x, self.cw, self.cb, stride=1, padding=0))
        return F.linear(h.flatten(1), self.w)


class Shared(nn.Module):
    """One Linear called twice (extra uses are extra positions) and a grouped, bias-free conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.inp = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = self.conv(torch.relu(self.inp(x))).mean((2, 3))
        return self.head(self.fc(torch.tanh(self.fc(h))))


class OtherUses(nn.Module):
    """A weight also used by a matmul and a normalisation layer: uncovered on both paths, with reasons."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = self.bn(self.conv(x[:, :, :, 0])).mean(-1)
        return self.head(self.proj(h) + h @ self.proj.weight)


class Depthwise3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(3, 6, (1, 3, 3), stride=(1, 2, 2))
        self.c2 = nn.Conv3d(6, 6, 3, padding=1, groups=6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.c1(x.unsqueeze(2).expand(-1, -1, 2, -1, -1)))
        return self.head(torch.relu(self.c2(h)).mean((2, 3, 4)))


class Transposed(nn.Module):
    """UNet-style: a strided conv down, ConvTranspose2d up (grouped, output_padding), F.conv_transpose2d, a skip."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.w = nn.Parameter(torch.randn(7, 2, 2, 2) * 0.3)
        self.head = nn.Linear(2, 5)

    def forward(self, x):
        h = torch.cat([torch.relu(self.up(torch.relu(self.down(x)))), x], dim=1)  # (N, 7, 8, 8)
        return self.head(torch.tanh(F.conv_transpose2d(h, self.w, stride=1, dilation=2)).mean((2, 3)))


class Matmuls(nn.Module):
    """Linear layers as matmuls: ``x @ W.T + b``, HF Conv1D's addmm, ``x.matmul(W)``, ``b + matmul(x, W.t())``."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 64) * 0.1)  # (out, in)
        self.b1 = nn.Parameter(torch.zeros(8))
        self.w2 = nn.Parameter(torch.randn(8, 6) * 0.3)  # (in, out)
        self.b2 = nn.Parameter(torch.randn(6) * 0.1)
        self.w3 = nn.Parameter(torch.randn(6, 6) * 0.3)  # (in, out)
        self.w4 = nn.Parameter(torch.randn(5, 6) * 0.3)  # (out, in)
        self.b4 = nn.Parameter(torch.zeros(5))

    def forward(self, x):
        h = torch.tanh(x.flatten(2) @ self.w1.T + self.b1)  # (N, 3, 8): 3 positions
        h = torch.tanh(torch.addmm(self.b2, h.reshape(-1, 8), self.w2).view(h.shape[0], h.shape[1], 6))
        h = torch.tanh(h.matmul(self.w3))
        return (self.b4 + torch.matmul(h, self.w4.t())).mean(1)


class MatmulShared(nn.Module):
    """An ``nn.Linear`` weight also used as ``x @ W.T``, and a matmul weight also summed.

    The first is one layer with a bias-free second use; the second is uncovered.
    """

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 8)
        self.w = nn.Parameter(torch.randn(8, 5) * 0.3)
        self.b = nn.Parameter(torch.zeros(5))
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = x.flatten(2)
        h = torch.tanh(self.fc(h)) + torch.tanh(0.5 * h @ self.fc.weight.T)
        return (h @ self.w + self.b + 0.1 * self.w.sum()).mean(1) + self.head(h).mean(1)


CASES = {
    "mlp": lambda: nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.Tanh(), nn.Linear(6, 5)),
    "conv": lambda: nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False),
                                  nn.Flatten(), nn.Linear(4, 5)),
    "functional": Functional,
    "shared_grouped": Shared,
    "other_uses": OtherUses,
    "depthwise3d": Depthwise3d,
    "transposed": Transposed,
    "matmuls": Matmuls,
    "matmul_shared": MatmulShared,
}


def _layers(info) -> list[tuple]:
    return sorted((layer.name, layer.kind, layer.a_dim, layer.g_dim, layer.groups, layer.uses, layer.bias is not None)
                  for layer in info.layers)


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name]().double()


@pytest.mark.parametrize("name", list(CASES))
def test_fx_and_dynamo_register_the_same_layers_and_factors(name):
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.arange(6) % 5
    eager_model, compiled_model = _build(name), _build(name)
    tm = kc.transform(eager_model)
    cm = torch.compile(compiled_model, backend="kfc", options={"inner": "aot_eager"})
    info = registry_for(cm)
    cm(x)  # layers join the live registry when dynamo compiles
    assert _layers(info) == _layers(tm.kfc) and _layers(tm.kfc)
    assert sorted(u.name for u in info.uncovered) == sorted(u.name for u in tm.kfc.uncovered)
    assert abs(info.coverage - tm.kfc.coverage) < 1e-12

    opts = dict(lr=0.0, fisher="empirical", stats_fraction=1.0, clip=None, fallback="sgd")
    opts_e, opts_c = kc.KFC(eager_model, **opts), kc.KFC(cm, **opts)
    for model, opt in ((eager_model, opts_e), (cm, opts_c)):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    for layer in tm.kfc.layers:
        fe, fc = opts_e.factors(layer.name), opts_c.factors(layer.name)
        assert fe is not None and fc is not None, layer.name
        torch.testing.assert_close(fc.A, fe.A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(fc.G, fe.G, rtol=1e-12, atol=1e-14)


def test_reasons_name_the_other_use_on_both_paths():
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    tm = kc.transform(_build("other_uses"))
    cm = torch.compile(_build("other_uses"), backend="kfc", options={"inner": "aot_eager"})
    info = registry_for(cm)
    cm(x)
    for reasons in ({u.name: u.reason for u in tm.kfc.uncovered}, {u.name: u.reason for u in info.uncovered}):
        assert reasons["proj.weight"].startswith("weight also used by") and "matmul" in reasons["proj.weight"]
        assert "proj.bias" in reasons
