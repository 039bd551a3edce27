"""``kc.KFC``: torch.optim.Optimizer behaviour, KFC-pre degenerate cases, statistics plumbing, state_dict."""
from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.losses import CrossEntropy, loss_spec
from kfc_compile.curvature.subset import leading_subset
from kfc_compile.optim import fvp
from kfc_compile.runtime.calls import RecordedCall

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def small_net(bn: bool = True) -> nn.Module:
    layers = [nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, groups=2)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers)


def batch(seed: int, n: int = 16, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 6, 6, dtype=dtype, generator=g), torch.randint(0, 3, (n,), generator=g)


def identity_factors(opt: kc.KFC) -> None:
    for layer in opt.layers:
        def eye(d, groups=layer.groups):
            return torch.eye(d, dtype=torch.float64).expand(groups, d, d)
        opt.set_factors(layer.name, eye(layer.a_dim), eye(layer.g_dim), frozen=True)


# -- degenerate case: Ω = Γ = I ------------------------------------------------------------------------------------

def test_identity_factors_reproduce_sgd_with_momentum():
    """Ω = Γ = I, no damping, no clipping: KFC-pre equals torch.optim.SGD with momentum step for step.

    KFC-pre is p ← μp − lr·g; θ ← θ + p; the equality includes the fallback (BatchNorm) parameters.
    """
    torch.manual_seed(0)
    a = small_net().double()
    b = copy.deepcopy(a)
    opt = kc.KFC(a, lr=0.05, momentum=0.9, damping=0.0, clip=None)
    identity_factors(opt)
    ref = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    assert len(opt.fallback_names) == 2  # BatchNorm weight and bias
    for k in range(6):
        x, y = batch(k)
        for m, o in ((a, opt), (b, ref)):
            o.zero_grad()
            F.cross_entropy(m(x), y).backward()
            o.step()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_identity_factors_with_averaging_and_schedulers():
    torch.manual_seed(1)
    model = small_net(bn=False).double()
    tau = 3.0
    opt = kc.KFC(model, lr=0.1, momentum=0.0, damping=0.0, clip=None, averaging=tau)
    identity_factors(opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: [1.0, 0.5, 0.0][min(k, 2)])
    xi = math.exp(-1 / tau)
    params = [p for g in opt.param_groups for p in g["params"]]
    avg = [p.detach().clone() for p in params]
    for k in range(4):
        before = [p.detach().clone() for p in params]
        x, y = batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        for p, p0 in zip(params, before, strict=True):
            torch.testing.assert_close(p, p0 - lr * p.grad, rtol=1e-12, atol=1e-14)
        avg = [xi * a + (1 - xi) * p.detach() for a, p in zip(avg, params, strict=True)]
        for a, b in zip(avg, opt.averaged_parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert opt.param_groups[0]["lr"] == 0.0
    current = [p.detach().clone() for p in params]
    with opt.swap_averaged():
        for p, a in zip(params, avg, strict=True):
            torch.testing.assert_close(p.detach(), a)
    for p, c in zip(params, current, strict=True):
        assert torch.equal(p.detach(), c)


# -- statistics plumbing --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [1.0, 0.5])
@pytest.mark.parametrize("fisher", ["type-2", "mc", "empirical"])
def test_first_step_factors_equal_kc_curvature(fisher, fraction):
    """Step 1 is a statistics step and ε = 0 on the first update, so the factors are the batch's factors.

    They are those of its first ceil(fraction·N) examples (mc/type-2: a separate forward of those; empirical: their rows
    of the user's pass).
    """
    torch.manual_seed(2)
    model = small_net(bn=False).double()
    ref_model = copy.deepcopy(model)
    x, y = batch(3, n=6)
    m = 3 if fraction < 1 else 6
    opt = kc.KFC(model, lr=0.0, fisher=fisher, generator=torch.Generator().manual_seed(5), stats_fraction=fraction)
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    # no weight gradients added
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    ref = kc.curvature(ref_model, "cross_entropy", x[:m], y[:m], fisher=fisher,
                       generator=torch.Generator().manual_seed(5))
    for layer in opt.layers:
        got = opt.factors(layer.name)
        torch.testing.assert_close(got.A, ref[layer.name].A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got.G, ref[layer.name].G, rtol=1e-12, atol=1e-12)


def test_statistics_subset_pass_leaves_batchnorm_and_rng_alone():
    """The separate statistics forward runs on copies of the buffers.

    BatchNorm's running statistics are those of the user's forward only; it is a no-grad-side-effect pass (the
    parameters' .grad are the user's).
    """
    torch.manual_seed(6)
    model = small_net(bn=True).double()
    twin = copy.deepcopy(model)
    x, y = batch(4)
    opt = kc.KFC(model, lr=0.0, stats_fraction=0.25, clip=None, generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(x), y).backward()
    F.cross_entropy(twin(x), y).backward()
    opt.step()
    bn, bn_twin = model[3], twin[3]
    assert torch.equal(bn.running_mean, bn_twin.running_mean) and torch.equal(bn.running_var, bn_twin.running_var)
    assert int(bn.num_batches_tracked) == 1
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)
    assert all(opt.factors(layer.name) is not None for layer in opt.layers)


