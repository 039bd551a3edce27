"""KFC-pre's update as one function (``optim/fused_update.py``): fused eager, compiled, and where it is not taken.

* the fused eager update equals the per-tensor path (``estimator.precondition`` + ``updates.pre_update``, switched
  back in) over several steps, float64, on many configurations (factored / eigen damping, exact / factored /
  no ν, clipping binding or not, weight decay, momentum, SGD / Adam / no fallback, grouped conv, a bucket of two
  layers, a layer without bias, a parameter of the fallback, blocked and live-block inverses), ≤ 1e-12 relative,
  and float32 ≤ 1e-6;
* ``compile_update=True`` (inductor) equals the eager update over 20 steps under an lr scheduler with inverse
  refreshes, with one graph compiled at the first step and none after; the exact-ν pair of graphs likewise
  (compiled with ``aot_eager`` to keep the test short: the graphs, guards and recompiles are dynamo's);
* a step whose F̂⁻¹∇h is not finite changes nothing (the ``torch.where`` guards inside the graph);
* the cases the plan does not take keep today's path, with their DEBUG log line.
"""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.utils import counters

import kfc_compile as kc
from kfc_compile.optim import fused_update

pytestmark = pytest.mark.filterwarnings("ignore")


class Net(nn.Module):
    """Grouped conv without bias, a bucket of two same-shape linears, and a fallback gain parameter."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.l1 = nn.Linear(16, 6)
        self.l2 = nn.Linear(6, 6)
        self.l3 = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)
        self.gain = nn.Parameter(torch.ones(6))

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.c2(torch.tanh(self.c1(x)))), 2).flatten(1)
        h = torch.tanh(self.l1(h)) * self.gain
        return self.out(torch.tanh(self.l3(torch.tanh(self.l2(h)))))


def _mlp():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def _wide():
    return nn.Sequential(nn.Linear(70, 6), nn.Tanh(), nn.Linear(6, 3))


def _data(shape, n=4, seed=1, dtype=torch.float64, silent=0):
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(16, *shape, generator=g, dtype=dtype), torch.randint(0, 3, (16,), generator=g))
           for _ in range(n)]
    for x, _ in out:
        x[:, :silent] = 0  # inputs that are always 0: silent coordinates of Ω
    return out


def _run(build, shape, options, *, fused=True, steps=6, dtype=torch.float64, scheduler=False, silent=0):
    torch.manual_seed(0)
    model = build().to(dtype)
    opt = kc.KFC(model, generator=torch.Generator().manual_seed(2), **options)
    if not fused:
        opt._fused._off = "test: the per-tensor path"
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.9 ** k) if scheduler else None
    scalars, graphs = [], []
    for x, y in (_data(shape, dtype=dtype, silent=silent) * steps)[:steps]:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        scalars.append((opt.last_step.get("nu"), opt.last_step.get("clip_scale")))
        graphs.append(counters["stats"]["unique_graphs"])
        if sched is not None:
            sched.step()
    buffers = [opt.state[p].get("momentum_buffer") for p in model.parameters()]
    return [p.detach().clone() for p in model.parameters()], buffers, scalars, graphs, opt


def _taken(opt) -> bool:
    return any(isinstance(p, fused_update.Plan) for p in opt._fused._plans.values())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _assert_equal(a, b, tol):
    pa, ba, sa = a[:3]
    pb, bb, sb = b[:3]
    assert max(_rel(x, y) for x, y in zip(pa, pb, strict=True)) <= tol
    assert [x is None for x in ba] == [y is None for y in bb]
    assert max((_rel(x, y) for x, y in zip(ba, bb, strict=True) if y is not None), default=0.0) <= tol
    for (nu, s), (nu_ref, s_ref) in zip(sa, sb, strict=True):
        assert (nu is None) == (nu_ref is None) and (s is None) == (s_ref is None)
        if nu is not None:
            assert abs(nu - nu_ref) <= tol * abs(nu_ref) and abs(s - s_ref) <= tol * abs(s_ref)


# the resolved curvature / target pinned where the case was written for them before the default became the factored
# ν of the applied step (clip_curvature / clip_on "auto"), so each still covers the path it was meant to
CONFIGS = [
    dict(),  # the defaults: factored ν on the applied step (clip 0.2·lr), factored damping, SGD fallback
    dict(clip_curvature="exact"),  # the exact ν on the applied step, clip 30·lr
    dict(clip=1e-4, weight_decay=1e-2, clip_curvature="exact"),  # the clip binds every step
    dict(clip=1e-4, clip_curvature="factored", clip_on="update", weight_decay=1e-2, damping_method="eigen"),
    dict(clip=None, momentum=0.0, fallback="adam"),
    dict(clip=1e-3, clip_curvature="factored", clip_on="update", fallback=None, damping=1e-2),
    dict(clip=1e-4, clip_on="update", damping_method="eigen", fallback="adam", weight_decay=1e-3,
         clip_curvature="exact"),
    dict(clip=1e-4, clip_scaling="fixed", clip_curvature="factored", clip_on="update", momentum=0.5,
         fallback_lr=0.01),
    dict(clip=1e-4, max_factor_dim=8, weight_decay=1e-3, clip_curvature="exact"),  # blocked factors: own solve
    dict(clip=1e-4, max_factor_dim=8, damping_method="eigen", clip_curvature="factored", clip_on="update"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=[str(i) for i in range(len(CONFIGS))])
def test_fused_equals_the_per_tensor_path(config):
    options = dict(lr=0.05, inverse_every=3, stats_fraction=0.5, **config)
    fused = _run(Net, (2, 4, 4), options)
    ref = _run(Net, (2, 4, 4), options, fused=False)
    assert _taken(fused[4]) and not _taken(ref[4])
    _assert_equal(fused, ref, 1e-12)
    if options.get("clip", 30.0) is not None and options.get("clip", 30.0) < 1e-3:
        assert all(s < 1.0 for _, s in fused[2])  # the clipping was exercised


def test_fused_equals_the_per_tensor_path_in_float32():
    options = dict(lr=0.05, inverse_every=3, stats_fraction=0.5, clip=1e-4, weight_decay=1e-3, clip_curvature="exact")
    fused = _run(Net, (2, 4, 4), options, dtype=torch.float32)
    ref = _run(Net, (2, 4, 4), options, fused=False, dtype=torch.float32)
    assert _taken(fused[4])
    _assert_equal(fused, ref, 1e-6)


@pytest.mark.parametrize("damping_method", ["factored", "eigen"])
def test_fused_equals_the_per_tensor_path_with_a_live_block_inverse(damping_method):
    options = dict(lr=0.05, inverse_every=3, clip=1e-4, weight_decay=1e-3, damping_method=damping_method,
                   clip_curvature="exact")
    fused = _run(_wide, (70,), options, silent=10)
    ref = _run(_wide, (70,), options, fused=False, silent=10)
    assert fused[4].layer_states()[0].inverse.live is not None and _taken(fused[4])
    _assert_equal(fused, ref, 1e-12)


def test_compiled_update_equals_eager_over_20_steps_without_recompiles():
    options = dict(lr=0.05, inverse_every=3, stats_fraction=0.5, clip=3e-2, clip_curvature="factored",
                   clip_on="update", weight_decay=1e-3)
    before = counters["stats"]["unique_graphs"]
    compiled = _run(_mlp, (5,), dict(options, compile_update=True), steps=20, scheduler=True)
    eager = _run(_mlp, (5,), options, steps=20, scheduler=True)
    assert _taken(compiled[4]) and compiled[4]._fused.compile
    _assert_equal(compiled, eager, 1e-12)
    graphs = [g - before for g in compiled[3]]
    assert graphs == [1] * 20  # one graph at step 1, no recompile across lr changes and inverse refreshes
    assert any(s < 1.0 for _, s in compiled[2]) and any(s == 1.0 for _, s in compiled[2])  # both branches


def test_compiled_exact_nu_update_is_two_graphs_without_recompiles(monkeypatch):
    monkeypatch.setattr(fused_update, "BACKEND", "aot_eager")
    # clip_curvature="exact": the JVP's graph is the point (the default's factored ν has none)
    options = dict(lr=0.05, inverse_every=3, stats_fraction=0.5, clip=1e-3, weight_decay=1e-3,
                   clip_curvature="exact")
    before = counters["stats"]["unique_graphs"]
    compiled = _run(_mlp, (5,), dict(options, compile_update=True), steps=20, scheduler=True)
    eager = _run(_mlp, (5,), options, steps=20, scheduler=True, fused=False)
    _assert_equal(compiled, eager, 1e-12)
    assert [g - before for g in compiled[3]] == [2] * 20


@pytest.mark.parametrize("compile_update", [False, True])
def test_a_non_finite_preconditioned_gradient_changes_nothing(monkeypatch, compile_update):
    monkeypatch.setattr(fused_update, "BACKEND", "aot_eager")
    options = dict(lr=0.05, clip_curvature="factored", compile_update=compile_update)
    params, buffers, _, _, opt = _run(_mlp, (5,), options, steps=3)
    x, y = _data((5,))[0]
    opt.zero_grad()
    F.cross_entropy(opt.model(x), y).backward()
    inv = opt._estimator.states[0].inverse
    monkeypatch.setattr(opt._estimator, "refresh_inverses", lambda k, eta: None)  # the poisoned inverse is used
    inv.Ginv[0, 0, 0] = float("nan")
    opt._estimator.rebuild_buckets()
    opt.step()
    assert opt.last_step["skipped"] and opt.last_step["cause"] == "update"
    assert all(torch.equal(p, q) for p, q in zip(opt.model.parameters(), params, strict=True))
    assert all(torch.equal(opt.state[p]["momentum_buffer"], b)
               for p, b in zip(opt.model.parameters(), buffers, strict=True))


@pytest.mark.parametrize(("options", "why"), [
    (dict(mode="adaptive"), "mode='adaptive'"),
    (dict(max_factor_dim=4, compile_update=True), "live-block or blocked inverse"),
    (dict(adapt_damping="auto"), "adapt_damping='auto'"),
])
def test_a_case_it_cannot_take_keeps_the_per_tensor_path_and_says_so(caplog, monkeypatch, options, why):
    monkeypatch.setattr(fused_update, "BACKEND", "aot_eager")
    with caplog.at_level(logging.DEBUG, logger="kfc_compile.optim.fused_update"):
        _, _, _, _, opt = _run(_mlp, (5,), dict(lr=0.05, **options), steps=2)
    assert not _taken(opt)
    assert any(why in r.getMessage() and "not taken" in r.getMessage() for r in caplog.records)


def test_compile_update_is_validated():
    with pytest.raises(ValueError, match="compile_update must be True or False"):
        kc.KFC(_mlp(), lr=0.1, compile_update="yes")
