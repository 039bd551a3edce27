"""Factor state: one (Ω, Γ) pair per weight parameter, in the paper's scaling.

``BatchStatistics`` accumulates raw sums over one statistics step (all sites of a layer, all backward passes of
the Fisher estimator) and normalises them; ``RunningFactors`` keeps the moving average with
ε = min(1 − 1/k, decay) (K-FAC).

Scaling (kfc_spec.md §2.3, design.md §3), with N examples and T positions (all uses of the weight together):

* expand (= KFC): Ω = (1/N) Σ_{n,t} x̄ x̄ᵀ (so Ω's bias-bias entry is T), Γ = 1/(N·T) Σ_{n,t} g gᵀ;
* reduce:        Ω = (1/N) Σ_n x̃_n x̃_nᵀ with x̃_n the mean of x̄ over positions, Γ = (1/N) Σ_n (Σ_t g)(Σ_t g)ᵀ;

where g is the gradient of the *per-example* loss. Factors are stored stacked per group, ``(groups, d, d)``, or,
for a side with ``a_blocks``/``g_blocks`` > 1, as that many diagonal blocks per group (``blocks.py``): the
rows (patches with their ones coordinate, or output gradients) are then split into blocks before the products.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

import triton_kernels as tk
from kfc_compile.curvature import blocks as bl


class Factors(NamedTuple):
    """Ω (``A``) and Γ (``G``) of one layer; 2-D for ungrouped layers, stacked ``(groups, d, d)`` otherwise.

    ``kron(G, A)`` is the approximate Fisher block of the per-example loss for the row-major ``[W | b]``.
    """

    A: torch.Tensor
    G: torch.Tensor


def public_view(t: torch.Tensor) -> torch.Tensor:
    """Drop the group dimension of an ungrouped layer's factor."""
    return t[0] if t.shape[0] == 1 else t


