"""The exact Fisher products' kept module walk (issue 17, per-call overhead) gives what a fresh walk gives.

``FisherProducts`` keeps the model's named parameters / buffers and tied names between calls (``ModelMembers``)
instead of walking the module tree every call: the JVPs must be bitwise those of the old per-call walk with
``functional_call(tie_weights=True)``, tied weights must get their tangent under every name (checked against a
float64 central difference), and replacing or adding a parameter / buffer must be seen on the next call. Also the
taps' ``no_autocast``: no context outside autocast, autocast off inside it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call

from kfc_compile.optim.fvp import FisherProducts
from kfc_compile.runtime.state import no_autocast


class Tied(nn.Module):
    """Embedding-like input layer tied to the output layer (``out.weight is inp.weight.T``-shaped: a square tie)."""

    def __init__(self, d: int = 6):
        super().__init__()
        self.inp = nn.Linear(d, d)
        self.norm = nn.BatchNorm1d(d)
        self.out = nn.Linear(d, d)
        self.out.weight = self.inp.weight  # the same Parameter under two names

    def forward(self, x):
        return self.out(torch.tanh(self.norm(self.inp(x))))


def _old_jvp(model: nn.Module, x: torch.Tensor, direction: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The previous code's pass: fresh dicts from a walk, ``functional_call`` untying the tied names itself."""
    names = {}
    for n, p in model.named_parameters():
        names.setdefault(id(p), n)
    params = {n: p.detach() for n, p in model.named_parameters()}
    bufs = {n: b.detach().clone() for n, b in model.named_buffers()}
    d = {names[id(p)]: v for p, v in direction.items()}
    with torch.no_grad(), fwAD.dual_level():
        duals = {n: fwAD.make_dual(prim, d[n] if n in d else torch.zeros_like(prim)) for n, prim in params.items()}
        out = functional_call(model, ({**params, **duals}, bufs), (x,))
        primal, tangent = fwAD.unpack_dual(out)
    return primal.clone(), tangent.clone()


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = Tied().double().train()
    x = torch.randn(8, 6, dtype=torch.float64)
    direction = {p: torch.randn_like(p) for p in model.parameters()}
    products = FisherProducts(model, None)
    products.batched = False
    return model, x, direction, products


def test_kept_walk_is_bitwise_the_fresh_walk_with_tied_weights():
    model, x, direction, products = _setup()
    running = model.norm.running_mean.clone()
    for _ in range(2):  # the second call uses the kept walk
        f, (jv,) = products.outputs_and_jvps((x,), [direction])
        f0, jv0 = _old_jvp(model, x, direction)
        assert torch.equal(f, f0) and torch.equal(jv, jv0)
    assert torch.equal(model.norm.running_mean, running)  # the buffers stayed private to the passes

    # independent: the tangent reaches both uses of the tied weight (a float64 central difference)
    eps = 1e-6

    def at(t):
        params = {n: p.detach() + t * direction[p] for n, p in model.named_parameters()}
        bufs = {n: b.clone() for n, b in model.named_buffers()}
        with torch.no_grad():
            return functional_call(model, (params, bufs), (x,))

    fd = (at(eps) - at(-eps)) / (2 * eps)
    torch.testing.assert_close(jv, fd, rtol=1e-6, atol=1e-8)
    untied = _old_jvp(model, x, {p: v for p, v in direction.items() if p is not model.inp.weight})[1]
    assert not torch.allclose(jv, untied)  # the tied weight's tangent matters here: the check above can fail


def test_no_walk_while_the_module_tree_is_unchanged(monkeypatch):
    model, x, direction, products = _setup()
    products.outputs_and_jvps((x,), [direction])
    walks = []
    original = nn.Module.named_parameters

    def counted(self, *a, **k):
        walks.append(self)
        return original(self, *a, **k)

    monkeypatch.setattr(nn.Module, "named_parameters", counted)
    with torch.no_grad():
        model.inp.weight.mul_(0.5)  # in-place value updates (optimizer steps, load_state_dict's copies) keep it
    f, (jv,) = products.outputs_and_jvps((x,), [direction])
    assert walks == []
    f0, jv0 = _old_jvp(model, x, direction)
    assert torch.equal(f, f0) and torch.equal(jv, jv0)


def test_replaced_and_added_members_are_seen():
    model, x, direction, products = _setup()
    products.outputs_and_jvps((x,), [direction])

    model.out.bias = nn.Parameter(torch.randn(6, dtype=torch.float64))  # a parameter replaced
    direction = {p: torch.randn_like(p) for p in model.parameters()}
    f, (jv,) = products.outputs_and_jvps((x,), [direction])
    f0, jv0 = _old_jvp(model, x, direction)
    assert torch.equal(f, f0) and torch.equal(jv, jv0)
    only_bias = products.outputs_and_jvps((x,), [{model.out.bias: direction[model.out.bias]}])[1][0]
    assert only_bias.abs().max() > 0  # the new Parameter is known by name

    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # every parameter and buffer replaced
    model.out.weight = model.inp.weight  # (assign breaks the tie: tie again)
    model.norm.register_buffer("extra", torch.zeros(1, dtype=torch.float64))  # a buffer added
    direction = {p: torch.randn_like(p) for p in model.parameters()}
    running = model.norm.running_var.clone()
    f, (jv,) = products.outputs_and_jvps((x,), [direction])
    f0, jv0 = _old_jvp(model, x, direction)
    assert torch.equal(f, f0) and torch.equal(jv, jv0)
    assert torch.equal(model.norm.running_var, running)  # the new buffers were copied, not updated


def test_no_autocast_only_inside_autocast():
    assert isinstance(no_autocast("cpu"), contextlib.nullcontext)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with no_autocast("cpu"):
            assert not torch.is_autocast_enabled("cpu")
            a = torch.randn(4, 4)
            assert (a @ a).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
