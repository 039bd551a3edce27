"""``kc.report``: every layer, every uncovered parameter with its reason, black boxes, and the covered share."""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.proj = nn.Linear(4, 4)  # also used by a matmul below: not under KFC
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        h = self.up(F.relu(self.bn(self.conv(x))))  # (N, 4, 2H, 2W)
        s = h.flatten(2).transpose(1, 2)  # (N, T, 4)
        s = s + self.attn(s, s, s, need_weights=False)[0]
        s = self.proj(s) + s @ self.proj.weight
        s = self.norm(self.frozen(s)) * self.scale
        return self.head(s.mean(1))


def test_report_contents():
    torch.manual_seed(0)
    model = Mixed()
    tm = kc.transform(model, frontend="fx")  # the fx pass's report, black boxes included
    text = kc.report(tm)
    info = tm.kfc
    # the self-attention's packed in-projection and its out-projection are tapped inside the attention call
    # the transposed conv is a layer too (the factors of its equivalent direct conv)
    assert sorted(layer.name for layer in info.layers) == ["attn.in_proj_weight", "attn.out_proj", "conv", "head", "up"]
    for layer in info.layers:
        assert re.search(rf"^{re.escape(layer.name)}\s+{layer.kind}\s+{layer.a_dim}\s+{layer.g_dim}\s+{layer.groups}\s+"
                         rf"{layer.uses}\b", text, re.M), layer.name
    reasons = {u.name: u.reason for u in info.uncovered}
    expected = {
        "bn.weight": "normalization", "bn.bias": "normalization",
        "proj.weight": "matmul", "proj.bias": "matmul",
        "norm.weight": "normalization", "norm.bias": "normalization",
        "scale": "mul",
    }
    assert set(reasons) == set(expected), set(reasons) ^ set(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
        line = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert reasons[name] in line
    assert "frozen.weight" not in reasons and "Frozen parameters" in text
    covered = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("conv", "up", "head", "attn"))
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert info.coverage == covered / total
    assert f"{covered:,} of {total:,}" in text and f"({100 * covered / total:.2f}%)" in text
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(tm.eval()(x), model.eval()(x))


def test_report_lists_black_boxes_and_uses():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            for _ in range(int(x.abs().sum() > 0) + 1):  # data-dependent loop count
                x = self.lin(x)
            return x

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Untraceable()
            self.shared = nn.Linear(3, 3)

        def forward(self, x):
            return self.shared(self.shared(self.body(x)))

    tm = kc.transform(Net(), frontend="fx")  # the fx pass keeps Untraceable as a black box
    text = kc.report(tm)
    assert "black boxes" in text and re.search(r"^\s+body: ", text, re.M)
    assert re.search(r"^shared\s+linear\s+4\s+3\s+1\s+2\b", text, re.M)
    assert re.search(r"^body\.lin\s+linear", text, re.M)
    assert "(100.00%)" in text
