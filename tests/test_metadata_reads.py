"""Reading a weight's metadata (dtype, device, shape) is not a use of its values: the layer stays under KFC.

timm's XCiT / EdgeNeXt positional encodings read ``self.token_projection.weight.device`` and ``.dtype`` to build
their inputs; their 1x1 conv must be covered by the fx pass, as under torch.compile (where dynamo specialises them).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kfc_compile as kc
from kfc_compile.frontend.dynamo.backend import registry_for


class ReadsMetadata(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(4, 6, 1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        w = self.proj.weight
        grid = torch.zeros_like(x, device=w.device, dtype=w.dtype) + (w.shape[0] + w.size(1) + w.dim())
        return self.fc(self.proj(x + grid).mean((2, 3)))


class UsesValues(ReadsMetadata):
    def forward(self, x):
        return super().forward(x) + self.proj.weight.sum()


def test_metadata_reads_leave_the_layer_covered():
    model = ReadsMetadata()
    tm = kc.transform(model, frontend="fx")
    assert sorted(la.name for la in tm.kfc.layers) == ["fc", "proj"] and tm.kfc.uncovered == []
    assert tm.kfc.black_boxes == [] and "getattr" in tm.code  # traced, metadata reads in the graph
    x = torch.randn(2, 4, 2, 2)
    torch.testing.assert_close(tm(x), model(x), rtol=0, atol=0)
    torch._dynamo.reset()
    cm = torch.compile(ReadsMetadata(), backend="kfc", options={"inner": "eager"})
    info = registry_for(cm)
    cm(x)
    assert sorted(la.name for la in info.layers) == ["fc", "proj"]
    torch._dynamo.reset()


@pytest.mark.parametrize("frontend", ["fx"])
def test_a_use_of_the_values_still_uncovers_it(frontend):
    tm = kc.transform(UsesValues(), frontend=frontend)
    assert tm.kfc.black_boxes == []
    assert [la.name for la in tm.kfc.layers] == ["fc"]
    assert {u.name for u in tm.kfc.uncovered} == {"proj.weight", "proj.bias"}