def test_moving_average_in_the_kernel_epilogue(monkeypatch):
    """From the second statistics step on, Ω is averaged by the statistics kernels themselves.

    They run with beta = ε, alpha = (1 − ε)/n into the running factor; the result is the moving average of
    kc.curvature's factors of the subset, step by step.
    """
    from kfc_compile.curvature.factors import RunningFactors

    fused = []  # per layer and moving-average update: whether its batch Ω is the running Ω itself
    fold = RunningFactors.fold
    monkeypatch.setattr(RunningFactors, "fold", staticmethod(
        lambda pairs, d: (fused.extend(b.A is r.A for r, b in pairs), fold(pairs, d))))
    torch.manual_seed(7)
    model = small_net(bn=False).double()
    ref_model = copy.deepcopy(model)
    opt = kc.KFC(model, lr=0.0, fisher="type-2", stat_decay=0.5, stats_fraction=0.5)
    expected = {}
    for k in range(1, 4):
        x, y = batch(10 + k, n=8)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        for name, f in kc.curvature(ref_model, "cross_entropy", x[:4], y[:4], fisher="type-2").items():
            old = expected.get(name)
            eps = min(1 - 1 / k, 0.5)
            expected[name] = f if old is None else kc.Factors(eps * old.A + (1 - eps) * f.A,
                                                              eps * old.G + (1 - eps) * f.G)
    assert fused and all(fused)  # steps 2 and 3, every layer
    for name, f in expected.items():
        torch.testing.assert_close(opt.factors(name).A, f.A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.factors(name).G, f.G, rtol=1e-12, atol=1e-12)


def test_stats_fraction_validation():
    for bad in (0.0, -0.5, 1.5, float("nan"), True):
        with pytest.raises(ValueError, match="stats_fraction"):
            kc.KFC(small_net(), lr=0.1, stats_fraction=bad)


def test_statistics_period_and_moving_average():
    torch.manual_seed(3)
    model = small_net(bn=False).double()
    ref_model = copy.deepcopy(model)
    opt = kc.KFC(model, lr=0.0, fisher="type-2", stats_every=2, stat_decay=0.6, stats_fraction=1.0)
    expected = {}
    for k in range(1, 6):
        x, y = batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if (k - 1) % 2 == 0:  # steps 1, 3, 5
            cur = kc.curvature(ref_model, "cross_entropy", x, y, fisher="type-2")
            updates = (k + 1) // 2
            eps = min(1 - 1 / updates, 0.6)
            for name, f in cur.items():
                old = expected.get(name)
                expected[name] = f if old is None else kc.Factors(eps * old.A + (1 - eps) * f.A,
                                                                  eps * old.G + (1 - eps) * f.G)
    for name, f in expected.items():
        torch.testing.assert_close(opt.factors(name).A, f.A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.factors(name).G, f.G, rtol=1e-12, atol=1e-12)


