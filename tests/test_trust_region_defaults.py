"""KFC-pre's trust-region defaults (issue 17): what ``clip`` / ``clip_curvature`` / ``clip_on`` "auto" resolve to.

* the table: plain → the factored ν of the applied step, C = 0.2·lr; the exact ν where the factored one is not
  meaningful (``adapt_damping``) or not used (``mode="adaptive"``) or not available (distributed KFC: the setting
  here, a DDP model in a one-rank gloo group) → C = 30·lr; explicit values are kept;
* an explicit factored ν of the step where it is declined: a ``ValueError`` at construction (distributed KFC,
  DTensor parameters), or, where only the step can tell (a Fisher-product function without the estimator), the
  exact ν against the exact ν's own constant with a warning;
* checkpoints record the resolved trust region: a state of the old defaults loads into the new ones with a
  warning naming the values, a resumed run with them continues bit-identically, a state without the record loads.
"""
from __future__ import annotations

import copy
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.optim import rules
from kfc_compile.optim.options import CLIP_DEFAULTS, model_curvature

OLD = dict(clip=30.0, clip_curvature="exact", clip_on="step")  # the defaults before the factored ν of the step


def _mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _resolved(**kw):
    o = kc.KFC(_mlp(), **{"lr": 0.1, **kw}).options
    return o.clip_curvature, o.clip_on, o.clip, o.adapt_damping


@pytest.mark.parametrize(("kw", "expected"), [
    ({}, ("factored", "step", 0.2, False)),
    (dict(adapt_damping=True), ("exact", "step", 30.0, True)),
    (dict(adapt_damping="auto"), ("exact", "step", 30.0, "auto")),
    (dict(mode="adaptive"), ("exact", "step", 30.0, False)),
    (dict(clip_curvature="exact"), ("exact", "step", 30.0, False)),
    (dict(clip_curvature="factored"), ("factored", "step", 0.2, False)),
    (dict(clip_on="update"), ("factored", "update", 30.0, False)),
    (dict(clip_curvature="exact", clip_on="update"), ("exact", "update", 30.0, False)),
    (dict(clip=0.5), ("factored", "step", 0.5, False)),
    (dict(clip=None), ("factored", "step", None, False)),
    (dict(clip=None, adapt_damping="auto"), ("exact", "step", None, False)),
    (dict(clip_curvature="factored", adapt_damping="auto"), ("factored", "step", 0.2, False)),
])
def test_resolution_table(kw, expected):
    assert _resolved(**kw) == expected


def test_the_constants_are_the_table():
    assert CLIP_DEFAULTS == {("exact", "step"): 30.0, ("exact", "update"): 30.0, ("factored", "step"): 0.2,
                             ("factored", "update"): 30.0}
    assert kc.KFC(_mlp(), lr=0.1).options.clip_auto and not kc.KFC(_mlp(), lr=0.1, clip=0.2).options.clip_auto


@pytest.fixture
def one_rank_group():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_distributed_kfc_resolves_to_the_exact_nu_and_refuses_an_explicit_factored_step(one_rank_group):
    from torch.distributed.tensor import DeviceMesh, distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    o = kc.KFC(DDP(_mlp()), lr=0.1).options
    assert (o.clip_curvature, o.clip_on, o.clip) == ("exact", "step", 30.0)
    assert _resolved(distributed="replicate") == ("exact", "step", 30.0, False)
    for kw in (dict(distributed=True), dict(distributed="broadcast", clip_on="step")):
        with pytest.raises(ValueError, match=r"clip_curvature='factored' with clip_on='step' is not available "
                                             r"with distributed=.*pass clip_curvature='exact'"):
            kc.KFC(_mlp(), lr=0.1, clip_curvature="factored", **kw)
    # not refused where the factored ν of the step is not asked for
    assert _resolved(clip_curvature="factored", clip_on="update", distributed=True)[:3] == ("factored", "update", 30.0)
    assert _resolved(clip_curvature="factored", clip=None, distributed=True)[2] is None
    with pytest.raises(ValueError, match=r"a DistributedDataParallel model.*pass clip_curvature='exact'"):
        kc.KFC(DDP(_mlp()), lr=0.1, clip_curvature="factored")
    assert kc.KFC(DDP(_mlp()), lr=0.1, clip_curvature="factored", clip_on="update").options.clip == 30.0
    model = nn.Linear(3, 2)  # a DTensor parameter (FSDP2's): checked before any setup
    model.weight = nn.Parameter(distribute_tensor(model.weight.detach(), DeviceMesh("cpu", [0])))
    assert model_curvature(model, "auto", "auto", "auto", "pre") == "exact"
    with pytest.raises(ValueError, match=r"DTensor \(FSDP2\) parameters"):
        model_curvature(model, "factored", "step", 0.2, "pre")
    assert model_curvature(_mlp(), "auto", "auto", "auto", "pre") == "auto"


def _batches(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g))
            for _ in range(n)]


@pytest.mark.parametrize("clip", ["auto", 0.2])
def test_declined_at_run_time_the_exact_nu_takes_its_own_constant_and_warns(clip):
    """A Fisher-product function that cannot reach F̂: the exact ν against 30·lr (clip="auto") or the given clip."""
    lr = 20.0  # large, so that the exact ν exceeds 30·lr and the constant decides the scale
    torch.manual_seed(0)
    model = _mlp().double()
    opt = kc.KFC(model, lr=lr, clip=clip, generator=torch.Generator().manual_seed(2))
    opt._fused._off = "test: the per-tensor path"
    gram = opt._exact_gram
    opt._exact_gram = lambda directions, fraction, gram=gram: gram(directions, fraction)
    for x, y in _batches(1):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with pytest.warns(UserWarning, match="not available here .*no estimator.*pass clip_curvature='exact'"):
            opt.step()
    nu, constant = opt.last_step["nu"], (30.0 if clip == "auto" else 0.2) * lr
    assert nu > constant
    assert opt.last_step["clip_scale"] == rules.clip_scale(nu, constant) == math.sqrt(constant / nu)


def _train(opt, model, batches):
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_a_checkpoint_of_the_old_defaults_resumes_with_its_own_trust_region():
    torch.manual_seed(0)
    model = _mlp().double()
    first, rest = _batches(3)[:2], _batches(3)[2:]
    opt = kc.KFC(model, lr=0.5, generator=torch.Generator().manual_seed(3), **OLD)
    _train(opt, model, first)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert {k: saved["kfc"]["options"][k] for k in OLD} == OLD
    straight = _train(opt, model, rest)

    def resumed(**kw):
        m = _mlp().double()
        m.load_state_dict(saved_model)
        o = kc.KFC(m, lr=0.5, generator=torch.Generator().manual_seed(3), **kw)
        o.load_state_dict(copy.deepcopy(saved))
        return o, m

    with pytest.warns(UserWarning, match=r"saved with the trust region .*'clip_curvature': 'exact'.*pass clip=30.0, "
                                         r"clip_curvature='exact'"):
        resumed()  # the new defaults: told how to keep the saved run's
    o, m = resumed(**OLD)
    assert all(torch.equal(a, b) for a, b in zip(_train(o, m, rest), straight, strict=True))
    old_format = copy.deepcopy(saved)
    for k in ("clip", "clip_curvature", "clip_on", "clip_scaling"):
        del old_format["kfc"]["options"][k]  # a state written before the record: loads as before
    m = _mlp().double()
    kc.KFC(m, lr=0.5, generator=torch.Generator()).load_state_dict(old_format)
