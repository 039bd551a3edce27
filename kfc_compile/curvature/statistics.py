"""Batch statistics: the raw sums of one statistics step for one layer, one class per approximation.

A statistics object accumulates over one statistics step (all sites of a layer, all backward passes of the Fisher
estimator) and normalises the sums into :class:`~kfc_compile.curvature.factors.Factors`. Scaling
(docs/algorithm.md §2.3, docs/architecture.md), with N examples and T positions (all uses of the weight together):

* expand (= KFC, :class:`ExpandStatistics`): Ω = (1/N) Σ_{n,t} x̄ x̄ᵀ (so Ω's bias-bias entry is T),
  Γ = 1/(N·T) Σ_{n,t} g gᵀ;
* reduce (:class:`ReduceStatistics`): Ω = (1/N) Σ_n x̃_n x̃_nᵀ with x̃_n the mean of x̄ over positions,
  Γ = (1/N) Σ_n (Σ_t g)(Σ_t g)ᵀ;

where g is the gradient of the *per-example* loss. With a term mask (labels ``ignore_index``, docs/algorithm.md §2.7),
a token-aligned site hands the rows it keeps (``keep``): expand sums Ω over the kept rows and divides Γ by their
count (the real tokens) instead of N·T, unless some backward put a nonzero gradient on a dropped row (real tokens
depend on that position, e.g. a masked prompt under attention): then the layer keeps every row (:attr:`leaked`).
Reduce averages x̄ over the kept positions of each example instead (Γ's sums are unchanged: dropped rows are 0).
Factors are stored stacked per group, ``(groups, d, d)``, or,
for a side with ``a_blocks``/``g_blocks`` > 1, as that many diagonal blocks per group (``blocks.py``): the
rows (patches with their ones coordinate, or output gradients) are then split into blocks before the products.

:data:`STATISTICS` maps the public approximation strings to the classes; :func:`new_statistics` is the factory.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

import triton_kernels as tk
from kfc_compile.curvature import blocks as bl
from kfc_compile.curvature.factors import Factors


@dataclass
class BatchStatistics(ABC):
    """Raw sums of one statistics step for one layer (see the module docstring for the normalisation)."""

    approx: ClassVar[str]  # the public approximation string
    averages_in_epilogue: ClassVar[bool] = False  # whether average_into() is available (see ExpandStatistics)

    groups: int
    a_dim: int  # Ω size per group, bias coordinate included
    g_dim: int
    has_bias: bool
    dtype: torch.dtype
    device: torch.device
    a_blocks: int = 1  # diagonal blocks per group of Ω / Γ (1: dense)
    g_blocks: int = 1
    A: torch.Tensor | None = None
    G: torch.Tensor | None = None
    g_rows: int = 0  # N·T of the last completed Γ pass
    g_rows_done: int = 0  # N·T of the closed micro-batches of this step (gradient accumulation)
    _rows: int = 0  # rows seen in the current pass
    poisoned: bool = False  # an input that could not be averaged in safely was seen: this step's sums are void
    masked: bool = False  # some site handed a row mask (``keep``) this step
    leaked: bool = False  # a dropped row carried a nonzero output gradient: keep every row
    g_kept: int = 0  # kept rows of the last completed Γ pass / of the closed micro-batches / the current pass
    g_kept_done: int = 0
    _kept: int = 0

    @abstractmethod
    def add_input(self, site, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add one site's input contribution to Ω (``keep``: which rows of a token-aligned linear site count)."""

    @abstractmethod
    def _add_output_grad(self, site, gy: torch.Tensor, scale: float) -> None:
        """Add one site's output-gradient contribution to Γ (see :meth:`add_output_grad`)."""

    @abstractmethod
    def _g_count(self, n_examples: int) -> int:
        """What Γ's sums are divided by."""

    def average_into(self, running: torch.Tensor, eps: float, n_examples: int) -> None:
        """Write Ω ← ε·Ω + (1 − ε)/n · (this step's sums) straight into the running factor ``running``.

        This happens inside the kernels' epilogue; only kinds with :attr:`averages_in_epilogue` can.
        """
        raise TypeError(f"{self.approx} statistics cannot average Ω in the kernel epilogue")

    def add_output_grad(self, site, gy: torch.Tensor, scale: float, keep: torch.Tensor | None = None) -> None:
        """Add one site's output-gradient contribution to Γ.

        ``scale`` maps the backward's gradient to the per-example loss's gradient (e.g. N for a batch-mean loss).
        ``keep`` (rows of a token-aligned linear site): every row is summed (a dropped row's gradient is zero unless
        :attr:`leaked`), only the kept ones are counted.
        """
        rows = gy.numel() // (site.g_dim * site.groups)
        self._rows += rows
        if keep is not None:
            self.masked = True
            self._kept += int(keep.sum())
            if not self.leaked and bool(gy.reshape(-1, site.g_dim)[~keep].any()):
                self.leaked = True
        else:
            self._kept += rows
        self._add_output_grad(site, gy, scale)

    def note_leak(self, site, gy: torch.Tensor, keep: torch.Tensor) -> None:
        """An input-only pass's output gradient: a nonzero one on a dropped row means the layer keeps every row."""
        if not self.leaked and bool(gy.reshape(-1, site.g_dim)[~keep].any()):
            self.leaked = True

    def end_pass(self) -> None:
        """Close one backward pass."""
        if self._rows:
            self.g_rows, self.g_kept = self._rows, self._kept
            self._rows = self._kept = 0

    def end_micro_batch(self) -> None:
        """Close one micro-batch of a step (gradient accumulation): its passes end, the next one's rows add up.

        The Γ passes of one micro-batch (MC samples, type-2 columns) each see its N·T rows once; the rows of
        successive micro-batches are different examples and add.
        """
        self.end_pass()
        self.g_rows_done += self.g_rows
        self.g_kept_done += self.g_kept
        self.g_rows = self.g_kept = 0

    def factors(self, n_examples: int, g_scale: float = 1.0) -> Factors | None:
        """Normalised (Ω, Γ), stacked per group; None if this layer saw no input or no gradient.

        ``n_examples`` counts all micro-batches; ``g_scale`` multiplies Γ (the rescaling of accumulated batch-mean
        gradients, ``CaptureState.take``). In place: the accumulators are not used again (``CaptureState.take``
        drops them), and Ω can be large.
        """
        if self.A is None or self.G is None or n_examples <= 0 or self.poisoned:
            return None
        count = self._g_count(n_examples)
        if count <= 0:  # a masked layer without any kept row: no statistics this step
            return None
        G = self.G.div_(count) if g_scale == 1.0 else self.G.mul_(g_scale / count)
        return Factors(self._final_a(n_examples), G)

    def _final_a(self, n_examples: int) -> torch.Tensor:
        return self.A.div_(n_examples)

    def _new(self, d: int, k: int = 1) -> torch.Tensor:
        b = bl.block_size(d, k)
        return torch.empty(self.groups * k, b, b, dtype=self.dtype, device=self.device)

    def _blocked_update(self, F: torch.Tensor, rows: torch.Tensor, k: int, d: int, alpha: float,
                        beta: float) -> None:
        """F ← beta·F + alpha·(diagonal blocks of rowsᵀrows).

        rows: (groups, M, ≤ d) of any float dtype (the kernel upcasts), zero-padded to d; one block (k = 1) is the
        plain syrk update.
        """
        if rows.shape[-1] < d:
            rows = torch.nn.functional.pad(rows, (0, d - rows.shape[-1]))
        tk.syrk_update_(F, bl.block_rows(rows, k), alpha=alpha, beta=beta)


