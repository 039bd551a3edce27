"""``optim/rules.py``: the update rules as list-of-tensor functions, bit for bit against the former formulas.

Also the Adam fallback against ``torch.optim.Adam``, and ``opt.layer_state`` / ``opt.curvature_nbytes``.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.precondition import regularised_grad
from kfc_compile.optim import rules

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def tensors(seed: int, shapes=((3, 4), (5,), (2, 2, 3)), dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, dtype=dtype, generator=g) for s in shapes]


def test_regularised_grad():
    p, g = tensors(0, ((4, 3),))[0], tensors(1, ((4, 3),))[0]
    assert regularised_grad(p, g, 0.0) is g
    assert torch.equal(regularised_grad(p, g, 0.01), g + 0.01 * p)


def test_sums_accumulate_in_fp64_term_by_term():
    a, b = tensors(0, dtype=torch.float32), tensors(1, dtype=torch.float32)
    b[1] = None
    assert rules.sum_squares(a) == sum(float(t.double().pow(2).sum()) for t in a)
    terms = [float((a[i].double() * b[i].double()).sum()) for i in (0, 2)]
    assert rules.inner(a, b) == terms[0] + terms[1]
    groups = [(a, 0.1), (tensors(2), 0.0), (tensors(3), 0.3)]
    ref = sum(0.5 * wd * float(p.double().pow(2).sum()) for ps, wd in groups if wd for p in ps)
    assert rules.l2_term(groups) == ref


def test_iterate_averaging():
    avg, params = tensors(0), tensors(1)
    ref = [a.clone() for a in avg]
    rules.average_iterates_(avg, params, 4.0)
    xi = math.exp(-1.0 / 4.0)
    for a, r, p in zip(avg, ref, params, strict=True):
        assert torch.equal(a, r.mul_(xi).add_(p, alpha=1.0 - xi))


def test_factored_nu_and_clip_scale():
    u, g = tensors(0), tensors(1)
    nu = 0.0
    for x, y in zip(u, g, strict=True):
        nu += 0.3 ** 2 * float((x.double() * y.double()).sum())
    assert rules.factored_nu(u, g, 0.3) == nu
    assert rules.clip_scale(0.2, 0.3) is None and rules.clip_scale(0.3, 0.3) is None
    assert rules.clip_scale(1.2, 0.3) == math.sqrt(0.3 / 1.2)


@pytest.mark.parametrize("scale", [None, 0.25])
def test_momentum_step_is_the_per_parameter_update(scale):
    """P ← μp + s·v; θ ← θ + p, a missing buffer starting at s·v; the update is cast to the parameter dtype."""
    params = tensors(0, dtype=torch.float32)
    buffers = [None, *tensors(1, dtype=torch.float32)[1:]]
    updates = tensors(2)  # fp64 updates of fp32 parameters
    ref_p, ref_b = [p.clone() for p in params], [None if b is None else b.clone() for b in buffers]
    out = rules.momentum_step_(params, buffers, updates, 0.9, scale)
    for i, (p, v) in enumerate(zip(ref_p, updates, strict=True)):
        v = v.to(p.dtype)
        if ref_b[i] is None:
            ref_b[i] = v.mul(scale) if scale is not None else v.clone()
        else:
            ref_b[i].mul_(0.9).add_(v, alpha=1.0 if scale is None else scale)
        p.add_(ref_b[i])
    assert all(torch.equal(a, b) for a, b in zip(params, ref_p, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(out, ref_b, strict=True))
    assert out[1] is buffers[1]  # existing buffers are updated in place


def test_quadratic_model_rescaling_and_adaptive_step():
    params = tensors(0)
    delta, grads = tensors(1), tensors(2)
    prev = [None, *tensors(3)[1:]]  # no previous update for the first parameter
    gram = torch.tensor([[2.0, 0.3], [0.3, 1.5]], dtype=torch.float64)
    C, d = rules.quadratic_model(gram, [delta, prev], grads, 0.05)

    def dot(a, b):
        return sum(float((x * y).sum()) for x, y in zip(a, b, strict=True) if x is not None and y is not None)
    tik = torch.tensor([[dot(delta, delta), dot(delta, prev)], [dot(prev, delta), dot(prev, prev)]],
                       dtype=torch.float64)
    assert torch.equal(C, gram + 0.05 * tik)
    assert torch.equal(d, torch.tensor([dot(grads, delta), dot(grads, prev)], dtype=torch.float64))

    alpha, mu, change = rules.rescaling(C, d, 0.5)
    assert (alpha, mu) == rules.solve_alpha_mu(C, d)
    coef = torch.tensor([alpha, mu], dtype=torch.float64) * 0.5
    assert change == float(coef @ d + 0.5 * coef @ C @ coef)
    one = rules.rescaling(C[:1, :1], d[:1], 0.5)
    assert one[1] == 0.0 and one[0] == rules.solve_alpha_mu(C[:1, :1], d[:1])[0]

    before = [p.clone() for p in params]
    steps = rules.adaptive_step_(params, delta, prev, alpha, mu, 0.5)
    for p0, p, s, t, q in zip(before, params, steps, delta, prev, strict=True):
        ref = t.mul(0.5 * alpha) if q is None else t.mul(0.5 * alpha).add(q, alpha=0.5 * mu)
        assert torch.equal(s, ref) and torch.equal(p, p0 + ref)


def test_levenberg_marquardt_rule():
    assert rules.reduction_ratio(2.0, 1.0, -2.0) == 0.5
    assert rules.reduction_ratio(2.0, 1.0, 0.0) == float("-inf")
    w = 0.8
    assert rules.levenberg_marquardt(1.0, 0.9, w, 1e-8) == 1.0 * w
    assert rules.levenberg_marquardt(1.0, 0.1, w, 1e-8) == 1.0 / w
    assert rules.levenberg_marquardt(1.0, 0.5, w, 1e-8) == 1.0
    assert rules.levenberg_marquardt(1e-8, 0.9, w, 1e-8) == 1e-8  # floored
    assert rules.levenberg_marquardt(0.0, 0.9, w, 1e-8) == 0.0  # no damping stays none


def _old_adam(params, grads, states, lr, betas, eps):
    """The optimizer's former hand-written Adam."""
    beta1, beta2 = betas
    for p, g, state in zip(params, grads, states, strict=True):
        if "exp_avg" not in state:
            state["adam_step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["adam_step"] += 1
        t = state["adam_step"]
        m, s = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(g, 1 - beta1)
        s.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = (s.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
        p.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adam_step_is_bit_identical_to_torch_adam_and_the_former_loop(dtype):
    params = tensors(0, dtype=dtype)
    ours, old = [p.clone() for p in params], [p.clone() for p in params]
    ref = [p.clone().requires_grad_(True) for p in params]
    torch_adam = torch.optim.Adam(ref, lr=0.01, betas=(0.8, 0.99), eps=1e-6)
    states, old_states = [{} for _ in params], [{} for _ in params]
    for k in range(5):
        grads = tensors(10 + k, dtype=dtype)
        rules.adam_step_(ours, grads, states, 0.01, (0.8, 0.99), 1e-6)
        _old_adam(old, grads, old_states, 0.01, (0.8, 0.99), 1e-6)
        for r, g in zip(ref, grads, strict=True):
            r.grad = g.clone()
        torch_adam.step()
        for a, b, c in zip(ours, old, ref, strict=True):
            assert torch.equal(a, b) and torch.equal(a, c.detach())
    assert all(float(s["step"]) == 5 for s in states)


def test_kfc_adam_fallback_is_bit_identical_to_torch_adam():
    """KFC's layers frozen in place (lr 0): the BatchNorm fallback follows torch.optim.Adam exactly."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)).double()
    shadow = copy.deepcopy(model)
    opt = kc.KFC(model, lr=0.0, fallback="adam", fallback_lr=0.01, stats_fraction=1.0)
    ref = torch.optim.Adam(shadow[1].parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(8, 2, 6, 6, dtype=torch.float64, generator=g), torch.randint(0, 3, (8,), generator=g)
        for m, o in ((model, opt), (shadow, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        for p, q in zip(model.parameters(), shadow.parameters(), strict=True):
            assert torch.equal(p, q)


def test_layer_state_accessors_and_curvature_bytes():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = kc.KFC(model, lr=0.1, damping_method="eigen", stats_fraction=1.0)
    states = opt.layer_states()
    assert [s.layer for s in states] == opt.layers and opt.layer_state("2") is states[1]
    assert all(s.running is None and s.inverse is None for s in states) and opt.curvature_nbytes() == 0
    with pytest.raises(KeyError, match="no KFC layer named 'x'"):
        opt.layer_state("x")
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    expect = 0
    for s in states:
        assert s.running.updates == 1 and not s.frozen and not s.stale and s.layout.shapes() == (
            (1, s.layer.a_dim, s.layer.a_dim), (1, s.layer.g_dim, s.layer.g_dim))
        ts = [s.running.A, s.running.G, *s.inverse.tensors()]
        expect += sum(t.numel() * t.element_size() for t in ts)
        assert s.nbytes() == sum(t.numel() * t.element_size() for t in ts)
    assert opt.curvature_nbytes() == expect > 0
