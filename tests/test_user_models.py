"""The models users bring (issue 13): HF transformers, timm, a ``self.training`` branch, LSTM / GRU; eager and compiled.

Each model (``tests/user_models.py``: small configs, random weights, never downloaded) goes through one scripted
session per path, as a user would drive it:

* ``eager``: ``kc.KFC(model)`` on the plain module (``frontend="auto"``: the fx pass, or dynamo capture for
  forwards fx cannot take whole);
* ``compiled``: ``kc.KFC(torch.compile(model, backend="kfc", options={"inner": "aot_eager"}))``.

The session first makes ``kc.KFC`` fail on the user's object (a bad argument; an error after the model was
instrumented) and runs the model; then it instruments it for real and runs 5 KFC steps in train mode (HF models
called with ``labels=`` so that they compute their own loss, ``out.loss.backward()``), comparing the first step's
outputs and gradients with an untouched copy under the same RNG seed, and its factors with ``kc.curvature`` on
the logits; last, eval mode with the usual call (``model(input_ids=..., attention_mask=...)``). The tests below
assert on what the session recorded, one property each. A session is run once (cached) and only its record is kept.

Dropout, drop-path, the noise branch and the RNNs' inter-layer dropout make train mode stochastic, so a wrong
training mode or a different RNG stream shows. Every step reseeds the RNG, so the 5 steps descend one fixed
objective.
"""
from __future__ import annotations

import copy
import functools
import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch

import kfc_compile as kc
from kfc_compile.curvature.factors import Factors
from kfc_compile.optim import kfc as kfc_module

from user_models import MODELS, UserModel, kfc_options, logits

PATHS = ("eager", "compiled")
SEED = 0
MC_SEED = 7
STEPS = 5
NAMES = list(MODELS)
RECURRENT = [n for n, m in MODELS.items() if m.recurrent]


@dataclass
class Record:
    """What one session observed: pairs are (instrumented, original), on the same weights, batch and RNG seed."""

    name: str
    path: str
    error: BaseException | None = None
    warnings: list[str] = field(default_factory=list)
    after_failure: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    train: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    eval: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    layers: list[tuple] = field(default_factory=list)  # (name, kind, a_dim, g_dim, groups)
    uncovered: list[str] = field(default_factory=list)
    factors: dict[str, Factors | None] = field(default_factory=dict)  # the optimizer's, after step 1
    reference: dict[str, Factors] = field(default_factory=dict)  # kc.curvature on the original (eager path)
    losses: list[float] = field(default_factory=list)

    def check(self) -> Record:
        """The record, or the session's error (the test then fails with its traceback)."""
        if self.error is not None:
            raise self.error
        return self


def _outputs(out, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"logits": logits(out).detach().clone(), "loss": loss.detach().clone()}


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {f"grad {n}": p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _pairs(got: dict, expected: dict) -> dict[str, tuple]:
    assert got.keys() == expected.keys(), f"different outputs / gradients: {sorted(got.keys() ^ expected.keys())}"
    return {k: (got[k], expected[k]) for k in got}


def _forward_backward(um: UserModel, model, ref, batch, labels: bool) -> dict[str, tuple]:
    """The same seeded forward (+ backward of the user's loss) on the instrumented model and on the original."""
    seen = []
    for m in (model, ref):
        torch.manual_seed(SEED)
        out = um.call(m, batch, labels=labels)
        loss = out.loss if labels else um.logits_loss(out, batch)
        loss.backward()
        seen.append(_outputs(out, loss))
    return seen


def _boom(*args, **kwargs):
    raise RuntimeError("boom: an error after the model was instrumented")


def _session(rec: Record, um: UserModel, model: torch.nn.Module, ref: torch.nn.Module, batch) -> None:
    labels = um.hf  # HF models compute their own loss from labels=, as in their training scripts
    if rec.path == "eager":
        target = model
        torch.manual_seed(SEED)
        rec.reference = kc.curvature(ref, um.loss, um.inputs(batch, labels=labels), None, fisher="mc",
                                     generator=torch.Generator().manual_seed(MC_SEED))
    else:
        target = torch.compile(model, backend="kfc", options={"inner": "aot_eager"})
    # whole-batch statistics in the user's own pass: the factors of both paths and of kc.curvature then come from
    # one forward under one seed (a subset pass in step() would draw other dropout masks)
    options = kfc_options(um, stats_fraction=1.0, generator=torch.Generator().manual_seed(MC_SEED))

    # a failed kc.KFC: a bad argument, then an error once the model was instrumented (routed / captured)
    with pytest.raises(ValueError, match="approx"):
        kc.KFC(target, **{**options, "approx": "bogus"})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kfc_module, "CurvatureEstimator", _boom)
        with pytest.raises(RuntimeError, match="boom"):
            kc.KFC(target, **options)
    got, expected = _forward_backward(um, target, ref, batch, labels)
    rec.after_failure = _pairs(got, expected)

    model.zero_grad()
    ref.zero_grad()
    opt = kc.KFC(target, **options)
    got, expected = _forward_backward(um, target, ref, batch, labels)
    rec.train = _pairs({**got, **_grads(model)}, {**expected, **_grads(ref)})
    rec.losses.append(got["loss"].item())
    opt.step()
    rec.layers = [(lay.name, lay.kind, lay.a_dim, lay.g_dim, lay.groups) for lay in opt.layers]
    rec.uncovered = sorted(u.name for u in opt.model.kfc.uncovered)
    rec.factors = {s.name: s.dense_factors() for s in opt.layer_states()}
    for _ in range(STEPS - 1):
        opt.zero_grad()
        torch.manual_seed(SEED)
        loss = um.training_loss(target, batch)
        loss.backward()
        opt.step()
        rec.losses.append(loss.item())
    torch.manual_seed(SEED)
    rec.losses.append(um.training_loss(target, batch).item())  # after the 5th step

    ref.load_state_dict(model.state_dict())
    target.eval()
    ref.eval()
    model.zero_grad()
    ref.zero_grad()
    got, expected = _forward_backward(um, target, ref, batch, labels=False)  # the usual inference call
    rec.eval = _pairs({**got, **_grads(model)}, {**expected, **_grads(ref)})