def test_sum_reduction_scales_the_curvature():
    """A sum-loss run with damping N·η follows the mean-loss run with damping η.

    For h = Σ_n ℓ_n the curvature is N·F̄, so (N F̄ + N η)⁻¹ ∇h_sum = (F̄ + η)⁻¹ ∇h_mean.
    """
    torch.manual_seed(4)
    a = small_net(bn=False).double()
    b = copy.deepcopy(a)
    n = 16
    for method in ("factored", "eigen"):
        # same MC targets: both models compute the same outputs and draw from identically seeded generators
        oa = kc.KFC(a, lr=0.1, damping=0.01, clip=None, damping_method=method,
                    generator=torch.Generator().manual_seed(1))
        ob = kc.KFC(b, lr=0.1, damping=0.01 * n, clip=None, damping_method=method,
                    loss=nn.CrossEntropyLoss(reduction="sum"), generator=torch.Generator().manual_seed(1))
        for k in range(3):
            x, y = batch(k, n)
            for m, o, red in ((a, oa, "mean"), (b, ob, "sum")):
                o.zero_grad()
                F.cross_entropy(m(x), y, reduction=red).backward()
                o.step()
            for p, q in zip(a.parameters(), b.parameters(), strict=True):
                torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11)
        del oa, ob
        a.kfc.state.disarm()
        b.kfc.state.disarm()


# -- clipping: ν with exact Fisher-vector products ---------------------------------------------------------------------

def dense_fisher(model, x, spec):
    """Exact Fisher of the per-example loss, averaged over examples, over all parameters (float64)."""
    from torch.func import functional_call, jacrev, vmap
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),))[0]

    J = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    Jf = torch.cat([J[n].reshape(x.shape[0], -1, params[n].numel()) for n in names], -1)  # (N, K, P)
    out = vmap(lambda xi: f(params, xi))(x)
    if isinstance(spec, CrossEntropy):
        p = torch.softmax(out, -1)
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    else:
        H = 2.0 * torch.eye(out.shape[-1], dtype=out.dtype).expand(out.shape[0], -1, -1) / out.shape[-1]
    return torch.einsum("nka,nkl,nlb->ab", Jf, H, Jf) / x.shape[0], names


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
def test_fisher_vector_products_match_dense_fisher(loss):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    tm = kc.transform(model)
    spec = loss_spec(loss)
    x = torch.randn(10, 4, dtype=torch.float64)
    Fd, names = dense_fisher(model, x, spec)
    params = dict(model.named_parameters())
    u = {params[n]: torch.randn_like(params[n]) for n in names}
    w = {params[n]: torch.randn_like(params[n]) for n in names[:2]}  # partial direction: zeros elsewhere
    f, (ju, jw) = fvp.FisherProducts(tm, spec).outputs_and_jvps((x,), [u, w])
    C = fvp.gram(spec, f, [ju, jw])
    uf = torch.cat([u[params[n]].reshape(-1) for n in names])
    wf = torch.cat([w[params[n]].reshape(-1) if params[n] in w else torch.zeros(params[n].numel(), dtype=torch.float64)
                    for n in names])
    ref = torch.stack([torch.stack([uf @ Fd @ uf, uf @ Fd @ wf]), torch.stack([wf @ Fd @ uf, wf @ Fd @ wf])])
    torch.testing.assert_close(C, ref, rtol=1e-10, atol=1e-12)


