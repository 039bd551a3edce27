"""``kc.transform`` computes the same function: outputs identical, parameter gradients equal to float rounding."""
from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import kfc_compile as kc
from kfc_compile.registry import KFCLayer
from kfc_compile.runtime import record


def run(model, x, seed=0):
    """Output and parameter gradients of ``sum(out * w)`` for a fixed random w (grads are cleared afterwards)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(x)
    w = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed + 1))
    (out * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.detach(), grads


def assert_equivalent(model, tm, x, dtype):
    out, grads = run(model, x)
    out_tm, grads_tm = run(tm, x)
    assert torch.equal(out_tm, out), (out_tm - out).abs().max()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert grads_tm.keys() == grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_tm[name], g, rtol=tol, atol=tol * max(1.0, g.abs().max().item()), msg=name)


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_unchanged(model, snap):
    modules, state = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())
    assert not hasattr(model, "kfc")


TORCHVISION = {
    "resnet18": (2, 3, 32, 32),
    "mobilenet_v3_small": (2, 3, 32, 32),
    "densenet121": (1, 3, 32, 32),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", list(TORCHVISION))
def test_torchvision_equivalence(name, dtype):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).to(dtype).eval()
    snap = snapshot(model)
    tm = kc.transform(model)
    assert_unchanged(model, snap)
    assert tm.state_dict().keys() == model.state_dict().keys()
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [layer.name for layer in tm.kfc.layers] == convs
    x = torch.randn(*TORCHVISION[name], dtype=dtype)
    assert_equivalent(model, tm, x, dtype)


def test_resnet18_train_mode_and_armed_taps():
    """Train mode (batch-norm batch statistics) and armed taps change neither outputs nor gradients."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).double().train()
    tm = kc.transform(model)
    assert tm.training and all(m.training for m in tm.modules())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert_equivalent(model, tm, x, torch.float64)
    with tm.kfc.state.armed_forward():
        out_tm, grads_tm = run(tm, x)
    out, grads = run(model, x)
    assert torch.equal(out_tm, out)
    for k, g in grads.items():
        torch.testing.assert_close(grads_tm[k], g, rtol=1e-12, atol=1e-12)


def test_r3d_18_conv3d_subclasses_are_found():
    """Torchvision's Conv3DSimple / Conv3DNoTemporal subclass nn.Conv3d: all 20 convs + fc must be layers."""
    from torchvision.models.video import r3d_18

    torch.manual_seed(0)
    model = r3d_18(weights=None, num_classes=5).double().eval()
    tm = kc.transform(model)
    kinds = [layer.kind for layer in tm.kfc.layers]
    assert kinds.count("conv3d") == 20 and kinds.count("linear") == 1 and len(kinds) == 21
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv3d, nn.Linear))]
    assert sorted(layer.name for layer in tm.kfc.layers) == sorted(expected)
    assert not tm.kfc.black_boxes
    assert_equivalent(model, tm, torch.randn(1, 3, 4, 16, 16, dtype=torch.float64), torch.float64)