@dataclass
class ExpandStatistics(BatchStatistics):
    """KFAC-expand: every position is an example (outer products of the inputs and output gradients)."""

    approx: ClassVar[str] = "expand"
    averages_in_epilogue: ClassVar[bool] = True

    # moving average in the epilogue: (running Ω, ε, (1 − ε)/n) — the kernels then write
    # Ω ← ε·Ω + (1 − ε)/n · Σ x̄x̄ᵀ straight into the running factor, with no accumulator and no averaging pass
    ema: tuple[torch.Tensor, float, float] | None = None
    a_is_average: bool = False
    A_dropped: torch.Tensor | None = None  # Ω's sum over the rows a mask dropped (used if the layer leaked)

    def average_into(self, running: torch.Tensor, eps: float, n_examples: int) -> None:
        """Average Ω into ``running`` in the kernels' epilogue (set before the first input arrives)."""
        self.ema = (running, eps, (1.0 - eps) / n_examples)

    def add_input(self, site, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Outer products of the site's input rows (with their ones coordinate for a bias).

        Averaged straight into a running factor (:meth:`average_into`), an input whose products could be non-finite
        is not added: the statistics are marked :attr:`poisoned` (void for this step) and the running factor is
        left as it was. With ``keep`` (a linear site's rows; never with an epilogue average, see
        ``CaptureState``) the kept rows go to Ω and the dropped ones to :attr:`A_dropped`.
        """
        if self.poisoned:
            return
        if keep is not None and self.ema is not None:
            self.leaked = True  # Ω goes straight into a running average: every row counts
        elif keep is not None:
            self.masked = True
            rows = x.reshape(-1, site.a_dim)
            self._add_some_rows(site, rows[keep])
            A, self.A = self.A, self.A_dropped
            try:
                self._add_some_rows(site, rows[~keep])
            finally:
                self.A_dropped, self.A = self.A, A
            return
        self._add_rows(site, x)

    def _add_some_rows(self, site, rows: torch.Tensor) -> None:
        """:meth:`_add_rows` for a row subset that may be empty (no kernel launch on zero rows)."""
        if rows.shape[0]:
            self._add_rows(site, rows)
        elif self.A is None:
            self.A = self._new(self.a_dim, self.a_blocks).zero_()

    def _add_rows(self, site, x: torch.Tensor) -> None:
        """Add the outer products of ``x``'s rows (a site input) to :attr:`A`."""
        if self.ema is not None and not products_are_finite(x, self.a_dim, self.dtype):
            self.poisoned = True
            return
        ones = site.has_bias
        target_dim = site.a_dim + ones
        alpha, beta = 1.0, 1.0
        if self.A is None:
            if self.ema is not None:
                self.A, beta, alpha = self.ema
                self.a_is_average = True
            elif self.a_blocks > 1 or target_dim == self.a_dim:  # the kernel writes it whole: never read
                self.A, beta = self._new(self.a_dim, self.a_blocks), 0.0
            else:
                self.A = self._new(self.a_dim, self.a_blocks).zero_()
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

    def _add_output_grad(self, site, gy: torch.Tensor, scale: float) -> None:
        if self.poisoned:
            return
        fresh = self.G is None  # a new accumulator is written whole by the kernel (beta = 0: never read)
        if fresh:
            self.G = self._new(self.g_dim, self.g_blocks)
        self._blocked_update(self.G, site.output_rows(gy), self.g_blocks, self.g_dim, scale * scale,
                             0.0 if fresh else 1.0)

    def _g_count(self, n_examples: int) -> int:
        if self.masked and not self.leaked:
            return self.g_kept_done + self.g_kept
        return self.g_rows_done + self.g_rows

    def _final_a(self, n_examples: int) -> torch.Tensor:
        # an Ω averaged in the epilogue is the running factor itself, already final
        if self.a_is_average:
            return self.A
        if self.leaked and self.A_dropped is not None:
            self.A.add_(self.A_dropped)
        return super()._final_a(n_examples)


@dataclass
class ReduceStatistics(BatchStatistics):
    """KFAC-reduce: per-example sums over positions first, then outer products when the backward pass closes.

    Over positions, inputs are averaged and gradients summed.
    """

    approx: ClassVar[str] = "reduce"

    _a_pending: torch.Tensor | None = None  # per-example sums, (N, groups, a_dim)
    _a_positions: int = 0
    _g_pending: torch.Tensor | None = None  # per-example sums of g, (N, groups, g_dim)
    # the same over the rows a mask keeps (per-example counts), and Ω from their means (used unless leaked)
    _k_pending: torch.Tensor | None = None
    _k_counts: torch.Tensor | None = None
    _pass_masked: bool = False
    A_kept: torch.Tensor | None = None

    def add_input(self, site, x: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Per-example sums of the site's inputs (the ones coordinate counts the positions).

        With ``keep`` (a token-aligned linear site's rows) also the sums and counts over the kept positions.
        """
        n = x.shape[0]
        sums = self._padded_sums(site.input_sums(x), float(site.positions(x)) if site.has_bias else 0.0)
        t = site.positions(x)
        if keep is None:
            k_sums, counts = sums, torch.full((n,), float(t), dtype=self.dtype, device=sums.device)
        else:
            self._pass_masked = True
            k = keep.reshape(x.shape[:-1])
            counts = k.reshape(n, -1).sum(1).to(self.dtype)
            k_sums = self._padded_sums(site.input_sums(x * k.unsqueeze(-1).to(x.dtype)),
                                       counts.view(-1, 1, 1) if site.has_bias else 0.0)
        self._a_pending = sums if self._a_pending is None else self._a_pending + sums
        self._k_pending = k_sums if self._k_pending is None else self._k_pending + k_sums
        self._k_counts = counts if self._k_counts is None else self._k_counts + counts
        self._a_positions += t

    def _padded_sums(self, sums: torch.Tensor, ones) -> torch.Tensor:
        """(N, groups, a_dim) sums with the bias coordinate (``ones``: the positions counted, or 0) appended."""
        sums = sums.to(self.dtype)
        pad = self.a_dim - sums.shape[-1]
        if pad:
            extra = torch.zeros(*sums.shape[:-1], pad, dtype=self.dtype, device=sums.device) + ones
            sums = torch.cat([sums, extra], dim=-1)
        return sums

    def _add_output_grad(self, site, gy: torch.Tensor, scale: float) -> None:
        sums = site.output_sums(gy).to(self.dtype) * scale
        self._g_pending = sums if self._g_pending is None else self._g_pending + sums

    def end_pass(self) -> None:
        """Close one backward pass: flush the per-example sums into outer products."""
        if self._a_pending is not None:
            if self._pass_masked and self.A_kept is None:  # earlier passes had no mask: kept = all so far
                self.A_kept = self.A.clone() if self.A is not None else self._new(self.a_dim, self.a_blocks).zero_()
            if self.A_kept is not None:
                k_mean = (self._k_pending / self._k_counts.clamp(min=1).view(-1, 1, 1)).transpose(0, 1)
                self._blocked_update(self.A_kept, k_mean, self.a_blocks, self.a_dim, 1.0, 1.0)
            self.masked |= self._pass_masked
            self._k_pending = self._k_counts = None
            self._pass_masked = False
            mean = (self._a_pending / self._a_positions).transpose(0, 1)  # (groups, N, a_dim)
            if self.A is None:
                self.A = self._new(self.a_dim, self.a_blocks).zero_()
            self._blocked_update(self.A, mean, self.a_blocks, self.a_dim, 1.0, 1.0)
            self._a_pending, self._a_positions = None, 0
        if self._g_pending is not None:
            if self.G is None:
                self.G = self._new(self.g_dim, self.g_blocks).zero_()
            self._blocked_update(self.G, self._g_pending.transpose(0, 1), self.g_blocks, self.g_dim, 1.0, 1.0)
            self._g_pending = None
        super().end_pass()

    def _g_count(self, n_examples: int) -> int:
        return n_examples

    def _final_a(self, n_examples: int) -> torch.Tensor:
        kept = self.masked and not self.leaked and self.A_kept is not None
        return (self.A_kept if kept else self.A).div_(n_examples)


def products_are_finite(x: torch.Tensor, width: int, dtype: torch.dtype) -> bool:
    """Whether every sum of products of ``x``'s entries over its rows, at most ``width`` per row, is finite in dtype.

    A sufficient test (one reduction): with m = max |x|, every entry of Σ rows·rowsᵀ is at most
    m² · numel(x) · width (each patch row holds ≤ width entries of x, each entry of x lies in ≤ width rows), and the
    moving average adds at most as much again; NaN fails it.
    """
    if x.numel() == 0:
        return True
    m = float(x.detach().abs().amax())
    limit = torch.finfo(dtype).max / (4.0 * x.numel() * max(width, 1))
    return math.isfinite(m) and m * m < limit


STATISTICS: dict[str, type[BatchStatistics]] = {k.approx: k for k in (ExpandStatistics, ReduceStatistics)}


def check_approx(approx: str) -> str:
    """``approx`` if it names a statistics kind ("expand", "reduce"), else a ValueError listing them."""
    if approx not in STATISTICS:
        raise ValueError(f"unknown approx {approx!r}: expected one of {tuple(STATISTICS)}")
    return approx


def new_statistics(approx: str, groups: int, a_dim: int, g_dim: int, has_bias: bool, dtype: torch.dtype,
                   device: torch.device, a_blocks: int = 1, g_blocks: int = 1) -> BatchStatistics:
    """Empty statistics of approximation ``approx`` (a key of :data:`STATISTICS`) for one layer.

    Args:
        approx: ``"expand"`` or ``"reduce"``.
        groups: groups of the layer (factors are stacked per group).
        a_dim: Ω size per group, bias coordinate included.
        g_dim: Γ size per group.
        has_bias: whether the layer has a bias (the ones coordinate of Ω).
        dtype: accumulation dtype (fp32, fp64 for fp64 layers).
        device: where the sums live.
        a_blocks: diagonal blocks per group of Ω (1: dense).
        g_blocks: diagonal blocks per group of Γ (1: dense).
    """
    return STATISTICS[check_approx(approx)](
        groups, a_dim, g_dim, has_bias, dtype, device, a_blocks=a_blocks, g_blocks=g_blocks
    )