def test_clipping_rescales_update_to_the_threshold():
    """ν = vᵀFv + wd·vᵀv of the applied update equals the clip threshold when clipping fires (momentum 0)."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    wd, clip = 0.01, 1e-3
    plain = copy.deepcopy(model)  # the dense reference runs on an uninstrumented twin
    # clip_curvature="exact": the property is the exact Fisher's ν (the default's, against F̂: test_defaults.py)
    opt = kc.KFC(model, lr=1.0, momentum=0.0, weight_decay=wd, clip=clip, clip_fraction=1.0, clip_curvature="exact")
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 3, (12,))
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    Fd, _ = dense_fisher(plain, x, loss_spec("cross_entropy"))
    opt.step()
    v = torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(model.parameters(), before, strict=True)])
    assert opt.last_step["clip_scale"] < 1.0
    torch.testing.assert_close(v @ Fd @ v + wd * v @ v, torch.tensor(clip, dtype=torch.float64), rtol=1e-9, atol=0)


def test_clip_fraction_uses_first_examples():
    x = torch.arange(10.0).reshape(10, 1)
    [call] = leading_subset([RecordedCall((x, torch.ones(3)))], 0.25)
    sub, other = call.args
    assert sub.shape[0] == 3 and torch.equal(sub[:, 0], torch.tensor([0.0, 1.0, 2.0])) and other.shape == (3,)


# -- fallback ----------------------------------------------------------------------------------------------------------

def test_adam_fallback_matches_torch_adam():
    torch.manual_seed(7)
    model = small_net().double()
    bn = model[3]
    shadow = [p.detach().clone().requires_grad_(True) for p in bn.parameters()]
    ref = torch.optim.Adam(shadow, lr=0.01, weight_decay=0.001)
    opt = kc.KFC(model, lr=0.05, fallback="adam", fallback_lr=0.01, weight_decay=0.001)
    for k in range(4):
        x, y = batch(k)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for s, p in zip(shadow, bn.parameters(), strict=True):
            s.grad = p.grad.clone()
        opt.step()
        ref.step()
        for s, p in zip(shadow, bn.parameters(), strict=True):
            torch.testing.assert_close(p.detach(), s.detach(), rtol=1e-12, atol=1e-14)


def test_model_without_kfc_layers():
    model = nn.Sequential(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="fallback=None"):
        kc.KFC(model, lr=0.1, fallback=None)
    with pytest.warns(UserWarning, match="no layer KFC can precondition"):
        opt = kc.KFC(nn.Sequential(nn.BatchNorm1d(3)), lr=0.1)
    assert opt.layers == [] and opt.fallback_names == ["0.weight", "0.bias"]


def test_plain_module_is_routed_in_place():
    torch.manual_seed(8)
    model = small_net()
    keys = list(model.state_dict())
    x, y = batch(0, dtype=torch.float32)
    with torch.no_grad():
        before = model(x)
    opt = kc.KFC(model, lr=0.1)
    assert isinstance(model.kfc, kc.transform(small_net()).kfc.__class__)
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.factors(opt.layers[0].name) is not None
    model.eval()
    assert not model.training and not opt.model.training
    # a second optimizer on the routed model reuses its transformed graph
    opt2 = kc.KFC(model, lr=0.1)
    assert opt2.model is opt.model
    with pytest.raises(ValueError, match="already transformed"):
        kc.transform(model)


def test_deepcopy_of_a_routed_model_is_independent():
    torch.manual_seed(12)
    model = small_net(bn=True)
    opt = kc.KFC(model, lr=0.1)
    twin = copy.deepcopy(model)
    x, y = batch(0, dtype=torch.float32)
    with torch.no_grad():
        twin[0].weight.mul_(2.0)
        assert not torch.allclose(twin(x), model(x))  # the copy's forward uses the copy's parameters
    twin.eval()
    assert model.training and model[3].training and not twin[3].training
    opt2 = kc.KFC(twin, lr=0.1)
    assert opt2.layers[0].weight is twin[0].weight
    twin.train()
    F.cross_entropy(twin(x), y).backward()
    opt2.step()
    assert opt2.factors("0") is not None and opt.factors("0") is None


def test_transformed_model_and_adaptive_without_closure_warns():
    torch.manual_seed(9)
    tm = kc.transform(small_net(bn=False).double())
    opt = kc.KFC(tm, lr=1.0, mode="adaptive", lm_interval=1)
    x, y = batch(0)
    F.cross_entropy(tm(x), y).backward()
    with pytest.warns(UserWarning, match="Levenberg"):
        opt.step()


def test_undamped_singular_factor_error_names_the_layer():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(20, 3)).double()  # 4 examples: Ω (21×21) has rank ≤ 4
    opt = kc.KFC(model, lr=0.1, damping=0.0)
    x, y = torch.randn(4, 20, dtype=torch.float64), torch.randint(0, 3, (4,))
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(kc.SingularFactorError, match="'0'"):
        opt.step()


# -- state_dict --------------------------------------------------------------------------------------------------------

def make_run(mode: str):
    torch.manual_seed(11)
    model = small_net().double()
    kw = dict(lr=0.05, stats_every=2, inverse_every=3, fisher="mc", generator=torch.Generator().manual_seed(3),
              averaging=4.0)
    if mode == "pre":
        kw.update(damping=1e-2, weight_decay=1e-3, clip=1e-2)
    else:
        kw.update(mode="adaptive", lr=1.0, damping=0.5, damping_method="eigen", fallback="adam", lm_interval=2,
                  clip_fraction=0.5)
    return model, kw


def train(model, opt, steps, start):
    for k in range(start, start + steps):
        x, y = batch(100 + k)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)


@pytest.mark.parametrize("mode", ["pre", "adaptive"])
def test_state_dict_round_trip_is_bit_identical(mode):
    model, kw = make_run(mode)
    opt = kc.KFC(model, **kw)
    train(model, opt, 5, 0)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    train(model, opt, 5, 5)
    if mode == "adaptive":
        assert opt.param_groups[0]["damping"] != 0.5  # the LM rule adapted λ, and it is resumed too

    torch.manual_seed(999)
    fresh = small_net().double()
    kw2 = dict(kw, generator=torch.Generator().manual_seed(12345))
    opt2 = kc.KFC(fresh, **kw2)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    fresh.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    train(fresh, opt2, 5, 5)
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
    for (name, b), c in zip(model.named_buffers(), fresh.buffers(), strict=True):
        assert torch.equal(b, c), name
    for a, b in zip(opt.averaged_parameters(), opt2.averaged_parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["damping"] == opt2.param_groups[0]["damping"]
    for layer in opt.layers:
        assert torch.equal(opt.factors(layer.name).A, opt2.factors(layer.name).A)


def test_load_state_dict_rejects_mismatches():
    model, kw = make_run("pre")
    opt = kc.KFC(model, **kw)
    sd = opt.state_dict()
    other = kc.KFC(nn.Sequential(nn.Linear(3, 2)).double(), lr=0.1)
    with pytest.raises(ValueError, match="layers"):
        other.load_state_dict(sd)
    eig = kc.KFC(small_net().double(), **dict(kw, damping_method="eigen"))
    with pytest.raises(ValueError, match="damping_method"):
        eig.load_state_dict(sd)


# -- arguments ---------------------------------------------------------------------------------------------------------

BAD = [
    ("lr", -1.0), ("lr", float("nan")), ("lr", "0.1"), ("momentum", 1.0), ("momentum", -0.1), ("damping", -1e-3),
    ("weight_decay", -1.0), ("stats_every", 0), ("stats_every", 1.5), ("inverse_every", 0), ("stat_decay", 1.5),
    ("fisher", "exact"), ("loss", "hinge"), ("loss", nn.L1Loss()), ("approx", "full"), ("mode", "sgd"),
    ("clip", 0.0), ("clip", -1.0), ("averaging", 0.0), ("damping_method", "tikhonov"), ("fallback", "rmsprop"),
    ("mc_samples", 0), ("generator", 3), ("clip_fraction", 0.0), ("clip_fraction", 1.5), ("fallback_lr", -1.0),
    ("fallback_betas", (0.9, 1.0)), ("fallback_eps", 0.0), ("lm_interval", 0), ("lm_decay", 1.0),
    ("min_damping", -1.0),
]


@pytest.mark.parametrize("name,value", BAD, ids=[f"{n}={v!r}" for n, v in BAD])
def test_bad_arguments_raise_value_error_naming_them(name, value):
    kwargs = {"lr": 0.1, name: value}
    with pytest.raises(ValueError, match=name.split("_")[0]):
        kc.KFC(nn.Sequential(nn.Linear(3, 2)), **kwargs)


def test_unknown_model_objects():
    with pytest.raises(TypeError):
        kc.KFC(lambda x: x, lr=0.1)
    with pytest.raises(NotImplementedError, match="torch.compile"):
        kc.KFC(torch.compile(nn.Linear(3, 2)), lr=0.1)
    with pytest.raises(ValueError, match="approx"):
        kc.KFC(kc.transform(nn.Sequential(nn.Linear(3, 2)), approx="reduce"), lr=0.1)


def test_optimizer_protocol():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = kc.KFC(model, lr=0.1)
    assert isinstance(opt, torch.optim.Optimizer)
    assert [g["role"] for g in opt.param_groups] == ["kfc", "fallback"]
    assert [layer.name for layer in opt.layers] == ["0", "2"]
    F.cross_entropy(model(torch.randn(5, 3)), torch.randint(0, 2, (5,))).backward()
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    with pytest.raises(KeyError):
        opt.factors("nope")


class _SDPANet(nn.Module):
    """Self-attention through F.scaled_dot_product_attention (its fused CPU kernel has no forward-mode AD)."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(8, 24), nn.Linear(8, 3)

    def forward(self, x):  # (N, L, 8)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v).mean(1))


