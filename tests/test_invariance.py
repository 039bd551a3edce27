"""Invariance of KFC updates to channel-mixing affine reparameterisations (KFC Thm 3; docs/algorithm.md §7.4).

N: conv(3→4, valid) → ReLU → conv(4→5, valid) → ReLU → global mean → linear(5→3).
N†: the same with fixed (non-parameter) channel-mixing affine maps s ↦ sU + c before and a ↦ aV + d after each
hidden nonlinearity, and parameters θ† (KFC-S Eq. 84) such that N†(θ†) = N(θ). All convs are valid (padding 0)
because d ≠ 0 (docs/algorithm.md §7.3). The loss is MSE so that every factor is full rank and undamped inverses exist
(the softmax-CE Γ of the last layer has rank C − 1). MC targets come from identically seeded generators, so both
nets see the same samples.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc

pytestmark = pytest.mark.filterwarnings("ignore:mode='adaptive' adapts the damping")


class ChannelMix(nn.Module):
    """x ↦ x·M + t over the channel dim (dim 1), identical at every location; M, t are buffers (not trained)."""

    def __init__(self, M: torch.Tensor, t: torch.Tensor):
        super().__init__()
        self.register_buffer("M", M)
        self.register_buffer("t", t)

    def forward(self, x):
        y = torch.einsum("nc...,cd->nd...", x, self.M)
        return y + self.t.reshape(1, -1, *([1] * (x.dim() - 2)))


class Net(nn.Module):
    def __init__(self, mixes: dict[str, ChannelMix] | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3)
        self.conv2 = nn.Conv2d(4, 5, 3)
        self.fc = nn.Linear(5, 3)
        mixes = mixes or {}
        for name in ("pre1", "post1", "pre2", "post2"):
            setattr(self, name, mixes.get(name, nn.Identity()))

    def forward(self, x):
        a1 = self.post1(F.relu(self.pre1(self.conv1(x))))
        a2 = self.post2(F.relu(self.pre2(self.conv2(a1))))
        return self.fc(a2.mean((2, 3)))


def random_mixes(channels: dict[str, int], gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    out = {}
    for name, c in channels.items():
        M = torch.eye(c, dtype=torch.float64) + 0.3 * torch.randn(c, c, dtype=torch.float64, generator=gen)
        out[name] = (M, 0.5 * torch.randn(c, dtype=torch.float64, generator=gen))
    return out


def twin(net: Net, mixes: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Net:
    """N† with θ† from KFC-S Eq. 84: W† = U⁻ᵀ W (per offset) V⁻ᵀ, b† = U⁻ᵀ(b − c) − Σ_{j,δ} W†[:, j, δ] d_j."""
    t = Net({k: ChannelMix(M, v) for k, (M, v) in mixes.items()}).double()
    eye = {c: (torch.eye(c, dtype=torch.float64), torch.zeros(c, dtype=torch.float64)) for c in (3, 4, 5)}
    plan = [("conv1", eye[3], mixes["pre1"]), ("conv2", mixes["post1"], mixes["pre2"]), ("fc", mixes["post2"], None)]
    with torch.no_grad():
        for name, (V, d), out in plan:
            src, dst = getattr(net, name), getattr(t, name)
            W, b = src.weight, src.bias
            if out is not None:
                U, c = out
                Uit = torch.linalg.inv(U).T
                W = torch.einsum("op,p...->o...", Uit, W)
                b = Uit @ (b - c)
            Wd = torch.einsum("oi...,ji->oj...", W, torch.linalg.inv(V))
            dst.weight.copy_(Wd)
            dst.bias.copy_(b - torch.einsum("oj...,j->o", Wd, d))
    return t


def data(seed: int, n: int = 128):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 3, 6, 6, dtype=torch.float64, generator=g),
            torch.randn(n, 3, dtype=torch.float64, generator=g))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def pair(seed=0):
    torch.manual_seed(seed)
    net = Net().double()
    mixes = random_mixes({"pre1": 4, "post1": 4, "pre2": 5, "post2": 5}, torch.Generator().manual_seed(seed + 1))
    return net, twin(net, mixes), mixes


def run(make_opt, steps=5, seed=0, on_step=lambda opt: None):
    net, tw, mixes = pair(seed)
    probe, _ = data(1000)
    assert rel(tw(probe), net(probe)) < 1e-12
    opts = [make_opt(net), make_opt(tw)]
    errs = []
    for k in range(steps):
        X, Y = data(k)
        for m, o in zip((net, tw), opts, strict=True):
            o.zero_grad()
            F.mse_loss(m(X), Y).backward()
            o.step()
        on_step(opts[0])
        with torch.no_grad():
            errs.append(rel(tw(probe), net(probe)))
    return errs, net, tw, opts, mixes


def kfc(**kw):
    base = dict(lr=0.01, momentum=0.9, damping=0.0, weight_decay=0.0, clip=None, loss="mse", fisher="mc",
                inverse_every=2, fallback=None, frontend="fx")  # one front end for both twins
    base.update(kw)
    return lambda m: kc.KFC(m, generator=torch.Generator().manual_seed(7), **base)


@pytest.mark.parametrize("variant", [
    dict(),
    dict(damping_method="eigen", lr=0.05, clip=0.02, clip_fraction=1.0),
    dict(mode="adaptive", lr=1.0, clip_fraction=1.0),
], ids=["pre-factored", "pre-eigen-clipped", "adaptive"])
def test_undamped_kfc_is_invariant(variant):
    probe, _ = data(1000)
    f0 = pair()[0](probe).detach()
    clip_scales = []
    errs, net, tw, opts, _ = run(kfc(**variant), on_step=lambda o: clip_scales.append(o.last_step.get("clip_scale")))
    moved = rel(net(probe).detach(), f0)
    assert moved > 0.05, moved  # the function changed: not a trivial pass
    assert max(errs) < 1e-8, errs
    if variant.get("clip"):
        assert min(clip_scales) < 0.9, clip_scales  # clipping fired, identically in both nets


def test_factors_transform_as_predicted():
    """Ω† = Kᵀ Ω K with K = [[V⊗I_Δ, 0], [dᵀ⊗1ᵀ, 1]] (bias last) and Γ† = U Γ Uᵀ (KFC-S Eqs. 98–105)."""
    errs, net, tw, opts, mixes = run(kfc(lr=0.0), steps=1)
    (V, d), (U, _) = mixes["post1"], mixes["pre2"]
    K = torch.zeros(37, 37, dtype=torch.float64)
    K[:36, :36] = torch.kron(V, torch.eye(9, dtype=torch.float64))
    K[36, :36] = torch.kron(d, torch.ones(9, dtype=torch.float64))
    K[36, 36] = 1.0
    f, ft = opts[0].factors("conv2"), opts[1].factors("conv2")
    assert rel(ft.A, K.T @ f.A @ K) < 1e-12
    assert rel(ft.G, U @ f.G @ U.T) < 1e-12


def test_damping_breaks_invariance():
    errs, *_ = run(kfc(damping=1e-3))
    assert max(errs) > 1e-4, errs


def test_sgd_is_not_invariant():
    errs, *_ = run(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
    assert max(errs) > 1e-3, errs
