"""Supported losses as classes, and which backward feeds Γ (the MC, empirical and type-2 Fisher).

The per-example loss ℓ_n is the batch loss's share of example n, scaled so that the batch loss is the mean
(reduction='mean') or the sum (reduction='sum') of the ℓ_n; with K loss terms per example (positions for
cross-entropy over ``(N, C, d...)``, output elements for MSE/BCE) ℓ_n = c·Σ_k φ_k with c = 1/K for a mean,
1 for a sum. Each vector v that :func:`output_gradients` yields (shaped like the model output) is back-propagated
once and Γ sums the outer products of the resulting per-example gradients, so that Σ_v E[(Jᵀv)(Jᵀv)ᵀ] =
Jᵀ ∇²ℓ_n J (type-2 exactly, MC in expectation); ``empirical`` uses the true targets.

Every loss is an exponential-family negative log-likelihood of the model output, so its output Hessian H is also
the output-space Fisher, used for the exact Fisher products of ``optim/fvp.py`` (:meth:`Loss.fisher_inner`):

* cross-entropy: ``c·(diag(p) − p pᵀ)`` per loss term,
* MSE: ``2c·I``,
* BCE with logits: ``c·σ(1−σ)`` elementwise.

The public names are ``CrossEntropy``, ``MSE`` and ``BCEWithLogits``; :func:`loss_spec` also accepts their
string names and the matching ``torch.nn`` loss modules.
"""
from __future__ import annotations

import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

FISHER_TYPES = ("mc", "empirical", "type-2")
REDUCTIONS = ("mean", "sum")


class NonFiniteOutputError(FloatingPointError):
    """The model output has inf/NaN entries: no Fisher targets or output gradients can be drawn from it."""


