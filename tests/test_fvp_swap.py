"""The exact Fisher products' own parameter swap and dual tensors (issue 17, item 3) are ``functional_call``'s.

``FisherProducts`` puts the pass's tensors into the module entries ``ModelMembers`` keeps, instead of calling
``functional_call``, and makes all dual tensors after the first with the op ``fwAD.make_dual`` calls. The JVPs must
be bitwise those of ``functional_call(tie_weights=True)`` with ``fwAD.make_dual`` (one pass per direction and the
batched pass; tied weights, BatchNorm buffers, a parametrization), and the model must hold its own tensors after a
pass, also after a forward that raises.
"""
from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from kfc_compile.optim.fvp import FisherProducts, make_duals


class Symmetric(nn.Module):
    def forward(self, X):
        return X.triu() + X.triu(1).mT


class Net(nn.Module):
    """Tied input/output weights, BatchNorm (train mode: in-place running statistics), a parametrized layer."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.norm = nn.BatchNorm1d(d)
        self.mid = nn.Linear(d, d)
        parametrize.register_parametrization(self.mid, "weight", Symmetric())
        self.out = nn.Linear(d, d)
        self.out.weight = self.inp.weight
        self.fail = False

    def forward(self, x):
        h = torch.tanh(self.norm(self.inp(x)))
        if self.fail:
            raise ValueError("boom")
        return self.out(torch.sin(self.mid(h)))


def _reference(model: nn.Module, x: torch.Tensor, directions: list[dict]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``functional_call`` (untying the tied names itself) with ``fwAD.make_dual``, one pass per direction."""
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    params = {n: p.detach() for n, p in model.named_parameters()}
    outs = []
    for direction in directions:
        d = {names[id(p)]: v for p, v in direction.items()}
        bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
        with torch.no_grad(), fwAD.dual_level():
            duals = {n: fwAD.make_dual(p, d[n] if n in d else torch.zeros_like(p)) for n, p in params.items()}
            primal, tangent = fwAD.unpack_dual(functional_call(model, ({**params, **duals}, bufs), (x,)))
            outs.append(tangent.clone())
            f = primal.clone()
    return f, outs


def _batched_reference(model: nn.Module, x: torch.Tensor, directions: list[dict]):
    """``vmap`` over ``jvp`` of ``functional_call``: what the batched pass computes, the old way."""
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    params = {n: p.detach() for n, p in model.named_parameters()}
    moving = {names[id(p)]: params[names[id(p)]] for d in directions for p in d}
    tangents = {n: torch.stack([next(v for p, v in d.items() if names[id(p)] == n) for d in directions])
                for n in moving}

    def forward(moved):
        bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
        return functional_call(model, ({**params, **moved}, bufs), (x,))

    with torch.no_grad():
        f, t = torch.func.vmap(lambda tt: torch.func.jvp(forward, (moving,), (tt,)), out_dims=(None, 0),
                               randomness="same")(tangents)
    return f, list(t.unbind(0))


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Net().double().train()
    x = torch.randn(8, 6, dtype=torch.float64)
    directions = [{p: torch.randn_like(p) for p in model.parameters()} for _ in range(2)]
    return model, x, directions


def _entries(model: nn.Module) -> list:
    return [(m, k, v) for m in model.modules() for d in (m._parameters, m._buffers) for k, v in d.items()]


@pytest.mark.parametrize("batched", [False, True])
def test_jvps_bitwise_functional_call(batched):
    model, x, directions = _setup()
    entries = _entries(model)
    running = model.norm.running_mean.clone()
    products = FisherProducts(model, None)
    products.batched = batched
    assert products.members.direct
    for _ in range(2):  # the second call on the kept walk
        f, jvps = products.outputs_and_jvps((x,), directions)
        f0, jvps0 = (_batched_reference if batched else _reference)(model, x, directions)
        assert torch.equal(f, f0)
        assert all(torch.equal(a, b) for a, b in zip(jvps, jvps0, strict=True))
    assert all(m._parameters.get(k, m._buffers.get(k)) is v for m, k, v in entries)  # its own tensors again
    assert model.out.weight is model.inp.weight
    assert torch.equal(model.norm.running_mean, running)  # the passes' buffers were copies
    # the checks can fail: the tie and the parametrization change the tangent
    for left_out in (model.inp.weight, model.mid.parametrizations.weight.original):
        without = {p: v for p, v in directions[0].items() if p is not left_out}
        assert not torch.equal(jvps[0], _reference(model, x, [without])[1][0])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_functional_call_path_kept_for_scripted_modules():
    model = nn.Sequential(nn.Linear(4, 4), torch.jit.script(nn.Linear(4, 3))).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    products = FisherProducts(model, None)
    assert not products.members.direct
    directions = [{p: torch.randn_like(p) for p in model.parameters()}]
    f, jvps = products.outputs_and_jvps((x,), directions)
    f0, jvps0 = _reference(model, x, directions)
    assert torch.equal(f, f0) and torch.equal(jvps[0], jvps0[0])


def test_a_failing_forward_leaves_the_model_its_tensors():
    model, x, directions = _setup()
    products = FisherProducts(model, None)
    products.batched = False
    entries = _entries(model)
    model.fail = True
    with pytest.raises(ValueError, match="boom"):
        products.outputs_and_jvps((x,), directions[:1])
    assert all(m._parameters.get(k, m._buffers.get(k)) is v for m, k, v in entries)
    model.fail = False
    f, jvps = products.outputs_and_jvps((x,), directions[:1])
    assert torch.equal(jvps[0], _reference(model, x, directions[:1])[1][0])


def test_make_duals_are_make_dual():
    torch.manual_seed(1)
    primals = {"a": torch.randn(3, 2), "b": torch.randn(4, dtype=torch.float64), "c": torch.randn(2)}
    tangents = {"a": torch.randn(3, 2, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    with fwAD.dual_level() as level:
        duals = make_duals(primals, tangents, level)
        for n, prim in primals.items():
            p, t = fwAD.unpack_dual(duals[n])
            assert p.dtype == t.dtype == prim.dtype and torch.equal(p, prim)
            assert torch.equal(t, tangents[n].to(prim.dtype) if n in tangents else torch.zeros_like(prim))
    with pytest.raises(ValueError, match="floating point"), fwAD.dual_level() as level:  # make_dual's own check
        make_duals({"i": torch.ones(2, dtype=torch.int64)}, {}, level)