class Functional(nn.Module):
    """Convs and linears as functional calls on parameters of the model (module-less and tied weights)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Module()
        self.c1.weight = nn.Parameter(torch.randn(4, 3, 3, 3) * 0.2)
        self.c1.bias = nn.Parameter(torch.randn(4) * 0.1)
        self.depthwise = nn.Parameter(torch.randn(4, 1, 3, 3) * 0.2)
        self.seq = nn.Parameter(torch.randn(2, 4, 3) * 0.2)
        self.head = nn.Linear(2, 5)

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.c1.weight, self.c1.bias, padding=1))
        h = torch.conv2d(h, self.depthwise, None, 1, "same", 1, 4)
        h = F.conv1d(h.flatten(2), self.seq, stride=2)  # (N, 2, L)
        return F.linear(h.transpose(1, 2), self.head.weight, self.head.bias).mean(1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_functional_calls(dtype):
    torch.manual_seed(0)
    model = Functional().to(dtype)
    tm = kc.transform(model)
    got = {layer.name: (layer.kind, layer.groups, layer.a_dim, layer.g_dim, layer.uses, layer.bias is not None)
           for layer in tm.kfc.layers}
    assert got == {
        "c1": ("conv2d", 1, 28, 4, 1, True),
        "depthwise": ("conv2d", 4, 9, 1, 1, False),
        "seq": ("conv1d", 1, 12, 2, 1, False),
        "head": ("linear", 1, 3, 5, 1, True),
    }
    assert tm.kfc.coverage == 1.0 and not tm.kfc.uncovered
    assert tm.state_dict().keys() == model.state_dict().keys()
    assert_equivalent(model, tm, torch.randn(2, 3, 6, 6, dtype=dtype), dtype)
    f = kc.curvature(tm, nn.MSELoss(), torch.randn(2, 3, 6, 6, dtype=dtype), torch.randn(2, 5, dtype=dtype),
                     fisher="empirical")
    assert f["depthwise"].A.shape == (4, 9, 9) and f["depthwise"].G.shape == (4, 1, 1)
    assert f["c1"].A.shape == (28, 28) and f["head"].G.shape == (5, 5)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.block(torch.tanh(self.block(x)))))


def test_shared_module_counts_uses():
    torch.manual_seed(0)
    model = Shared().double()
    tm = kc.transform(model)
    layers = {layer.name: layer for layer in tm.kfc.layers}
    assert layers["block"].uses == 2 and layers["out"].uses == 1 and len(layers["block"].sites) == 2
    assert layers["block"].weight is model.block.weight and layers["block"].bias is model.block.bias
    assert_equivalent(model, tm, torch.randn(3, 4, dtype=torch.float64), torch.float64)
    f = kc.curvature(tm, nn.MSELoss(), torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64),
                     fisher="type-2")
    assert f["block"].A[-1, -1].item() == pytest.approx(2.0)  # two positions per example


class Gate(nn.Module):
    """Data-dependent control flow: untraceable, becomes a black box; its conv is still instrumented."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        h = self.conv(x)
        if h.sum() > 0:
            return torch.relu(h)
        return torch.tanh(h)


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.gate = Gate()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.gate(self.stem(x)).mean((2, 3)))


def test_data_dependent_if_becomes_black_box():
    torch.manual_seed(0)
    model = WithGate().double()
    tm = kc.transform(model, frontend="fx")  # the fx pass's black boxes (auto would capture it with dynamo)
    assert [b.name for b in tm.kfc.black_boxes] == ["gate"]
    assert "gate" in kc.report(tm)
    assert sorted(layer.name for layer in tm.kfc.layers) == ["gate.conv", "head", "stem"]
    assert tm.kfc.coverage == 1.0
    for sign in (1.0, -1.0):  # both branches
        x = sign * torch.rand(3, 3, 4, 4, dtype=torch.float64) + 0.5 * sign
        assert_equivalent(model, tm, x, torch.float64)
        y = torch.randn(3, 2, dtype=torch.float64)
        f = kc.curvature(tm, nn.MSELoss(reduction="sum"), x, y, fisher="empirical")
        # the inner conv's factors, from its input and per-example output gradients in the original model
        seen = {}

        def hook(mod, inputs, out, seen=seen):
            out.retain_grad()
            seen.update(x=inputs[0].detach(), out=out)

        handle = model.gate.conv.register_forward_hook(hook)
        nn.MSELoss(reduction="sum")(model(x), y).backward()
        handle.remove()
        model.zero_grad()
        xi = seen["x"].permute(0, 2, 3, 1).reshape(-1, 3)
        xi = torch.cat([xi, torch.ones(len(xi), 1, dtype=xi.dtype)], 1)
        g = seen["out"].grad.permute(0, 2, 3, 1).reshape(-1, 4)
        torch.testing.assert_close(f["gate.conv"].A, xi.T @ xi / 3, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(f["gate.conv"].G, g.T @ g / len(g), rtol=1e-10, atol=1e-12)


def test_layer_fields():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.ReLU(), nn.Conv2d(6, 6, (2, 1), groups=6, bias=False),
                          nn.Flatten(), nn.Linear(12, 5, bias=False), nn.Linear(5, 2))
    tm = kc.transform(model)
    fields = [(layer.name, layer.kind, layer.a_dim, layer.g_dim, layer.groups, layer.uses) for layer in tm.kfc.layers]
    assert fields == [("0", "conv2d", 2 * 9 + 1, 3, 2, 1), ("2", "conv2d", 2, 1, 6, 1),
                      ("4", "linear", 12, 5, 1, 1), ("5", "linear", 6, 2, 1, 1)]
    for layer, i in zip(tm.kfc.layers, (0, 2, 4, 5), strict=True):
        assert isinstance(layer, KFCLayer)
        assert layer.weight is model[i].weight
        assert layer.bias is model[i].bias
        assert all(p in set(tm.parameters()) for p in (layer.weight, layer.bias) if p is not None)
    assert tm.kfc.layer("5").numel == 12
    assert tm.kfc.coverage == 1.0
    f = kc.curvature(tm, "mse", torch.randn(2, 4, 5, 3), torch.randn(2, 2), fisher="type-2")
    assert f["2"].A.shape == (6, 2, 2)