class Loss(ABC):
    """A supported loss with its reduction.

    Subclasses (frozen dataclasses) know the loss's sampling, gradient and Hessian.
    """

    name: ClassVar[str]  # the public string name
    module: ClassVar[type[nn.Module]]  # the matching torch loss module
    reduction: str  # "mean" or "sum": a dataclass field of every subclass

    def __post_init__(self) -> None:
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"loss reduction {self.reduction!r} is not supported: use 'mean' or 'sum'")

    @classmethod
    def from_module(cls, loss: nn.Module) -> Loss:
        """The loss for an instance of :attr:`module`, rejecting the options the Fisher does not model."""
        return cls(reduction=loss.reduction)

    def terms_per_example(self, f: torch.Tensor) -> int:
        """K: loss terms per example of the output ``f`` (dim 0 is the batch)."""
        n = f.shape[0]
        return f.numel() // n if n else 1

    def term_weight(self, f: torch.Tensor) -> float:
        """The term weight c in ℓ_n = c·Σ_k φ_k: 1/K for a mean, 1 for a sum."""
        return 1.0 / self.terms_per_example(f) if self.reduction == "mean" else 1.0

    def per_example_scale(self, n_examples: int) -> float:
        """Factor turning the gradient of the batch loss into the gradient of the per-example loss."""
        return float(n_examples) if self.reduction == "mean" else 1.0

    def batch_loss(self, f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The batch loss, as the torch loss module computes it."""
        return self.module(reduction=self.reduction)(f, targets)

    def __call__(self, f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """:meth:`batch_loss`, so that an instance can serve as the training loss (e.g. ``compile_step``'s)."""
        return self.batch_loss(f, targets)

    @abstractmethod
    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Targets drawn from the model's predictive distribution at the output ``f``."""

    @abstractmethod
    def term_grad(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """∇_f φ of every term for the targets ``y`` (shaped like ``f``, not divided by anything)."""

    @abstractmethod
    def hessian_sqrt_columns(self, f: torch.Tensor, c: float) -> Iterator[torch.Tensor]:
        """Columns of a square root of each term's output Hessian times ``c``, one term at a time.

        There is no cross-term mixing; their outer products sum to c·∇²_f Σ_k φ_k.
        """

    @abstractmethod
    def _inner_sum(self, f: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ over examples and terms of ``uᵀ ∇²φ w`` (tensors already promoted to at least fp32)."""

    def fisher_inner(self, f: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Mean over examples of ``uₙᵀ Hₙ wₙ`` (a 0-d tensor, at least fp32) for output directions u, w.

        u and w have f's shape; Hₙ is the Hessian of the per-example loss ℓ_n w.r.t. example n's output.
        """
        dt = torch.promote_types(f.dtype, torch.float32)
        f, u, w = f.detach().to(dt), u.to(dt), w.to(dt)
        n = f.shape[0]
        return self._inner_sum(f, u, w) * (self.term_weight(f) / max(n, 1))


@dataclass(frozen=True)
class CrossEntropy(Loss):
    """Softmax cross-entropy over the logits' ``class_dim``.

    ``class_dim`` is 1 as in ``nn.CrossEntropyLoss``; negative values count from the end, e.g. -1 for
    language-model logits (B, T, V) with targets (B, T). Every other non-batch position is one loss term.
    """

    name: ClassVar[str] = "cross_entropy"
    module: ClassVar[type[nn.Module]] = nn.CrossEntropyLoss
    class_dim: int = 1
    reduction: str = "mean"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.class_dim, bool) or not isinstance(self.class_dim, int):
            raise TypeError(f"class_dim must be an int, got {self.class_dim!r}")

    @classmethod
    def from_module(cls, loss: nn.Module) -> Loss:
        """Also rejects class weights and label smoothing (not the model's likelihood)."""
        spec = super().from_module(loss)
        if loss.weight is not None or loss.label_smoothing != 0.0:

            raise ValueError("CrossEntropyLoss with class weights or label smoothing is not supported")
        return spec

    def _dim(self, f: torch.Tensor) -> int:
        """The class dimension of ``f`` as a non-negative index (0 for a 1-D ``f``)."""
        nd = f.dim()
        if not -nd <= self.class_dim < nd:
            raise ValueError(f"class_dim={self.class_dim} is out of range for logits of shape {tuple(f.shape)}")
        d = self.class_dim % nd
        if d == 0 and nd > 1:
            raise ValueError(f"class_dim={self.class_dim} is the batch dimension of logits of shape "
                             f"{tuple(f.shape)}")
        return d

    def _class_last(self, f: torch.Tensor) -> torch.Tensor:
        return f.movedim(self._dim(f), -1)

    def _class_back(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`_class_last` for a tensor shaped like ``like`` with its class dim last."""
        return t.movedim(-1, self._dim(like))

    def terms_per_example(self, f: torch.Tensor) -> int:
        """One term per position: the output elements of an example over its number of classes."""
        k = super().terms_per_example(f)
        return k // f.shape[self._dim(f)] if f.dim() > 1 else k

    def batch_loss(self, f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``nn.CrossEntropyLoss`` with the class dim moved to 1."""
        return F.cross_entropy(f.movedim(self._dim(f), 1) if f.dim() > 1 else f, targets, reduction=self.reduction)

    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Class indices drawn from the softmax (in fp32), shaped like ``f`` without its class dim."""
        p = torch.softmax(self._class_last(f.detach()).float(), dim=-1)
        flat = p.reshape(-1, p.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(p.shape[:-1])

    def term_grad(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """softmax(f) − onehot(y) along the class dim."""
        fl = self._class_last(f)
        g = torch.softmax(fl, dim=-1) - F.one_hot(y, fl.shape[-1]).to(f.dtype)
        return self._class_back(g, f)

    def hessian_sqrt_columns(self, f: torch.Tensor, c: float) -> Iterator[torch.Tensor]:
        """Per term, sqrt(c·p_j)·(e_j − p) for every class j: Σ_j of their outer products is c·(diag p − p pᵀ)."""
        fl = self._class_last(f)
        p = torch.softmax(fl, dim=-1)
        n_classes = p.shape[-1]
        eye = torch.eye(n_classes, dtype=f.dtype, device=f.device)
        for k in itertools.product(*map(range, p.shape[1:-1])):
            pk = p[(slice(None), *k)]  # (N, C)
            for cls in range(n_classes):
                v = torch.zeros_like(fl)
                v[(slice(None), *k)] = math.sqrt(c) * pk[:, cls : cls + 1].sqrt() * (eye[cls] - pk)
                yield self._class_back(v, f)

    def _inner_sum(self, f: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # Σ_c p_c (u_c − ū)(w_c − w̄) with ū = Σ_c p_c u_c: = uᵀ(diag p − p pᵀ)w without the cancellation of
        # Σ p u w − (Σ p u)(Σ p w), which loses everything in fp32 once ‖u‖ is large
        d = self._dim(f)
        p = torch.softmax(f, dim=d)
        uc = u - (p * u).sum(d, keepdim=True)
        wc = uc if w is u else w - (p * w).sum(d, keepdim=True)
        return (p * uc * wc).sum()


class _Elementwise(Loss):
    """A loss with one term per output element and a diagonal output Hessian."""

    @abstractmethod
    def hessian_diagonal(self, f: torch.Tensor) -> torch.Tensor:
        """∇²φ of every element's term (shaped like ``f``)."""

    def hessian_sqrt_columns(self, f: torch.Tensor, c: float) -> Iterator[torch.Tensor]:
        """One column per output coordinate: sqrt(c·h) at that coordinate, 0 elsewhere."""
        flat_h = self.hessian_diagonal(f).reshape(f.shape[0], -1)
        for j in range(flat_h.shape[1]):
            v = torch.zeros_like(flat_h)
            v[:, j] = (c * flat_h[:, j]).sqrt()
            yield v.reshape(f.shape)


@dataclass(frozen=True)
class MSE(_Elementwise):
    """Squared error φ = (f − y)² per output element (``nn.MSELoss``)."""

    name: ClassVar[str] = "mse"
    module: ClassVar[type[nn.Module]] = nn.MSELoss
    reduction: str = "mean"

    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Targets y ~ N(f, 1/2): φ = (f − y)² has Hessian 2, and E[∇φ∇φᵀ] = 4·Var(y) = 2."""
        f = f.detach()
        noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        return f + math.sqrt(0.5) * noise

    def term_grad(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """2·(f − y)."""
        return 2.0 * (f - y)

    def hessian_diagonal(self, f: torch.Tensor) -> torch.Tensor:
        """2 everywhere."""
        return torch.full_like(f, 2.0)

    def _inner_sum(self, f: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return 2.0 * (u * w).sum()


@dataclass(frozen=True)
class BCEWithLogits(_Elementwise):
    """Binary cross-entropy on logits per output element (``nn.BCEWithLogitsLoss``)."""

    name: ClassVar[str] = "bce_with_logits"
    module: ClassVar[type[nn.Module]] = nn.BCEWithLogitsLoss
    reduction: str = "mean"

    @classmethod
    def from_module(cls, loss: nn.Module) -> Loss:
        """Also rejects weight and pos_weight (not the model's likelihood)."""
        spec = super().from_module(loss)
        if loss.weight is not None or loss.pos_weight is not None:
            raise ValueError("BCEWithLogitsLoss with weight or pos_weight is not supported")
        return spec

    def sample(self, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bernoulli(σ(f)) targets."""
        return torch.bernoulli(torch.sigmoid(f.detach()), generator=generator)

    def term_grad(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """σ(f) − y."""
        return torch.sigmoid(f) - y

    def hessian_diagonal(self, f: torch.Tensor) -> torch.Tensor:
        """σ(f)·(1 − σ(f))."""
        s = torch.sigmoid(f)
        return s * (1 - s)

    def _inner_sum(self, f: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (self.hessian_diagonal(f) * u * w).sum()


LOSS_KINDS: dict[str, type[Loss]] = {k.name: k for k in (CrossEntropy, MSE, BCEWithLogits)}
LOSSES: dict[str, type[nn.Module]] = {name: kind.module for name, kind in LOSS_KINDS.items()}


def loss_spec(loss: str | nn.Module | Loss) -> Loss:
    """Validate a loss given as a name, a torch loss module or a :class:`Loss`, and return it as a :class:`Loss`.

    Raises:
        ValueError: for an unknown name, an unsupported module, or a module option (reduction 'none', class
            weights, label smoothing, pos_weight) that the Fisher does not model.
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        if loss not in LOSS_KINDS:
            raise ValueError(f"unknown loss {loss!r}: expected one of {tuple(LOSSES)} or the matching nn.Module")
        return LOSS_KINDS[loss]()
    for kind in LOSS_KINDS.values():
        if type(loss) is kind.module:
            return kind.from_module(loss)
    raise ValueError(f"unsupported loss {type(loss).__name__}: expected one of "
                     f"{[c.__name__ for c in LOSSES.values()]} or a name in {tuple(LOSSES)}")


def check_fisher(fisher: str) -> str:
    """``fisher`` itself if it is one of :data:`FISHER_TYPES`; raises ValueError otherwise."""
    if fisher not in FISHER_TYPES:
        raise ValueError(f"unknown fisher {fisher!r}: expected one of {FISHER_TYPES}")
    return fisher


def output_gradients(spec: Loss, fisher: str, f: torch.Tensor, targets: torch.Tensor | None = None,
                     mc_samples: int = 1, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Vectors to back-propagate from the model output ``f`` for one statistics step (see module docstring).

    Args:
        spec: the loss.
        fisher: one of :data:`FISHER_TYPES`.
        f: the model output (detached here).
        targets: the training targets (needed by ``"empirical"`` only).
        mc_samples: sampled targets per example for ``"mc"``.
        generator: random generator for the ``"mc"`` samples (None: the global RNG).

    Yields:
        Tensors shaped like ``f``: 1 for empirical, ``mc_samples`` for mc, one per output coordinate for type-2.

    Raises:
        NonFiniteOutputError: ``f`` has inf/NaN entries (checked before anything is sampled: ``torch.multinomial``
            and ``torch.bernoulli`` would fail on the probabilities, and the gradients would be NaN).
    """
    check_fisher(fisher)
    f = f.detach()
    if not bool(torch.isfinite(f).all()):
        bad = int((~torch.isfinite(f)).reshape(f.shape[0], -1).any(1).sum()) if f.dim() else 1
        raise NonFiniteOutputError(f"the model output has inf/NaN entries ({bad} of {f.shape[0] if f.dim() else 1} "
                                   "examples): no Fisher targets can be drawn from it")
    c = spec.term_weight(f)
    if fisher == "empirical":
        if targets is None:
            raise ValueError("fisher='empirical' needs the training targets")
        yield c * spec.term_grad(f, targets)
    elif fisher == "mc":
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        w = math.sqrt(c / mc_samples)
        for _ in range(mc_samples):
            yield w * spec.term_grad(f, spec.sample(f, generator))
    else:
        yield from spec.hessian_sqrt_columns(f, c)
