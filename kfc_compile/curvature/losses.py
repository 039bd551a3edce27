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

Where the labels are visible (docs/algorithm.md §3.1), a *term mask* (True for a loss term that counts, False
for a cross-entropy position labelled ``ignore_index``) restricts everything to the real terms: ℓ_n = c·Σ_{k real}
φ_k with c = N/M for a mean over the M real terms of the batch (what ``F.cross_entropy(..., ignore_index=...)``
divides by), and the output vectors, Hessian columns and Fisher inner products are zero at the ignored terms.

The public names are ``CrossEntropy``, ``MSE`` and ``BCEWithLogits``; :func:`loss_spec` also accepts their
string names and the matching ``torch.nn`` loss modules.
"""
from __future__ import annotations

import itertools
import math
from abc import abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from kfc_compile.curvature.loss_base import FISHER_TYPES, REDUCTIONS, Loss, NonFiniteOutputError

__all__ = ["FISHER_TYPES", "REDUCTIONS", "LOSSES", "LOSS_KINDS", "BCEWithLogits", "CrossEntropy", "Loss", "MSE",
           "NonFiniteOutputError", "check_fisher", "loss_spec", "output_gradients"]


@dataclass(frozen=True)
class CrossEntropy(Loss):
    """Softmax cross-entropy over the logits' ``class_dim``, as ``F.cross_entropy`` with the same options.

    ``class_dim`` is 1 as in ``nn.CrossEntropyLoss``; negative values count from the end, e.g. -1 for
    language-model logits (B, T, V) with targets (B, T). Every other non-batch position is one loss term.
    Positions labelled ``ignore_index`` are no loss terms where the labels are visible (docs/algorithm.md §3.1).
    ``label_smoothing`` ε: targets q = (1 − ε)·onehot(y) + ε/C, whose loss Σ_k q_k(−log p_k) has the output
    Hessian (Σ_k q_k)(diag p − p pᵀ) = diag p − p pᵀ, so the MC and type-2 Fisher are those of ε = 0; the
    empirical Fisher uses the smoothed gradient p − q.
    """

    name: ClassVar[str] = "cross_entropy"
    module: ClassVar[type[nn.Module]] = nn.CrossEntropyLoss
    class_dim: int = 1
    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.class_dim, bool) or not isinstance(self.class_dim, int):
            raise TypeError(f"class_dim must be an int, got {self.class_dim!r}")
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int (the label of positions without a loss term, -100 by "
                            f"default), got {self.ignore_index!r}")
        eps = self.label_smoothing
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 <= eps < 1.0:
            raise ValueError(f"label_smoothing must be a float in [0, 1), got {eps!r}")

    @classmethod
    def from_module(cls, loss: nn.Module) -> Loss:
        """Maps ``ignore_index`` and ``label_smoothing``; rejects class weights (not the model's likelihood)."""
        if loss.weight is not None:
            raise ValueError("CrossEntropyLoss with class weights is not supported: the weighted loss is not the "
                             "model's likelihood; use CrossEntropyLoss() without weight=")
        return cls(ignore_index=loss.ignore_index, reduction=loss.reduction, label_smoothing=loss.label_smoothing)

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
        """``nn.CrossEntropyLoss`` with the class dim moved to 1 (and this spec's ignore_index, label smoothing)."""
        return F.cross_entropy(f.movedim(self._dim(f), 1) if f.dim() > 1 else f, targets, reduction=self.reduction,
                               ignore_index=self.ignore_index, label_smoothing=self.label_smoothing)

    def term_mask(self, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """``labels != ignore_index`` (f's shape without the class dim); None when no position is ignored.

        Raises:
            ValueError: the labels are not shaped like ``f`` without its class dim.
        """
        terms = self._class_last(f).shape[:-1] if f.dim() > 1 else f.shape[:1]
        if tuple(labels.shape) != tuple(terms):
            raise ValueError(f"labels of shape {tuple(labels.shape)} do not match logits of shape {tuple(f.shape)} "
                             f"with class_dim={self.class_dim}: expected {tuple(terms)}")
        mask = labels.to(f.device) != self.ignore_index
        return None if bool(mask.all()) else mask

    def spread_mask(self, mask: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """The term mask with the class dim inserted."""
        return mask.to(f.dtype).unsqueeze(self._dim(f)) if f.dim() > 1 else mask.to(f.dtype)

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

    def target_grad(self, f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The smoothed gradient p − q, q = (1 − ε)·onehot(y) + ε/C; zero where y is ``ignore_index``."""
        fl = self._class_last(f)
        real = targets != self.ignore_index
        y = torch.where(real, targets, torch.zeros_like(targets))
        n_classes = fl.shape[-1]
        q = F.one_hot(y, n_classes).to(f.dtype) * (1.0 - self.label_smoothing) + self.label_smoothing / n_classes
        g = (torch.softmax(fl, dim=-1) - q) * real.unsqueeze(-1).to(f.dtype)
        return self._class_back(g, f)

    def hessian_sqrt_columns(self, f: torch.Tensor, c: float,
                             mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Per term, sqrt(c·p_j)·(e_j − p) for every class j: Σ_j of their outer products is c·(diag p − p pᵀ).

        Rows of examples whose term is masked out are zero; a term position masked in every example is skipped.
        """
        fl = self._class_last(f)
        p = torch.softmax(fl, dim=-1)
        n_classes = p.shape[-1]
        eye = torch.eye(n_classes, dtype=f.dtype, device=f.device)
        for k in itertools.product(*map(range, p.shape[1:-1])):
            pk = p[(slice(None), *k)]  # (N, C)
            real = None if mask is None else mask[(slice(None), *k)].to(f.dtype).unsqueeze(-1)  # (N, 1)
            if real is not None and not bool(real.any()):
                continue
            for cls in range(n_classes):
                v = torch.zeros_like(fl)
                col = math.sqrt(c) * pk[:, cls : cls + 1].sqrt() * (eye[cls] - pk)
                v[(slice(None), *k)] = col if real is None else col * real
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

    def hessian_sqrt_columns(self, f: torch.Tensor, c: float,
                             mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """One column per output coordinate: sqrt(c·h) at that coordinate, 0 elsewhere (these losses have no mask)."""
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
            weights, pos_weight) that the Fisher does not model.
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
                     mc_samples: int = 1, generator: torch.Generator | None = None,
                     mask: torch.Tensor | None = None, c: float | None = None) -> Iterator[torch.Tensor]:
    """Vectors to back-propagate from the model output ``f`` for one statistics step (see module docstring).

    Args:
        spec: the loss.
        fisher: one of :data:`FISHER_TYPES`.
        f: the model output (detached here).
        targets: the training targets (needed by ``"empirical"`` only).
        mc_samples: sampled targets per example for ``"mc"``.
        generator: random generator for the ``"mc"`` samples (None: the global RNG).
        mask: the term mask of the visible labels (``spec.term_mask``; None: every term counts). For
            ``"empirical"`` it defaults to that of ``targets``.
        c: the term weight of ℓ_n (default ``spec.term_weight(f, mask)``; a leading subset of a batch passes
            the whole batch's, so that ℓ_n is the batch's per-example loss).

    Yields:
        Tensors shaped like ``f``: 1 for empirical, ``mc_samples`` for mc, one per output coordinate for type-2
        (one per real term position's coordinate with a mask), all zero at the masked terms; nothing when the
        mask has no real term.

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
    if fisher == "empirical" and targets is None:
        raise ValueError("fisher='empirical' needs the training targets")
    if fisher == "mc" and mc_samples < 1:
        raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
    if mask is None and fisher == "empirical":
        mask = spec.term_mask(f, targets)
    c = spec.term_weight(f, mask) if c is None else c
    if c == 0.0 or (mask is not None and not bool(mask.any())):  # no real term: the loss does not depend on the output
        return
    if fisher == "empirical":
        yield c * spec.target_grad(f, targets)
    elif fisher == "mc":
        w = math.sqrt(c / mc_samples)
        m = None if mask is None else spec.spread_mask(mask, f)
        for _ in range(mc_samples):
            v = w * spec.term_grad(f, spec.sample(f, generator))
            yield v if m is None else v * m
    else:
        yield from spec.hessian_sqrt_columns(f, c, mask)
