"""Library bugs the timm / HF sweeps found, each pinned by a test that failed before its fix.

* timm ``shvit_s1``: a Γ whose fp32 trace is a subnormal (a residual branch behind a BatchNorm with γ = 0) made the
  π split's ratio overflow fp32, so the Ω-side damping was inf and the Cholesky failed.
* Layers of a live registry (``torch.compile(m, backend="kfc")``, dynamo capture) join after ``kc.KFC`` was built:
  their statistics must be recorded in the block layout their running factors get (``max_factor_dim``, a memory
  budget's).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature.decompositions import DecompositionError, factored_inverses


def _spd(d: int, trace: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, 2 * d, dtype=torch.float64, generator=g)
    m = x @ x.T
    return m * (trace / m.trace())


def _reference(A: torch.Tensor, G: torch.Tensor, eta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The damped inverses of KFC Eqs. 20–22 in float64 (π = sqrt((tr Ω / dim Ω) / (tr Γ / dim Γ)))."""
    pi = ((A.trace() / A.shape[0]) / (G.trace() / G.shape[0])).sqrt()
    s = eta ** 0.5
    return (torch.linalg.inv(A + pi * s * torch.eye(A.shape[0], dtype=A.dtype)),
            torch.linalg.inv(G + s / pi * torch.eye(G.shape[0], dtype=G.dtype)))


@pytest.mark.parametrize("g_trace", [3.5e-40, 1e-44, 1.0])
def test_pi_split_of_fp32_factors_with_a_subnormal_trace(g_trace):
    A64, G64 = _spd(6, 2.0, 0), _spd(4, g_trace, 1)
    A, G = A64.float(), G64.float()
    assert G.trace() > 0
    assert bool(torch.isinf(A.trace() / G.trace())) == (g_trace < 1e-38)  # the fp32 ratio overflows
    Ainv, Ginv, ca = factored_inverses(A[None], G[None], 0.1, name="conv")
    ref_a, ref_g = _reference(A.double(), G.double(), 0.1)  # the fp32 factors, inverted exactly in float64
    assert Ainv.dtype == torch.float32 and bool(torch.isfinite(Ainv).all()) and bool(torch.isfinite(Ginv).all())
    torch.testing.assert_close(Ainv[0].double(), ref_a, rtol=1e-4, atol=ref_a.abs().max().item() * 1e-5)
    torch.testing.assert_close(Ginv[0].double(), ref_g, rtol=1e-4, atol=ref_g.abs().max().item() * 1e-5)


def test_pi_split_outside_the_dtype_range_is_a_decomposition_error():
    """π itself not representable in fp32 (traces 1e35 and 1e-44 apart): reported, never an inf damping."""
    A, G = (_spd(3, 1e35, 2).float(), _spd(3, 1e-44, 3).float())
    with pytest.raises(DecompositionError, match="outside the torch.float32 range"):
        factored_inverses(A[None], G[None], 0.1, name="conv")


@pytest.fixture
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 300), nn.Tanh(), nn.Linear(300, 5)).double()


