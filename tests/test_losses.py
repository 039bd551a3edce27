"""Loss kinds as classes: the class methods against autograd on ``batch_loss``, ``loss_spec`` and ``class_dim``.

The twin tests: a tiny float64 model whose logits are (B, T, V), trained with ``CrossEntropy(class_dim=-1)``, has
exactly the factors of its twin that returns the same logits as (B, V, T) with the default ``class_dim=1``.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import hessian, jacrev

import kfc_compile as kc
from kfc_compile.curvature.losses import LOSSES, Loss, check_fisher, loss_spec, output_gradients

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

B, T, E, V = 3, 4, 5, 6


class TokenLogits(nn.Module):
    """(B, T, E) → logits (B, T, V), or (B, V, T) with ``classes_first``."""

    def __init__(self, classes_first: bool):
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Sequential(nn.Linear(E, 7), nn.Tanh(), nn.Linear(7, V)).double()
        self.classes_first = classes_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.inner(x)
        return f.transpose(1, 2) if self.classes_first else f


def token_data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, T, E, dtype=torch.float64, generator=g), torch.randint(0, V, (B, T), generator=g)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("fisher", ["type-2", "empirical", "mc"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_class_dim_last_twin_has_the_same_factors(fisher, reduction, approx):
    x, y = token_data()
    got = kc.curvature(TokenLogits(False), kc.CrossEntropy(class_dim=-1, reduction=reduction), x, y, fisher=fisher,
                       approx=approx, mc_samples=3, generator=torch.Generator().manual_seed(7))
    ref = kc.curvature(TokenLogits(True), nn.CrossEntropyLoss(reduction=reduction), x, y, fisher=fisher,
                       approx=approx, mc_samples=3, generator=torch.Generator().manual_seed(7))
    assert got.keys() == ref.keys() == {"inner.0", "inner.2"}
    for name in ref:
        assert torch.equal(got[name].A, ref[name].A), name
        assert torch.equal(got[name].G, ref[name].G), name


def test_class_dim_last_twin_trains_the_same():
    """KFC steps (type-2 Fisher, exact clipping through the Fisher products) on the twins give the same weights."""
    x, y = token_data()
    models = {False: TokenLogits(False), True: TokenLogits(True)}
    losses = {False: kc.CrossEntropy(class_dim=-1), True: "cross_entropy"}
    for first, model in models.items():
        opt = kc.KFC(model, lr=0.1, damping=0.01, fisher="type-2", loss=losses[first], stats_fraction=1.0,
                     clip=1e-3, clip_fraction=1.0)
        for _ in range(3):
            opt.zero_grad()
            f = model(x)
            nn.functional.cross_entropy(f if first else f.transpose(1, 2), y).backward()
            opt.step()
    for (n, a), (_, b) in zip(models[False].named_parameters(), models[True].named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=n)


def test_class_dim_last_loss_drives_compile_step():
    """An instance is also the training loss.

    The eager compile_step with CrossEntropy(class_dim=-1) takes the steps of its (B, V, T) twin with
    nn.CrossEntropyLoss.
    """
    x, y = token_data()
    models = (TokenLogits(False), TokenLogits(True))
    steps = (kc.compile_step(models[0], kc.CrossEntropy(class_dim=-1), compile=False, lr=0.1, fisher="type-2"),
             kc.compile_step(models[1], nn.CrossEntropyLoss(), compile=False, lr=0.1, fisher="type-2"))
    for _ in range(2):
        losses = [step(x, y) for step in steps]
        torch.testing.assert_close(losses[0], losses[1], rtol=1e-12, atol=0)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# -- every class method against autograd on the batch loss ---------------------------------------------------------

def _cases():
    g = torch.Generator().manual_seed(2)
    f3 = torch.randn(3, 4, 2, dtype=torch.float64, generator=g)
    return [
        (kc.CrossEntropy(), torch.randn(3, 4, dtype=torch.float64, generator=g), torch.tensor([0, 3, 1])),
        (kc.CrossEntropy(reduction="sum"), f3, torch.randint(0, 4, (3, 2), generator=g)),
        (kc.CrossEntropy(class_dim=-1), f3, torch.randint(0, 2, (3, 4), generator=g)),
        (kc.CrossEntropy(class_dim=2, reduction="sum"), f3, torch.randint(0, 2, (3, 4), generator=g)),
        (kc.MSE(), f3, torch.randn(3, 4, 2, dtype=torch.float64, generator=g)),
        (kc.MSE(reduction="sum"), f3, torch.randn(3, 4, 2, dtype=torch.float64, generator=g)),
        (kc.BCEWithLogits(), f3, torch.randint(0, 2, (3, 4, 2), generator=g).double()),
        (kc.BCEWithLogits(reduction="sum"), f3, torch.randint(0, 2, (3, 4, 2), generator=g).double()),
    ]


@pytest.mark.parametrize("spec,f,y", _cases(), ids=lambda c: repr(c) if isinstance(c, Loss) else "")
def test_methods_match_autograd_on_batch_loss(spec, f, y):
    """ℓ_n = per_example_scale(N)·(example n's share of batch_loss).

    c·term_grad is ∇ℓ_n, the Hessian square-root columns give ∇²ℓ_n, fisher_inner is the mean of uₙᵀ∇²ℓ_n wₙ, and
    batch_loss is the torch module's.
    """
    n = f.shape[0]
    s = spec.per_example_scale(n)
    c = spec.term_weight(f)
    grad = jacrev(lambda t: spec.batch_loss(t, y))(f) * s
    torch.testing.assert_close(c * spec.term_grad(f, y), grad, rtol=1e-12, atol=1e-14)
    assert torch.equal(spec(f, y), spec.batch_loss(f, y))
    H = hessian(lambda t: spec.batch_loss(t, y))(f).reshape(f.numel(), f.numel()) * s
    V = torch.stack([v.reshape(n, -1) for v in spec.hessian_sqrt_columns(f, c)])  # every v covers all examples
    per_example = torch.einsum("vna,vnb->nab", V, V)
    torch.testing.assert_close(torch.block_diag(*per_example), H, rtol=1e-12, atol=1e-14)
    g = torch.Generator().manual_seed(3)
    u, w = (torch.randn(f.shape, dtype=torch.float64, generator=g) for _ in range(2))
    ref = u.reshape(-1) @ H @ w.reshape(-1) / n
    torch.testing.assert_close(spec.fisher_inner(f, u, w), ref, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(spec.fisher_inner(f, u, u), u.reshape(-1) @ H @ u.reshape(-1) / n, rtol=1e-12,
                               atol=1e-14)
    if isinstance(spec, kc.CrossEntropy):
        dim = spec.class_dim % f.dim()
        torch.testing.assert_close(spec.batch_loss(f, y),
                                   nn.CrossEntropyLoss(reduction=spec.reduction)(f.movedim(dim, 1), y))
        assert spec.terms_per_example(f) == f[0].numel() // f.shape[dim]
    else:
        torch.testing.assert_close(spec.batch_loss(f, y), spec.module(reduction=spec.reduction)(f, y))
        assert spec.terms_per_example(f) == f[0].numel()


@pytest.mark.parametrize("spec,f,y", _cases(), ids=lambda c: repr(c) if isinstance(c, Loss) else "")
def test_samples_have_the_target_shape_and_follow_the_generator(spec, f, y):
    a = spec.sample(f, torch.Generator().manual_seed(4))
    b = spec.sample(f, torch.Generator().manual_seed(4))
    assert a.shape == y.shape and torch.equal(a, b)


def test_class_dim_moves_with_the_logits():
    """CrossEntropy(class_dim=-1) on (B, T, V) is the default on the (B, V, T) transpose.

    Its sample / term_grad / columns are those of the default on the transpose, transposed back.
    """
    g = torch.Generator().manual_seed(5)
    f = torch.randn(B, T, V, dtype=torch.float64, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    last, first = kc.CrossEntropy(class_dim=-1), kc.CrossEntropy()
    ft = f.transpose(1, 2)
    assert torch.equal(last.sample(f, torch.Generator().manual_seed(6)),
                       first.sample(ft, torch.Generator().manual_seed(6)))
    assert torch.equal(last.term_grad(f, y), first.term_grad(ft, y).transpose(1, 2))
    cols = zip(last.hessian_sqrt_columns(f, 0.5), first.hessian_sqrt_columns(ft, 0.5), strict=True)
    assert all(torch.equal(a, b.transpose(1, 2)) for a, b in cols)
    assert last.terms_per_example(f) == first.terms_per_example(ft) == T


# -- loss_spec and validation ------------------------------------------------------------------------------------

def test_loss_spec_accepts_names_modules_and_instances():
    assert loss_spec("cross_entropy") == kc.CrossEntropy()
    assert loss_spec("mse") == kc.MSE() and loss_spec("bce_with_logits") == kc.BCEWithLogits()
    assert loss_spec(nn.CrossEntropyLoss(reduction="sum")) == kc.CrossEntropy(reduction="sum")
    assert loss_spec(nn.MSELoss(reduction="sum")) == kc.MSE("sum")
    assert loss_spec(nn.BCEWithLogitsLoss()) == kc.BCEWithLogits()
    spec = kc.CrossEntropy(class_dim=-1, reduction="sum")
    assert loss_spec(spec) is spec
    assert set(LOSSES) == {"cross_entropy", "mse", "bce_with_logits"}
    assert all(loss_spec(name).module is cls for name, cls in LOSSES.items())
    assert check_fisher("mc") == "mc"


@pytest.mark.parametrize("bad,match", [
    ("hinge", "unknown loss"), (nn.L1Loss(), "unsupported loss"), (nn.MSELoss(reduction="none"), "reduction"),
    (nn.CrossEntropyLoss(weight=torch.ones(2)), "class weights"),
    (nn.BCEWithLogitsLoss(pos_weight=torch.ones(2)), "pos_weight"),
])
def test_loss_spec_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        loss_spec(bad)


def test_constructor_validation_and_class_dim_range():
    with pytest.raises(ValueError, match="reduction"):
        kc.MSE(reduction="none")
    with pytest.raises(TypeError, match="class_dim"):
        kc.CrossEntropy(class_dim=1.0)
    f = torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match="batch dimension"):
        kc.CrossEntropy(class_dim=0).terms_per_example(f)
    with pytest.raises(ValueError, match="out of range"):
        kc.CrossEntropy(class_dim=3).term_weight(f)
    with pytest.raises(ValueError, match="out of range"):
        next(output_gradients(kc.CrossEntropy(class_dim=-4), "type-2", f))
