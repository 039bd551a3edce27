"""Ops without forward-mode AD: the exact Fisher products fall back to the factored curvature, with one warning.

CPU ``nn.LSTM`` runs ``mkldnn_rnn_layer``, which has no forward-mode AD; a custom ``autograd.Function`` without
``jvp`` has none either. KFC-pre's exact clipping statistic and adaptive mode's Fisher products then use the
Kronecker-factored curvature of the KFC layers for that step (0 on the others), never crash, and warn once.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.optim.fvp import factored_gram, missing_forward_ad

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


class LSTMHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 5, batch_first=True)
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _NoJvp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return 2 * x

    @staticmethod
    def backward(ctx, g):  # a backward that works: the op only lacks forward mode
        return 2 * g


def no_jvp(x):
    """One opaque node in the traced graph (fx would otherwise trace through the Function's forward)."""
    return _NoJvp.apply(x)


torch.fx.wrap("no_jvp")


class FakeOpNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 6)
        self.b = nn.Linear(6, 4)

    def forward(self, x):
        return self.b(torch.tanh(no_jvp(self.a(x))))


def _train(model, opt, xs, ys, steps=5):
    losses = []
    for k in range(steps):
        x, y = xs[k], ys[k]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure)))
    return losses


@pytest.mark.parametrize("model_cls, op", [(LSTMHead, "the op mkldnn_rnn_layer"),
                                           (FakeOpNet, "the autograd.Function _NoJvp")])
@pytest.mark.parametrize("mode", ["pre", "adaptive"])
def test_no_forward_ad_falls_back_with_one_warning(model_cls, op, mode):
    torch.manual_seed(0)
    model = model_cls()
    # clip_curvature="exact": the exact ν's forward-mode products are what lacks the op (the default has none)
    opt = kc.KFC(model, lr=0.05 if mode == "pre" else 1.0, mode=mode, damping=1e-2, clip_curvature="exact")
    assert opt.layers
    g = torch.Generator().manual_seed(1)
    shape = (16, 7, 3) if model_cls is LSTMHead else (16, 3)
    xs = [torch.randn(*shape, generator=g) for _ in range(5)]
    ys = [torch.randint(0, 4, (16,), generator=g) for _ in range(5)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = _train(model, opt, xs, ys)
    gaps = [w for w in caught if "no forward-mode AD" in str(w.message)]
    assert len(gaps) == 1 and op in str(gaps[0].message), [str(w.message) for w in caught]
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    key = "nu" if mode == "pre" else "alpha"
    assert key in opt.last_step and torch.isfinite(torch.tensor(opt.last_step[key]))


def test_fallback_nu_is_the_factored_quadratic_form():
    """KFC-pre's ν on the fallback is Σ vᵀ kron(Γ, Ω) v over the KFC layers: checked with dense Kronecker products."""
    torch.manual_seed(0)
    model = FakeOpNet().double()
    # clip_curvature="exact": the fallback of the exact ν without forward-mode AD is the point
    opt = kc.KFC(model, lr=0.1, momentum=0.0, clip=1e6, stats_fraction=1.0, clip_curvature="exact")
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 4, (8,))
    layers = {"a": model.a, "b": model.b}

    def wb():
        return {n: torch.cat([m.weight.detach(), m.bias.detach()[:, None]], 1) for n, m in layers.items()}

    before = wb()
    with pytest.warns(RuntimeWarning, match="_NoJvp has no forward-mode AD"):
        F.cross_entropy(model(x), y).backward()
        opt.step()
    after = wb()
    nu = 0.0
    for name in layers:
        v = (after[name] - before[name]).reshape(-1)
        f = opt.factors(name)
        nu += float(v @ torch.kron(f.G, f.A) @ v)
    assert nu > 0
    assert opt.last_step["nu"] == pytest.approx(nu, rel=1e-10)
    assert opt.last_step["clip_scale"] == 1.0


def test_factored_gram_of_directions():
    """factored_gram against explicit Kronecker quadratic forms, for a layer with blocks and a missing bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = kc.KFC(model, lr=0.1, stats_fraction=1.0, max_factor_dim=3)  # Ω of layer 0 (6 wide): 2 blocks of 3
    F.cross_entropy(model(torch.randn(8, 5, dtype=torch.float64)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    states = opt.layer_states()
    assert states[0].layout.blocked
    dirs = [{p: torch.randn_like(p) for p in model.parameters()} for _ in range(2)]
    del dirs[1][model[2].bias]
    C = factored_gram(states, dirs, scale=3.0)
    want = torch.zeros(2, 2, dtype=torch.float64)
    for layer in (model[0], model[2]):
        f = opt.factors("0" if layer is model[0] else "2")
        vecs = [torch.cat([d[layer.weight], d.get(layer.bias, torch.zeros_like(layer.bias))[:, None]], 1).reshape(-1)
                for d in dirs]
        K = torch.kron(f.G, f.A)
        want += torch.stack([torch.stack([u @ K @ w for w in vecs]) for u in vecs])
    torch.testing.assert_close(C, 3.0 * want, rtol=1e-12, atol=1e-12)


def test_other_errors_are_not_forward_ad_gaps():
    assert missing_forward_ad(RuntimeError("shape mismatch")) is None
    assert missing_forward_ad(ValueError("forward AD")) is None
    assert missing_forward_ad(NotImplementedError("Trying to use forward AD with foo_op that does not")) == \
        "the op foo_op"


QUIET = """
import sys, warnings
warnings.simplefilter("error", FutureWarning)
warnings.simplefilter("error", DeprecationWarning)
import torch, torch.nn.functional as F
from torch import nn
import kfc_compile as kc
assert "torch._decomp.decompositions_for_jvp" not in sys.modules
for mode in ("pre", "adaptive"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 5))
    opt = kc.KFC(model, lr=0.1, mode=mode)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    for _ in range(2):
        opt.step(closure)
assert "torch._decomp.decompositions_for_jvp" in sys.modules  # the JVPs ran: the warning's source was reached
print("quiet")
"""


def test_first_step_is_quiet():
    """No torch-internal deprecation warning on the first steps (forward-mode AD imports torch.jit.script code).

    In a fresh interpreter, where torch emits it once, with FutureWarning and DeprecationWarning as errors.
    """
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", QUIET], capture_output=True, text=True, cwd=root, env=env,
                         timeout=600)
    assert out.returncode == 0 and out.stdout.strip() == "quiet", out.stderr[-3000:]