@functools.cache
def session(name: str, path: str) -> Record:
    """Run the scripted session of model ``name`` on ``path`` once; keep its record only."""
    torch._dynamo.reset()  # each session compiles afresh (and never runs into dynamo's recompile limit)
    um = MODELS[name]
    model = um.build()
    ref = copy.deepcopy(model)
    rec = Record(name, path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            _session(rec, um, model, ref, um.batch())
        except Exception as e:  # noqa: BLE001 - re-raised by every test that reads the record
            rec.error = e
    rec.warnings = [str(w.message) for w in caught]
    torch._dynamo.reset()
    return rec


def assert_pairs_close(pairs: dict[str, tuple], what: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """Every (instrumented, original) pair equal up to float32 rounding."""
    assert pairs, f"nothing was compared ({what})"
    for key, (got, expected) in pairs.items():
        torch.testing.assert_close(got, expected, rtol=rtol, atol=atol, msg=lambda m, k=key: f"{what}, {k}: {m}")


def assert_factors_close(got: Factors, expected: Factors, what: str) -> None:
    """Ω and Γ equal up to float32 rounding, relative to each factor's largest entry.

    A zero reference asks for an exact zero: a layer in a branch that is dead at initialisation (timm zero-inits
    the last norm of its residual branches) gets Γ = 0.
    """
    for g, e, which in ((got.A, expected.A, "A"), (got.G, expected.G, "G")):
        assert torch.isfinite(g).all(), f"{what}: {which} is not finite"
        scale = e.abs().max().item()
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, w=which: f"{what} {w}: {m}")


def assert_some_curvature(factors: dict[str, Factors | None], what: str) -> None:
    """At least one layer with nonzero Ω and Γ (so that a comparison of factors cannot pass on zeros alone)."""
    assert any(f is not None and f.A.abs().max() > 0 and f.G.abs().max() > 0 for f in factors.values()), what


# -- the user's object after a failed kc.KFC ---------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_failed_instrumentation_leaves_model_working(name, path):
    rec = session(name, path).check()
    assert_pairs_close(rec.after_failure, "after a failed kc.KFC")


# -- same function as the original, in train and eval mode -------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_train_mode_matches_original(name, path):
    """Outputs (logits and the model's own loss for HF) and every gradient, with dropout / drop-path active."""
    rec = session(name, path).check()
    assert_pairs_close(rec.train, "train mode")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_eval_mode_matches_original(name, path):
    """After 5 steps in train mode, ``eval()``: the usual call's logits and gradients equal the original's."""
    rec = session(name, path).check()
    assert_pairs_close(rec.eval, "eval mode")


# -- the layers, and the Fisher on the logits ----------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_layers_registered(name):
    rec = session(name, "eager").check()
    assert rec.layers, f"{name}: no layer under KFC"
    if name in RECURRENT:  # the Linear head; the recurrent weights go to the fallback
        assert [lay[0] for lay in rec.layers] == ["head"]
        assert [u for u in rec.uncovered if u.startswith("rnn.")] == sorted(
            f"rnn.{n}" for n, _ in MODELS[name].build().rnn.named_parameters())


@pytest.mark.parametrize("name", NAMES)
def test_fisher_from_logits(name):
    """The first step's factors (HF: from ``out.loss.backward()``) are those of the logits: = ``kc.curvature``."""
    rec = session(name, "eager").check()
    assert rec.factors.keys() == rec.reference.keys() == {lay[0] for lay in rec.layers}
    for layer, f in rec.factors.items():
        assert f is not None, f"{name}: layer {layer} has no factors after a statistics step"
        assert_factors_close(f, rec.reference[layer], f"{name} {layer}")
    if rec.factors:
        assert_some_curvature(rec.factors, name)


@pytest.mark.parametrize("name", NAMES)
def test_paths_agree(name):
    """Eager and compiled register the same layers (names, kinds, dims), leave out the same, and agree on factors."""
    eager, compiled = session(name, "eager").check(), session(name, "compiled").check()
    assert compiled.layers == eager.layers
    assert compiled.uncovered == eager.uncovered
    assert compiled.factors.keys() == eager.factors.keys()
    for layer, f in eager.factors.items():
        assert f is not None and compiled.factors[layer] is not None, f"{name} {layer}: no factors after step 1"
        assert_factors_close(compiled.factors[layer], f, f"{name} {layer} (compiled vs eager)")
    if name in RECURRENT:  # dynamo runs frames holding an nn.LSTM/GRU eagerly: the wrapper runs the plain module
        assert any("recurrent" in w for w in compiled.warnings), compiled.warnings


# -- training --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", NAMES)
def test_kfc_steps_decrease_loss(name, path):
    rec = session(name, path).check()
    assert len(rec.losses) == STEPS + 1
    assert all(math.isfinite(v) for v in rec.losses), rec.losses
    assert all(b < a for a, b in zip(rec.losses[:-1], rec.losses[1:], strict=True)), rec.losses


def test_lstm_default_clipping():
    """The default exact ν needs forward-mode AD, which CPU LSTM (mkldnn_rnn_layer) lacks: factored ν, one warning."""
    um = MODELS["lstm"]
    model, batch = um.build(), um.batch()
    # clip_curvature="exact": the exact ν (the default before the factored ν of the step) is the point
    opt = kc.KFC(model, lr=0.1, damping=0.1, loss=um.loss, clip_curvature="exact")
    um.training_loss(model, batch).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    assert [w for w in caught if "mkldnn_rnn_layer" in str(w.message)]
    assert all(p.isfinite().all() for p in model.parameters())


@pytest.mark.parametrize("name", ["training_branch", "timm_vit", "gru"])
def test_default_statistics_subset_steps(name):
    """The library's default statistics (a subset pass in ``step()``) and exact ν: 5 steps, finite, decreasing."""
    torch._dynamo.reset()
    um = MODELS[name]
    model, batch = um.build(), um.batch()
    opt = kc.KFC(model, **kfc_options(um, generator=torch.Generator().manual_seed(MC_SEED)))
    assert opt.options.stats_fraction < 1 and opt.options.clip_curvature == "exact"
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        torch.manual_seed(SEED)
        loss = um.training_loss(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    torch.manual_seed(SEED)
    losses.append(um.training_loss(model, batch).item())
    assert all(math.isfinite(v) for v in losses), losses
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True)), losses
    assert all(s.running is not None for s in opt.layer_states())
    torch._dynamo.reset()


