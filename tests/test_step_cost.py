"""The step's fused scalars (``optim/scalars.py``) against the term-by-term rules, and a compiled step's graphs.

* every scalar equals ``rules.py``'s term-by-term value (float64, ≤ 1e-12 relative), with missing directions,
  mixed dtypes and non-finite entries;
* whole KFC runs (KFC-pre with exact and factored ν and momentum, adaptive with the Levenberg–Marquardt rule)
  with the fused scalars equal runs with the term-by-term rules patched back in, over several steps (float64);
* the exact Fisher products of several directions in one batched pass equal one pass per direction;
* ``kc.compile_step`` under an lr scheduler changing lr every step: no recompile over 20 steps, and the lr is
  used (the run differs from a constant-lr run).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.guard import finite_flags
from kfc_compile.curvature.losses import loss_spec
from kfc_compile.optim import fvp, rules, scalars, updates
from kfc_compile.optim import kfc as kfc_module
from kfc_compile.runtime.calls import RecordedCall

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def tensors(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype) for s in ((5, 4), (5,), (3, 5), (3,), (2, 3, 3))]


def test_quadratic_model_equals_the_term_by_term_rule():
    grads, delta, prev = tensors(0), tensors(1), tensors(2)
    prev[1] = None  # a parameter without a previous update: 0 there
    gram = torch.tensor([[2.0, 0.3], [0.3, 1.5]], dtype=torch.float64)
    C, d = scalars.quadratic_model(gram, [delta, prev], grads, 0.07)
    C_ref, d_ref = rules.quadratic_model(gram, [delta, prev], grads, 0.07)
    assert C.dtype == d.dtype == torch.float64 and C.shape == (2, 2) and d.shape == (2,)
    assert torch.allclose(C, C_ref, rtol=1e-12, atol=0) and torch.allclose(d, d_ref, rtol=1e-12, atol=0)
    C1, d1 = scalars.quadratic_model(gram[:1, :1], [delta], grads, 0.07)
    C1_ref, d1_ref = rules.quadratic_model(gram[:1, :1], [delta], grads, 0.07)
    assert torch.allclose(C1, C1_ref, rtol=1e-12, atol=0) and torch.allclose(d1, d1_ref, rtol=1e-12, atol=0)


def test_nu_and_sum_squares_equal_the_term_by_term_rules():
    u, g = tensors(3), tensors(4)
    assert rel(scalars.factored_nu(u, g, 0.3), rules.factored_nu(u, g, 0.3)) < 1e-12
    assert rel(scalars.sum_squares(u), rules.sum_squares(u)) < 1e-12
    u32 = tensors(3, torch.float32)  # fp32 parameters: accumulated in fp64 like the rule
    assert rel(scalars.sum_squares(u32 + u), rules.sum_squares(u32 + u)) < 1e-12
    assert scalars.sum_squares([]) == 0.0


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", ["small", "large"])
def test_all_finite_finds_every_non_finite_entry(bad, where):
    ts = tensors(5, torch.float32) + [torch.zeros(scalars.SMALL_NUMEL + 3)]
    assert scalars.all_finite_(ts) and finite_flags([ts])[0]
    i = 2 if where == "small" else len(ts) - 1
    ts[i].view(-1)[-1] = bad
    assert not scalars.all_finite_(ts) and not finite_flags([ts])[0]
    assert scalars.all_finite_([]) and scalars.all_finite_([torch.zeros(0)])


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _run(options: dict, steps: int = 6, closure_every: int | None = None):
    model = _net()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g))
            for _ in range(3)]
    opt = kc.KFC(model, generator=torch.Generator().manual_seed(2), stats_fraction=1.0, **options)
    info = []
    for k in range(steps):
        x, y = data[k % len(data)]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        if closure_every and (k + 1) % closure_every == 0:
            opt.step(closure)
        else:
            closure()
            opt.step()
        info.append({k: v for k, v in opt.last_step.items() if isinstance(v, float)})
    return [p.detach().clone() for p in model.parameters()], info


def _term_by_term(monkeypatch):
    monkeypatch.setattr(updates, "quadratic_model", rules.quadratic_model)
    monkeypatch.setattr(updates, "factored_nu", rules.factored_nu)
    monkeypatch.setattr(updates, "sum_squares", rules.sum_squares)
    monkeypatch.setattr(kfc_module, "all_finite_", lambda ts: finite_flags([ts])[0])


CASES = {
    "pre-exact": (dict(lr=0.05, momentum=0.9, clip=1e-3, weight_decay=1e-3), None),
    "pre-factored": (dict(lr=0.05, momentum=0.9, clip=1e-3, clip_curvature="factored", weight_decay=1e-3), None),
    "adaptive": (dict(lr=1.0, mode="adaptive", damping=1e-2, lm_interval=2, weight_decay=1e-3), 2),
}


@pytest.mark.parametrize("case", CASES)
def test_fused_step_equals_the_term_by_term_step(case, monkeypatch):
    options, closure_every = CASES[case]
    fused, info = _run(options, closure_every=closure_every)
    if case.startswith("pre"):
        assert any(i.get("clip_scale", 1.0) < 1.0 for i in info), "the clip never bound: ν not exercised"
    else:
        assert any("rho" in i for i in info) and any(i.get("mu", 0.0) != 0.0 for i in info)
    with monkeypatch.context() as m:
        _term_by_term(m)
        ref, ref_info = _run(options, closure_every=closure_every)
    for a, b in zip(fused, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14), (a - b).abs().max()
    for i, j in zip(info, ref_info, strict=True):
        assert i.keys() == j.keys()
        for key in i:
            assert rel(i[key], j[key]) < 1e-9 or abs(i[key] - j[key]) < 1e-14, (key, i[key], j[key])


def test_compiled_step_does_not_recompile_under_an_lr_scheduler():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(4)]

    def run(schedule: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))
        step = kc.compile_step(model, "cross_entropy", lr=0.05, inverse_every=5,
                               backend_options={"inner": "aot_eager"}, generator=torch.Generator().manual_seed(4))
        sched = torch.optim.lr_scheduler.LambdaLR(step.optimizer, lambda k: 1.0 / (1 + k)) if schedule else None
        lrs, graphs = [], []
        for k in range(20):
            x, y = data[k % len(data)]
            step(x, y)
            lrs.append(step.optimizer.param_groups[0]["lr"])
            graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
            if sched is not None:
                sched.step()
        return [p.detach().clone() for p in model.parameters()], lrs, graphs, step

    params, lrs, graphs, step = run(True)
    assert len(set(lrs)) == 20  # the scheduler changed lr at every step
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs  # graphs of step 1 only: no recompile after it
    assert step.compiles == 1
    assert not torch._dynamo.utils.counters["graph_break"]
    const, _, _, _ = run(False)
    assert any(not torch.allclose(a, b) for a, b in zip(params, const, strict=True))  # the schedule was used


def _conv_net(batch_norm: bool = False):
    torch.manual_seed(0)
    layers = [nn.Conv2d(2, 4, 3, padding=1), nn.ReLU()]
    if batch_norm:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.Flatten(), nn.Linear(4 * 5 * 5, 3)]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_batched_fisher_products_equal_one_pass_per_direction(batch_norm):
    model = _conv_net(batch_norm)
    tm = kc.transform(model)
    products = fvp.FisherProducts(tm, loss_spec("cross_entropy"))
    params = list(tm.parameters())
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 2, 5, 5, generator=g, dtype=torch.float64)
    dirs = [{p: torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params},
            {p: torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params[:2]},  # the rest: 0
            {}]
    buffers = {n: b.clone() for n, b in tm.named_buffers()}
    products.batched = False
    f_seq, seq = products.outputs_and_jvps((x,), dirs)
    products.batched = True
    f_bat, bat = products.outputs_and_jvps((x,), dirs)
    assert products.batched in (True, False)  # False: the batched pass failed here and was given up
    assert torch.allclose(f_bat, f_seq, rtol=1e-12, atol=1e-14)
    for a, b in zip(bat, seq, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    assert seq[0].abs().sum() > 0 and not seq[2].any()
    for n, b in tm.named_buffers():  # BatchNorm's running statistics untouched by either way
        assert torch.equal(b, buffers[n])


@pytest.mark.parametrize("min_flops", [0.0, 1e12])
def test_batched_fisher_products_are_chosen_by_the_work_once_and_deterministically(min_flops, monkeypatch):
    monkeypatch.setattr(fvp, "BATCHED_MIN_FLOPS", min_flops)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    tm = kc.transform(model)
    products = fvp.FisherProducts(tm, loss_spec("cross_entropy"))
    x = torch.randn(6, 4, dtype=torch.float64)
    dirs = [{p: torch.randn_like(p) for p in tm.parameters()} for _ in range(2)]
    assert products.batched is None
    products.outputs_and_jvps((x,), dirs[:1])  # one direction: nothing to batch, nothing decided
    assert products.batched is None
    rng = torch.get_rng_state()
    products._batch_pays(RecordedCall((x,), {}), {n: p.detach() for n, p in tm.named_parameters()}, {})
    assert torch.equal(torch.get_rng_state(), rng)  # the FLOP count's forward (with dropout) draws nothing
    products.outputs_and_jvps((x,), dirs)
    assert products.batched is (min_flops == 0.0)
    products.outputs_and_jvps((x,), dirs)
    assert products.batched is (min_flops == 0.0)