def _trajectory(model, runner, steps: int = 3, **opts):
    opt = kc.KFC(runner, lr=0.1, damping=0.1, fisher="type-2", stats_fraction=1.0, max_factor_dim=256, **opts)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (16,), generator=g)
    for _ in range(steps):
        nn.functional.cross_entropy(runner(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], opt


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.filterwarnings("ignore:memory_budget=")
@pytest.mark.parametrize("budget", [None, 2_500_000])
def test_layers_of_a_live_registry_record_statistics_in_their_layout(budget):
    """Layers that join after ``kc.KFC`` was built (kfc backend) record in the layout their factors get.

    With a memory budget that re-blocks the wide factors, the statistics used to be recorded with
    ``max_factor_dim``'s blocks and the first inverse failed on the mismatch; the fx twin (layers known at once) is
    the reference: the same layouts, factors and trajectory.
    """
    ref_model = _wide_mlp()
    ref, ref_opt = _trajectory(ref_model, ref_model, memory_budget=budget)
    model = _wide_mlp()
    got, opt = _trajectory(model, torch.compile(model, backend="kfc", options={"inner": "eager"}),
                              memory_budget=budget)
    for name in ("0", "2"):
        want = ref_opt._estimator.layer_state(name)
        have = opt._estimator.layer_state(name)
        assert have.layout == want.layout
        torch.testing.assert_close(have.running.A, want.running.A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(have.running.G, want.running.G, rtol=1e-12, atol=1e-14)
    if budget is not None:  # the budget re-blocked a factor below max_factor_dim's blocks
        assert any(ref_opt._estimator.layer_state(n).layout.a_blocks > 2 or
                   ref_opt._estimator.layer_state(n).layout.g_blocks > 2 for n in ("0", "2"))
    for p, q in zip(got, ref, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


class TinyLM(nn.Module):
    """An HF-style causal LM: keyword inputs, ``labels=`` → a ``CausalLMOutput`` with the shifted loss and logits."""

    def __init__(self, vocab: int = 11):
        super().__init__()
        self.emb = nn.Embedding(vocab, 6)
        self.fc = nn.Linear(6, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, input_ids, attention_mask=None, labels=None):
        from transformers.modeling_outputs import CausalLMOutput

        h = torch.tanh(self.fc(self.emb(input_ids)))
        if attention_mask is not None:
            h = h * attention_mask.unsqueeze(-1)
        logits = self.head(h)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        return CausalLMOutput(loss=loss, logits=logits)


def _lm_step(wrap: str, own: bool):
    """One KFC step (MC Fisher in the user's pass) on the model's own loss or the zoo's objective."""
    from kfc_compile.tools.zoo.cases import Case

    case = Case(name="tiny", family="causal-lm", build=None, inputs=None, loss=kc.CrossEntropy(class_dim=-1),
                output=lambda out: out.logits[:, :-1], labels="labels")
    torch.manual_seed(0)
    model = TinyLM().double().train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 11, (6, 5), generator=g)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids).double(), "labels": ids}
    runner = torch.compile(model, backend="kfc", options={"inner": "eager"}) if wrap == "compiled" else model
    opt = kc.KFC(runner, lr=0.01, damping=0.1, loss=case.loss, output=case.output, fisher="mc", stats_fraction=1.0,
                 generator=torch.Generator().manual_seed(5), clip=None,
                 **({"frontend": "dynamo"} if wrap == "captured" else {}))
    out = runner(**kwargs)
    loss = case.training_loss(out, ids[:, 1:], kwargs) if own else case.objective(out, ids[:, 1:])
    assert (loss is out.loss) == own
    torch.testing.assert_close(out.loss, case.objective(out, ids[:, 1:]), rtol=1e-12, atol=0)
    loss.backward()
    opt.step()
    return {s.layer.name: s.running for s in opt._estimator.states}


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("wrap", ["captured", "compiled"])
def test_an_in_model_loss_gives_the_statistics_of_the_logits_loss(wrap):
    """HF ``labels=`` → ``out.loss``: its backward starts the Fisher pass (MC, in the user's pass) from the logits.

    The factors equal those of the same step back-propagating the objective on the selected logits (the same MC
    samples), for dynamo capture and ``torch.compile(backend="kfc")``; so the zoo trains on the model's own loss.
    """
    own, ref = _lm_step(wrap, own=True), _lm_step(wrap, own=False)
    assert set(ref) == {"fc", "head"} and set(own) == set(ref)
    for name, r in ref.items():
        assert own[name] is not None, f"{name} got no statistics from out.loss"
        torch.testing.assert_close(own[name].A, r.A, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(own[name].G, r.G, rtol=1e-12, atol=1e-15)


class GatherLoss(nn.Module):
    """DeBERTa-v2's pattern: the in-model loss saves the logits themselves for its backward (``torch.gather``)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)

    def forward(self, x, labels=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        logits = self.fc(x)
        loss = None
        if labels is not None:
            picked = torch.gather(logits, 1, labels[:, None])
            loss = (torch.logsumexp(logits, -1, keepdim=True) - picked).mean()
        return SequenceClassifierOutput(loss=loss, logits=logits)


@pytest.mark.usefixtures("_fresh_dynamo")
@pytest.mark.parametrize("fisher", ["mc", "type-2"])
def test_an_in_model_loss_that_saved_the_logits(fisher):
    """A backward from such a loss works, and gives the factors of a backward from the same loss on the logits."""
    factors = []
    for own in (True, False):
        torch.manual_seed(0)
        model = GatherLoss().double()
        opt = kc.KFC(model, lr=0.1, fisher=fisher, stats_fraction=1.0, frontend="dynamo",
                     generator=torch.Generator().manual_seed(1))
        x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 4, (8,))
        out = model(x, labels=y if own else None)
        (out.loss if own else F.cross_entropy(out.logits, y)).backward()
        opt.step()
        factors.append(opt.factors("fc"))
    assert factors[0] is not None
    torch.testing.assert_close(factors[0].A, factors[1].A, rtol=1e-12, atol=0)
    torch.testing.assert_close(factors[0].G, factors[1].G, rtol=1e-12, atol=0)