def test_exact_clipping_through_fused_attention():
    """ν's forward-mode JVP runs attention on the math backend, so exact-Fisher clipping works on such models."""
    torch.manual_seed(8)
    model = _SDPANet()
    opt = kc.KFC(model, lr=0.1, clip=1e-6)
    x, y = torch.randn(8, 5, 8), torch.randint(0, 3, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert opt.last_step["nu"] > 1e-6 and opt.last_step["clip_scale"] < 1.0


def test_kc_curvature_uses_the_whole_batch_on_a_model_with_a_subsampling_optimizer():
    torch.manual_seed(9)
    model = small_net(bn=False).double()
    twin = copy.deepcopy(model)
    kc.KFC(model, lr=0.1, fisher="empirical", stats_fraction=0.25)  # instruments `model`, subsamples its statistics
    x, y = batch(12, n=8)
    got = kc.curvature(model, "cross_entropy", x, y, fisher="empirical")
    want = kc.curvature(twin, "cross_entropy", x, y, fisher="empirical")
    for name, f in want.items():
        torch.testing.assert_close(got[name].A, f.A, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(got[name].G, f.G, rtol=1e-12, atol=1e-12)
    assert model.kfc.state.stats_fraction == 0.25  # restored


def test_non_finite_clipping_statistic_skips_the_step():
    """An inf in the gradient makes ν non-finite: the step is skipped with a warning.

    The parameters are not moved by a garbage amount (the comparison ν > clip is false for NaN).
    """
    torch.manual_seed(10)
    model = small_net(bn=False).double()
    opt = kc.KFC(model, lr=0.1)
    x, y = batch(13, n=8)
    F.cross_entropy(model(x), y).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="skipped"):
        opt.step()
    assert opt.last_step.get("skipped") and not math.isfinite(opt.last_step["nu"])
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # a finite step afterwards works
    assert not opt.last_step.get("skipped")
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_non_finite_factors_restart_instead_of_failing():
    """A statistics pass that overflows (inf in a factor) must not end training with a 'singular factor' error.

    The layer's moving averages restart from the next statistics step (with a warning naming it), the other layers and
    the parameters stay finite, and the layer is preconditioned again from the next refresh.
    """
    torch.manual_seed(11)
    model = small_net(bn=False).double()
    opt = kc.KFC(model, lr=0.05)
    x, y = batch(14, n=8)
    name = opt.layers[1].name
    A = torch.eye(opt.layers[1].a_dim, dtype=torch.float64).expand(2, -1, -1).clone()
    A[0, 0, 0] = float("inf")
    opt.set_factors(name, A, torch.eye(opt.layers[1].g_dim, dtype=torch.float64).expand(2, -1, -1))
    F.cross_entropy(model(x), y).backward()
    with pytest.warns(RuntimeWarning, match=f"KFC layer '{name}'.*not finite"):
        opt.step()
    assert opt.factors(name) is None and all(torch.isfinite(p).all() for p in model.parameters())
    assert all(opt.factors(layer.name) is not None for layer in opt.layers if layer.name != name)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()  # fresh statistics: finite factors, an inverse at step 2
    f = opt.factors(name)
    assert f is not None and bool(torch.isfinite(f.A).all()) and opt.layer_state(name).inverse is not None
