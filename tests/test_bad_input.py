"""Bad input gives clear errors (or, for a model with nothing to precondition, an empty registry and a warning)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kfc_compile as kc


def small():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


X, Y = torch.randn(2, 3), torch.tensor([0, 1])


@pytest.mark.parametrize("obj", [lambda x: x, torch.randn(3), "resnet18", None, nn.Linear])
def test_non_module(obj):
    with pytest.raises(kc.InvalidModelError, match="nn.Module"):
        kc.transform(obj)
    assert issubclass(kc.InvalidModelError, TypeError) and issubclass(kc.InvalidModelError, ValueError)
    with pytest.raises(ValueError):
        kc.curvature(obj, nn.CrossEntropyLoss(), X, Y)


@pytest.mark.parametrize("model", [nn.Sequential(nn.ReLU(), nn.Tanh()),
                                   nn.Sequential(nn.BatchNorm1d(3), nn.LayerNorm(3))])
def test_no_conv_or_linear(model):
    with pytest.warns(UserWarning, match="no conv/linear"):
        tm = kc.transform(model)
    assert tm.kfc.layers == [] and tm.kfc.coverage == 0.0
    assert {u.name for u in tm.kfc.uncovered} == {n for n, _ in model.named_parameters()}
    torch.testing.assert_close(tm(X.float()), model(X.float()))
    assert "(none)" in kc.report(tm)
    with pytest.warns(UserWarning):
        assert kc.curvature(model, nn.MSELoss(), X, torch.randn(2, 3), fisher="empirical") == {}


def test_unknown_approx():
    with pytest.raises(ValueError, match="approx"):
        kc.transform(small(), approx="diagonal")
    with pytest.raises(ValueError, match="approx"):
        kc.curvature(small(), nn.CrossEntropyLoss(), X, Y, approx="Expand")
    tm = kc.transform(small(), approx="reduce")
    with pytest.raises(ValueError, match="approx"):  # a transformed model keeps its flavour
        kc.curvature(tm, nn.CrossEntropyLoss(), X, Y, approx="expand")


@pytest.mark.parametrize("fisher", ["true", "MC", "type2", "", None])
def test_unknown_fisher(fisher):
    with pytest.raises(ValueError, match="fisher"):
        kc.curvature(small(), nn.CrossEntropyLoss(), X, Y, fisher=fisher)


@pytest.mark.parametrize("loss", [
    "hinge", nn.L1Loss(), nn.NLLLoss(), nn.HuberLoss(), lambda f, y: f.sum(),
    nn.CrossEntropyLoss(reduction="none"),
    nn.CrossEntropyLoss(weight=torch.ones(2)), nn.MSELoss(reduction="none"),
    nn.BCEWithLogitsLoss(pos_weight=torch.ones(2)),
])
def test_unsupported_loss(loss):
    with pytest.raises(ValueError):
        kc.curvature(small(), loss, X, Y, fisher="type-2")


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="mc_samples"):
        kc.curvature(small(), nn.CrossEntropyLoss(), X, Y, fisher="mc", mc_samples=0)
    with pytest.raises(ValueError, match="inputs"):
        kc.curvature(small(), nn.CrossEntropyLoss(), [], Y)
    with pytest.raises(ValueError, match="targets"):
        kc.curvature(small(), nn.CrossEntropyLoss(), X, None, fisher="empirical")
    tm = kc.transform(small())
    with pytest.raises(ValueError, match="already transformed"):
        kc.transform(tm)
    with pytest.raises(ValueError, match="transform"):
        kc.report(small())
