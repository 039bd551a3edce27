"""End to end: ``kc.curvature`` gives the same factors with KFC_KERNELS=triton (interpreter) and =torch."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kernel_refs as R

kc = pytest.importorskip("kfc_compile")
if not hasattr(kc, "curvature"):
    pytest.skip("kfc_compile.curvature is not available in this checkout", allow_module_level=True)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.ReLU(),
                         nn.Flatten(), nn.Linear(16, 5))


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_curvature_same_factors_triton_vs_torch(use, approx):
    model = _model()
    x, y = torch.randn(3, 3, 6, 6), torch.randint(0, 5, (3,))
    res = {}
    for mode in ("torch", "triton"):
        use(mode)
        res[mode] = kc.curvature(model, "cross_entropy", x, y, fisher="empirical", approx=approx)
    assert res["torch"].keys() == res["triton"].keys() and len(res["torch"]) == 3
    for name, a in res["torch"].items():
        b = res["triton"][name]
        assert a.A.shape == b.A.shape and a.G.shape == b.G.shape
        assert R.rel_err(b.A, a.A) < 1e-5, name
        assert R.rel_err(b.G, a.G) < 1e-5, name
        assert torch.equal(b.A, b.A.mT) and torch.equal(b.G, b.G.mT)