def test_inplace_relu_after_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 3), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(8, 3)).double()
    ref = copy.deepcopy(model)
    for m in ref:
        if isinstance(m, nn.ReLU):
            m.inplace = False
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 2])
    tm = kc.transform(model)
    assert_equivalent(model, tm, x, torch.float64)
    with tm.kfc.state.armed_forward():
        assert_equivalent(model, tm, x, torch.float64)
    a = kc.curvature(tm, nn.CrossEntropyLoss(), x, y, fisher="type-2")
    b = kc.curvature(ref, nn.CrossEntropyLoss(), x, y, fisher="type-2")
    for k in b:
        torch.testing.assert_close(a[k].A, b[k].A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a[k].G, b[k].G, rtol=1e-12, atol=1e-12)


def test_channels_last():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    x = torch.randn(2, 3, 7, 8, dtype=torch.float64)
    y = torch.tensor([1, 2])
    ref = kc.curvature(model, nn.CrossEntropyLoss(), x, y, fisher="type-2")
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    xc = x.to(memory_format=torch.channels_last)
    tm = kc.transform(cl)
    assert_equivalent(cl, tm, xc, torch.float64)
    got = kc.curvature(tm, nn.CrossEntropyLoss(), xc, y, fisher="type-2")
    for k in ref:
        torch.testing.assert_close(got[k].A, ref[k].A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[k].G, ref[k].G, rtol=1e-12, atol=1e-12)


def test_train_eval_flags_preserved():
    torch.manual_seed(0)
    model = WithGate()
    model.train()
    model.stem.eval()
    model.gate.conv.eval()
    tm = kc.transform(model)
    flags = {n: m.training for n, m in model.named_modules()}
    got = {n: m.training for n, m in tm.named_modules() if n in flags}
    assert got == flags and set(got) == set(flags)
    model.eval()
    tm2 = kc.transform(model)
    assert not tm2.training and not any(m.training for m in tm2.modules())
    assert model.stem.training is False and model.training is False


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2)
        self.b = nn.Linear(4, 2)

    def forward(self, x, z):
        return self.a(x) * torch.tanh(self.b(z))


def test_tuple_of_inputs():
    torch.manual_seed(0)
    model = TwoInputs().double()
    x, z = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    tm = kc.transform(model)
    torch.testing.assert_close(tm(x, z), model(x, z), rtol=0, atol=0)
    f = kc.curvature(tm, nn.MSELoss(), (x, z), torch.randn(3, 2, dtype=torch.float64), fisher="type-2")
    xb = torch.cat([x, torch.ones(3, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(f["a"].A, xb.T @ xb / 3)
    assert f["b"].A.shape == (5, 5)


def test_record_keys_are_freed_with_the_model():
    """Every site gets a kfc::record key; a transformed model that is gone gives its keys back."""
    gc.collect()
    before = record.live_keys()
    tm = kc.transform(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)))
    assert record.live_keys() == before + len(tm.kfc.state.sites) == before + 2
    del tm
    gc.collect()
    assert record.live_keys() == before