class LossInside(torch.nn.Module):
    """Computes its own loss from the targets, as HF models do with ``labels=``; returns a dict or a tuple."""

    def __init__(self, returns: str):
        super().__init__()
        self.returns = returns
        self.fc = torch.nn.Linear(6, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, x, y):
        f = self.head(torch.tanh(self.fc(x)))
        loss = torch.nn.functional.cross_entropy(f, y)
        return {"loss": loss, "logits": f} if self.returns == "dict" else (loss, f)


@pytest.mark.parametrize("frontend", ["fx", "dynamo"])
@pytest.mark.parametrize("returns", ["dict", "tuple"])
def test_model_computed_loss_feeds_fisher_from_logits(returns, frontend):
    """``out["loss"].backward()`` (a loss the model computed itself) starts the Fisher pass from the logits.

    The step-1 factors equal ``kc.curvature`` on the logits (float64, same MC draws).
    """
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = LossInside(returns).double()
    ref = copy.deepcopy(model)
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    opt = kc.KFC(model, lr=0.1, stats_fraction=1.0, clip_curvature="factored", frontend=frontend,
                 generator=torch.Generator().manual_seed(MC_SEED))
    out = model(x, y)
    (out["loss"] if returns == "dict" else out[0]).backward()
    opt.step()
    reference = kc.curvature(ref, "cross_entropy", (x, y), None, generator=torch.Generator().manual_seed(MC_SEED))
    assert sorted(reference) == ["fc", "head"]
    for name, f in reference.items():
        got = opt.layer_state(name).dense_factors()
        torch.testing.assert_close(got.A, f.A, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.G, f.G, rtol=1e-10, atol=1e-12)
        assert f.G.abs().max() > 0
    torch._dynamo.reset()
