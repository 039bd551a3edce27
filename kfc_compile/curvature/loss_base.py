"""The loss base class: what every supported loss knows (reduction, term weight c, term mask, Fisher products).

The conventions (per-example loss ℓ_n = c·Σ_k φ_k, term masks of visible labels) are those of ``losses.py``, which
holds the concrete losses and re-exports these names.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import ClassVar

import torch
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

    def term_weight(self, f: torch.Tensor, mask: torch.Tensor | None = None) -> float:
        """The term weight c in ℓ_n = c·Σ_k φ_k: 1/K for a mean (N/M over M real terms with a mask), 1 for a sum.

        A mask without any real term gives 0 (the batch-mean loss itself is NaN there).
        """
        if self.reduction != "mean":
            return 1.0
        if mask is None:
            return 1.0 / self.terms_per_example(f)
        real = int(mask.sum())
        return f.shape[0] / real if real else 0.0

    def term_mask(self, f: torch.Tensor, labels: torch.Tensor) -> torch.Tensor | None:
        """Which loss terms of the output ``f`` count, given the labels: None when all do (the default)."""
        return None

    def spread_mask(self, mask: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        """A term mask as a 0/1 tensor of f's dtype that broadcasts against ``f``."""
        return mask.to(f.dtype)

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

    def target_grad(self, f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """∇_f of every term of the training loss for its targets (the empirical Fisher's vector, before c).

        :meth:`term_grad` by default; cross-entropy applies label smoothing and zeroes ``ignore_index`` terms.
        """
        return self.term_grad(f, targets)

    @abstractmethod
    def hessian_sqrt_columns(self, f: torch.Tensor, c: float,
                             mask: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
        """Columns of a square root of each term's output Hessian times ``c``, one term at a time.

        There is no cross-term mixing; their outer products sum to c·∇²_f Σ_k φ_k (over the real terms of
        ``mask``: zero at the others).
        """

    @abstractmethod
    def _inner_sum(self, f: torch.Tensor, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ over examples and terms of ``uᵀ ∇²φ w`` (tensors already promoted to at least fp32)."""

    def fisher_inner(self, f: torch.Tensor, u: torch.Tensor, w: torch.Tensor, mask: torch.Tensor | None = None,
                     c: float | None = None) -> torch.Tensor:
        """Mean over examples of ``uₙᵀ Hₙ wₙ`` (a 0-d tensor, at least fp32) for output directions u, w.

        u and w have f's shape; Hₙ is the Hessian of the per-example loss ℓ_n w.r.t. example n's output (over the
        real terms of ``mask`` when given). ``c``: the term weight of ℓ_n (default :meth:`term_weight`; a leading
        subset of a batch passes the whole batch's).
        """
        dt = torch.promote_types(f.dtype, torch.float32)
        f, u, w = f.detach().to(dt), u.to(dt), w.to(dt)
        if mask is not None:
            m, same = self.spread_mask(mask, f), w is u
            u = u * m
            w = u if same else w * m
        n = f.shape[0]
        c = self.term_weight(f, mask) if c is None else c
        return self._inner_sum(f, u, w) * (c / max(n, 1))