@dataclass
class BatchStatistics:
    """Raw sums of one statistics step for one layer (see module docstring for the normalisation)."""

    groups: int
    a_dim: int  # Ω size per group, bias coordinate included
    g_dim: int
    has_bias: bool
    approx: str
    dtype: torch.dtype
    device: torch.device
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    g_rows: int = 0  # N·T of the last completed Γ pass
    _rows: int = 0  # rows seen in the current pass
    _a_pending: torch.Tensor | None = None  # reduce: per-example sums, (N, groups, a_dim)
    _a_positions: int = 0
    _g_pending: torch.Tensor | None = None  # reduce: per-example sums of g, (N, groups, g_dim)
    _a_pass_open: bool = False
    # moving average in the epilogue (expand): (running Ω, ε, (1 − ε)/n) — the kernels then write
    # Ω ← ε·Ω + (1 − ε)/n · Σ x̄x̄ᵀ straight into the running factor, with no accumulator and no averaging pass
    ema: tuple[torch.Tensor, float, float] | None = None
    a_is_average: bool = False
    a_blocks: int = 1  # diagonal blocks per group of Ω / Γ (1: dense)
    g_blocks: int = 1

    def _new(self, d: int, k: int = 1) -> torch.Tensor:
        b = bl.block_size(d, k)
        return torch.empty(self.groups * k, b, b, dtype=self.dtype, device=self.device)

    def _blocked_update(self, F: torch.Tensor, rows: torch.Tensor, k: int, d: int, alpha: float,
                        beta: float) -> None:
        """F ← beta·F + alpha·(diagonal blocks of rowsᵀrows); rows (groups, M, ≤ d) of any float dtype (the
        kernel upcasts), zero-padded to d; one block (k = 1) is the plain syrk update."""
        if rows.shape[-1] < d:
            rows = torch.nn.functional.pad(rows, (0, d - rows.shape[-1]))
        tk.syrk_update_(F, bl.block_rows(rows, k), alpha=alpha, beta=beta)

    def add_input(self, site, x: torch.Tensor) -> None:
        """Add one site's input contribution to Ω (expand: outer products; reduce: per-example sums)."""
        ones = site.has_bias
        if self.approx == "expand":
            target_dim = site.a_dim + ones
            alpha, beta = 1.0, 1.0
            if self.A is None:
                if self.ema is not None:
                    self.A, beta, alpha = self.ema
                    self.a_is_average = True
                else:
                    self.A = self._new(self.a_dim, self.a_blocks)
                    self.A.zero_()
            elif self.a_is_average:
                alpha = self.ema[2]
            if self.a_blocks > 1:  # explicit patches with their ones coordinate (0 for a bias-free use)
                rows = site.input_rows(x)
                if ones:
                    rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
                self._blocked_update(self.A, rows, self.a_blocks, self.a_dim, alpha, beta)
            elif target_dim == self.a_dim:
                site.accumulate_input_cov(self.A, x, alpha=alpha, beta=beta, ones=ones)
            else:  # a bias-free use of a weight whose other uses have a bias: the bias coordinate is 0 here
                if beta != 1.0:
                    self.A.mul_(beta)
                part = self._new(target_dim)
                site.accumulate_input_cov(part, x, alpha=alpha, beta=0.0, ones=ones)
                self.A[:, :target_dim, :target_dim] += part
        else:
            sums = site.input_sums(x).to(self.dtype)  # (N, groups, a_in)
            t = site.positions(x)
            pad = self.a_dim - sums.shape[-1]
            if pad:
                extra = sums.new_full((*sums.shape[:-1], pad), float(t) if ones else 0.0)
                sums = torch.cat([sums, extra], dim=-1)
            self._a_pending = sums if self._a_pending is None else self._a_pending + sums
            self._a_positions += t
        self._a_pass_open = True

    def add_output_grad(self, site, gy: torch.Tensor, scale: float) -> None:
        """Add one site's output-gradient contribution to Γ; ``scale`` maps the backward's gradient to the
        per-example loss's gradient (e.g. N for a batch-mean loss)."""
        self._rows += gy.numel() // (site.g_dim * site.groups)
        if self.approx == "expand":
            if self.G is None:
                self.G = self._new(self.g_dim, self.g_blocks)
                self.G.zero_()
            self._blocked_update(self.G, site.output_rows(gy), self.g_blocks, self.g_dim, scale * scale, 1.0)
        else:
            sums = site.output_sums(gy).to(self.dtype) * scale
            self._g_pending = sums if self._g_pending is None else self._g_pending + sums

    def end_pass(self) -> None:
        """Close one backward pass: flush reduce's per-example sums into outer products."""
        if self._a_pass_open:
            if self._a_pending is not None:
                mean = (self._a_pending / self._a_positions).transpose(0, 1)  # (groups, N, a_dim)
                if self.A is None:
                    self.A = self._new(self.a_dim, self.a_blocks)
                    self.A.zero_()
                self._blocked_update(self.A, mean, self.a_blocks, self.a_dim, 1.0, 1.0)
                self._a_pending, self._a_positions = None, 0
            self._a_pass_open = False
        if self._g_pending is not None:
            if self.G is None:
                self.G = self._new(self.g_dim, self.g_blocks)
                self.G.zero_()
            self._blocked_update(self.G, self._g_pending.transpose(0, 1), self.g_blocks, self.g_dim, 1.0, 1.0)
            self._g_pending = None
        if self._rows:
            self.g_rows = self._rows
            self._rows = 0

    def factors(self, n_examples: int) -> Factors | None:
        """Normalised (Ω, Γ), stacked per group; None if this layer saw no input or no gradient."""
        if self.A is None or self.G is None or n_examples <= 0:
            return None
        # in place: the accumulators are not used again (CaptureState.take drops them), and Ω can be large; an Ω
        # averaged in the epilogue is the running factor itself, already final
        A = self.A if self.a_is_average else self.A.div_(n_examples)
        G = self.G.div_(self.g_rows if self.approx == "expand" else n_examples)
        return Factors(A, G)


@dataclass
class RunningFactors:
    """Exponential moving average of a layer's factors: F ← ε F + (1 − ε) F_batch, ε = min(1 − 1/k, decay)."""

    A: torch.Tensor
    G: torch.Tensor
    updates: int = 0

    def next_eps(self, decay: float) -> float:
        """ε of the next update."""
        return min(1.0 - 1.0 / (self.updates + 1), decay)

    def update(self, batch: Factors, decay: float) -> None:
        """Fold a batch in; a batch Ω that *is* this average was already folded in the kernel's epilogue."""
        eps = self.next_eps(decay)
        self.updates += 1
        if batch.A is not self.A:
            self.A.mul_(eps).add_(batch.A, alpha=1.0 - eps)
        self.G.mul_(eps).add_(batch.G, alpha=1.0 - eps)

    def nbytes(self) -> int:
        return self.A.numel() * self.A.element_size() + self.G.numel() * self.G.element_size()
