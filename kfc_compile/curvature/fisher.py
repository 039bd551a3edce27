"""Which backward feeds Γ: output-space gradient vectors for the MC, empirical and type-2 Fisher.

The per-example loss ℓ_n is the batch loss's share of example n, scaled so that the batch loss is the mean
(reduction='mean') or the sum (reduction='sum') of the ℓ_n; with K loss terms per example (sequence positions
for cross-entropy over ``(N, C, d...)``, output elements for MSE/BCE) ℓ_n = c·Σ_k φ_k with c = 1/K for a mean,
1 for a sum. Each yielded vector v (shaped like the model output) is back-propagated once and Γ sums the outer
products of the resulting per-example gradients, so that Σ_v E[(Jᵀv)(Jᵀv)ᵀ] = Jᵀ ∇²ℓ_n J (type-2 exactly, MC in
expectation); ``empirical`` uses the true targets.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

FISHER_TYPES = ("mc", "empirical", "type-2")
LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce_with_logits": nn.BCEWithLogitsLoss}


@dataclass(frozen=True)
class LossSpec:
    """A supported loss: its kind and reduction."""

    kind: str  # one of LOSSES
    reduction: str  # "mean" or "sum"

    def terms_per_example(self, f: torch.Tensor) -> int:
        n = f.shape[0]
        k = f.numel() // n if n else 1
        return k // f.shape[1] if self.kind == "cross_entropy" and f.dim() > 1 else k

    def term_weight(self, f: torch.Tensor) -> float:
        """c in ℓ_n = c·Σ_k φ_k."""
        return 1.0 / self.terms_per_example(f) if self.reduction == "mean" else 1.0

    def per_example_scale(self, n_examples: int) -> float:
        """Factor turning the gradient of the batch loss into the gradient of the per-example loss."""
        return float(n_examples) if self.reduction == "mean" else 1.0

    def batch_loss(self, f: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return LOSSES[self.kind](reduction=self.reduction)(f, targets)


def check_fisher(fisher: str) -> str:
    if fisher not in FISHER_TYPES:
        raise ValueError(f"unknown fisher {fisher!r}: expected one of {FISHER_TYPES}")
    return fisher


def loss_spec(loss: str | nn.Module) -> LossSpec:
    """Validate a loss given as a name or as a torch loss module."""
    if isinstance(loss, str):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: expected one of {tuple(LOSSES)} or the matching nn.Module")
        return LossSpec(loss, "mean")
    for kind, cls in LOSSES.items():
        if type(loss) is cls:
            if loss.reduction not in ("mean", "sum"):
                raise ValueError(f"loss reduction {loss.reduction!r} is not supported: use 'mean' or 'sum'")
            if kind == "cross_entropy" and (loss.weight is not None or loss.label_smoothing != 0.0):
                raise ValueError("CrossEntropyLoss with class weights or label smoothing is not supported")
            if kind == "bce_with_logits" and (loss.weight is not None or loss.pos_weight is not None):
                raise ValueError("BCEWithLogitsLoss with weight or pos_weight is not supported")
            return LossSpec(kind, loss.reduction)
    raise ValueError(f"unsupported loss {type(loss).__name__}: expected one of "
                     f"{[c.__name__ for c in LOSSES.values()]} or a name in {tuple(LOSSES)}")


def _class_last(f: torch.Tensor) -> torch.Tensor:
    return f.movedim(1, -1) if f.dim() > 2 else f


def _class_first(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.movedim(-1, 1) if like.dim() > 2 else t


def sample_targets(spec: LossSpec, f: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Targets drawn from the model's predictive distribution (categorical, Gaussian with the loss's variance,
    Bernoulli)."""
    f = f.detach()
    if spec.kind == "cross_entropy":
        p = torch.softmax(_class_last(f).float(), dim=-1)
        flat = p.reshape(-1, p.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(p.shape[:-1])
    if spec.kind == "mse":  # φ = (f − y)² has Hessian 2: y ~ N(f, 1/2) makes E[∇φ∇φᵀ] = 2
        noise = torch.randn(f.shape, generator=generator, dtype=f.dtype, device=f.device)
        return f + math.sqrt(0.5) * noise
    return torch.bernoulli(torch.sigmoid(f), generator=generator)


def _term_grad(spec: LossSpec, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """∇_f φ for every term (not divided by anything)."""
    if spec.kind == "cross_entropy":
        fl = _class_last(f)
        g = torch.softmax(fl, dim=-1) - F.one_hot(y, fl.shape[-1]).to(f.dtype)
        return _class_first(g, f)
    if spec.kind == "mse":
        return 2.0 * (f - y)
    return torch.sigmoid(f) - y


def output_gradients(spec: LossSpec, fisher: str, f: torch.Tensor, targets: torch.Tensor | None = None,
                     mc_samples: int = 1, generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
    """Vectors to back-propagate from the model output ``f`` for one statistics step (see module docstring)."""
    check_fisher(fisher)
    f = f.detach()
    c = spec.term_weight(f)
    if fisher == "empirical":
        if targets is None:
            raise ValueError("fisher='empirical' needs the training targets")
        yield c * _term_grad(spec, f, targets)
    elif fisher == "mc":
        if mc_samples < 1:
            raise ValueError(f"mc_samples must be >= 1, got {mc_samples}")
        w = math.sqrt(c / mc_samples)
        for _ in range(mc_samples):
            yield w * _term_grad(spec, f, sample_targets(spec, f, generator))
    else:
        yield from _type2_vectors(spec, f, c)


def _type2_vectors(spec: LossSpec, f: torch.Tensor, c: float) -> Iterator[torch.Tensor]:
    """Columns of a square root of each term's output Hessian, one term at a time (no cross-term mixing)."""
    if spec.kind == "cross_entropy":
        fl = _class_last(f)
        p = torch.softmax(fl, dim=-1)
        terms = p.shape[1:-1]
        n_classes = p.shape[-1]
        eye = torch.eye(n_classes, dtype=f.dtype, device=f.device)
        for k in _indices(terms):
            pk = p[(slice(None), *k)]  # (N, C)
            for cls in range(n_classes):
                v = torch.zeros_like(fl)
                col = math.sqrt(c) * pk[:, cls : cls + 1].sqrt() * (eye[cls] - pk)
                v[(slice(None), *k)] = col
                yield _class_first(v, f)
        return
    if spec.kind == "mse":
        h = torch.full_like(f, 2.0)
    else:
        s = torch.sigmoid(f)
        h = s * (1 - s)
    flat_h = h.reshape(h.shape[0], -1)
    for j in range(flat_h.shape[1]):
        v = torch.zeros_like(flat_h)
        v[:, j] = (c * flat_h[:, j]).sqrt()
        yield v.reshape(f.shape)


def _indices(shape: torch.Size) -> Iterator[tuple[int, ...]]:
    if len(shape) == 0:
        yield ()
        return
    for flat in range(math.prod(shape)):
        idx = []
        for s in reversed(shape):
            idx.append(flat % s)
            flat //= s
        yield tuple(reversed(idx))
