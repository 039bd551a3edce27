"""``CaptureState``: the mode switch and per-step accumulators shared by all capture taps of one model.

The taps (``taps.py`` in eager graphs, the ``kfc::record`` op in compiled ones) hand every armed call's (layer input,
output gradient) to ``CaptureState.record``; the state routes it to the layer's batch statistics
(``curvature/statistics``) according to the capture flags of the backward pass being run. Drivers (``kc.curvature``,
the optimizer's curvature estimator) arm it, run passes, and take the normalised factors.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kfc_compile.curvature.blocks import block_count
from kfc_compile.curvature.factors import Factors
from kfc_compile.curvature.statistics import BatchStatistics, new_statistics
from kfc_compile.registry import KFCLayer
from kfc_compile.runtime import record as record_op
from kfc_compile.runtime.calls import NO_CALLS, CallLog, RecordedCall
from kfc_compile.runtime.subsets import subset_size
from kfc_compile.sites.geometry import LinearSite, Site

log = logging.getLogger(__name__)
MASKED = "masked"  # the value of ``CaptureState.masking`` for a layer whose ignored positions were dropped

@dataclass
class SiteEntry:
    """One call site known to a capture state: the index of its layer in ``state.layers``, and its geometry.

    ``layer`` is None when the site's weight is not under KFC: the site records nothing.
    """

    layer: int | None
    site: Site


class CaptureState:
    """Mode switch and per-step accumulators shared by all taps of one transformed model.

    ``sites[i]`` is a :class:`SiteEntry`; the taps refer to sites by index (eager taps) or by the
    ``kfc::record`` key allocated for each site (compiled taps; keys are freed when the state is).

    Two ways to drive it:

    * explicitly (``kc.curvature``, the compiled step): ``armed_forward()`` around the forward, then one
      ``backward_pass(...)`` per backward, then ``take(n)``;
    * from a plain training loop (the optimizer): ``arm(...)`` before the forward of a statistics step. The
      output tap then records the batch size, sets the capture flags for the user's own ``loss.backward()``, and
      at the start of that backward calls ``fisher_pass(output)`` (e.g. a sampled-target backward that feeds Γ)
      while the graph is still alive. The driver calls ``finish_armed_step()`` afterwards.

    Gradient accumulation: every armed forward of a plain loop is one micro-batch of the step
    (:meth:`begin_micro_batch`). The sums run over all of them and :meth:`take` divides by the examples of all of
    them; Γ from the user's own gradients of a batch-mean loss is rescaled to the per-example loss, assuming the
    accumulated gradient is that of the mean over all the step's examples (README, "Gradient accumulation").
    """

    def __init__(self, layers: list[KFCLayer], sites: list[SiteEntry], approx: str):
        self.layers = layers
        self.sites = sites
        self.approx = approx
        self.armed = False
        self.capture_input = False
        self.capture_grad = False
        self.grad_scale = 1.0
        self.slot = torch.zeros((), requires_grad=True)
        self.stats: dict[int, BatchStatistics] = {}
        self.n_examples = 0  # batch size of the armed forward (set by drivers or the output tap)
        self.stats_fraction: float | None = None  # statistics from the first subset_size(N, fraction) examples
        self.ema: dict[int, tuple[torch.Tensor, float]] = {}  # layer → (running Ω, ε): average in the epilogue
        self.ema_examples: int | None = None  # examples the epilogue average divides by (None: examples_used())
        # wider factors are block-diagonal (curvature/blocks.py), or layer → (Ω blocks, Γ blocks); None: dense
        self.max_factor_dim: int | Callable[[KFCLayer], tuple[int, int]] | None = None
        self._train_flags: tuple[bool, bool, bool] | None = None  # (inputs, grads, grads are of a batch mean)
        self.fisher_pass: Callable[[torch.Tensor], None] | None = None
        self.call_log: CallLog = NO_CALLS  # forwards with grad enabled since clear_calls() (no copies)
        self._closed = (0, 0)  # (examples, examples used) of this step's closed micro-batches
        self.last_examples = 0  # examples the factors of the last take() used, all micro-batches (0: none taken)
        self._grad_base = 0  # N of the first micro-batch whose batch-mean gradients are recorded (Γ rescale)
        self._driven = False  # inside armed_forward(): a driver's own pass, not a plain loop's forward
        self.output_fn: Callable[[object], torch.Tensor] | None = None  # which output tensor is the logits
        # term mask of the visible labels of the forward being recorded (True: a real loss term; None: all count),
        # its source (set by drivers: recorded call, logits → mask), the labels compile_step's step passes, and per
        # layer name whether its ignored positions were dropped (MASKED) or why not
        self.term_mask: torch.Tensor | None = None
        self.mask_fn: Callable[[RecordedCall, torch.Tensor], torch.Tensor | None] | None = None
        self.step_labels: torch.Tensor | None = None
        self.masking: dict[str, str] = {}
        self._unmasked: dict[int, str] = {}

    @property
    def sites(self) -> list[SiteEntry]:
        """The call sites, by index; assigning them allocates each site's ``kfc::record`` key."""
        return self._sites

    @sites.setter
    def sites(self, sites: list[SiteEntry]) -> None:
        self._sites = sites
        # keys of the compile-clean taps (kfc::record), allocated here, outside any traced code
        self.compile_keys = [record_op.new_site(self, i) for i in range(len(sites))]

    # -- called by the taps --------------------------------------------------------------------------------------
    def record(self, site_index: int, x: torch.Tensor, gy: torch.Tensor) -> None:
        """Route one armed call's (layer input, output gradient) to its layer's batch statistics.

        The capture flags of the running backward say what is recorded (Ω inputs, Γ gradients); a site whose weight is
        not under KFC records nothing, and with ``stats_fraction`` only the leading examples count.
        """
        entry = self.sites[site_index]
        layer_index, site = entry.layer, entry.site
        if layer_index is None or not (self.capture_input or self.capture_grad):
            return
        stats = self.stats.get(layer_index)
        if stats is None:
            layer = self.layers[layer_index]
            dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
            blocks = self.max_factor_dim
            a_blocks, g_blocks = (blocks(layer) if callable(blocks) else
                                  (block_count(d, blocks) for d in (layer.a_dim, layer.g_dim)))
            stats = new_statistics(self.approx, layer.groups, layer.a_dim, layer.g_dim, layer.bias is not None,
                                   dtype, layer.weight.device, a_blocks=a_blocks, g_blocks=g_blocks)
            ema = self.ema.get(layer_index)
            if ema is not None and stats.averages_in_epilogue:
                n = self.examples_used() if self.ema_examples is None else self.ema_examples
                stats.average_into(ema[0], ema[1], n)
            self.stats[layer_index] = stats
        used = self.examples_used()
        mask = self.term_mask
        if used < self.n_examples:  # leading dim is N (or N·L for inputs flattened inside the model)
            x = x[: x.shape[0] * used // self.n_examples]
            gy = gy[: gy.shape[0] * used // self.n_examples]
            mask = None if mask is None else mask[:used]
        keep = None if mask is None else self._aligned(layer_index, site, x, gy, mask)
        with torch.no_grad(), no_autocast(x.device.type):
            if self.capture_input:
                stats.add_input(site, x.detach(), keep)
                if keep is not None and not self.capture_grad:
                    stats.note_leak(site, gy.detach(), keep)
            if self.capture_grad:
                stats.add_output_grad(site, gy.detach(), self.grad_scale, keep)

    def _aligned(self, layer_index: int, site: Site, x: torch.Tensor, gy: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor | None:
        """The rows of a token-aligned site that the term mask keeps, or None (and the reason noted) if not aligned.

        Token-aligned: a linear site whose input and output gradient are (N, T…, features) with the mask's (N, T…),
        or (N·T…, features) flattened example-major (HF's ``Conv1D`` views).
        """
        why = None
        if not isinstance(site, LinearSite):
            why = f"a {site.kind} layer is not token-aligned"
        else:
            lead, nd = tuple(mask.shape), mask.dim()
            for t, width in ((x, site.in_features), (gy, site.out_features)):
                if not ((t.dim() == nd + 1 and tuple(t.shape[:nd]) == lead) or
                        (t.dim() == 2 and t.shape[0] == mask.numel())) or t.shape[-1] != width:
                    why = (f"its input {tuple(x.shape)} / output gradient {tuple(gy.shape)} are not token-aligned "
                           f"with the labels' {lead}")
                    break
        if why is None:
            return mask.reshape(-1).to(x.device)
        self._unmasked[layer_index] = why
        return None

    def on_output(self, n_examples: int) -> None:
        """Called by the output tap's forward on an armed step: the forward's batch size.

        On a step armed by :meth:`arm` (a plain loop, not inside :meth:`armed_forward`) the forward is the next
        micro-batch of the step, and the capture flags are set for its backward. Gradients of a batch-mean loss
        are recorded times the first micro-batch's N (the per-example gradients when there is one micro-batch;
        :meth:`take` rescales Γ by (examples / that N)² otherwise).
        """
        if self._train_flags is None or self._driven:
            self.n_examples = n_examples
            return
        self.begin_micro_batch(n_examples)
        inputs, grads, batch_mean = self._train_flags
        if grads and batch_mean and not self._grad_base:
            self._grad_base = n_examples
        self.set_capture(inputs, grads, float(self._grad_base) if grads and batch_mean else 1.0)

    def begin_micro_batch(self, n_examples: int) -> None:
        """Start recording the next micro-batch of the step, of ``n_examples``; closes the previous one if any.

        Closing ends its passes (KFAC-reduce flushes its per-example sums) and adds its examples to the step's.
        """
        if self.n_examples > 0:
            for s in self.stats.values():
                s.end_micro_batch()
            total, used = self._closed
            self._closed = (total + self.n_examples, used + self.examples_used())
        self.n_examples = n_examples

    # -- explicit driving ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def armed_forward(self) -> Iterator[None]:
        """Forward passes inside this block get live taps (statistics may be taken in their backward).

        They are a driver's own passes: the driver sets their sizes (no micro-batch of a plain loop's step).
        """
        prev = self.armed, self._driven
        self.armed = self._driven = True
        try:
            yield
        finally:
            self.armed, self._driven = prev

    @contextlib.contextmanager
    def backward_pass(self, *, inputs: bool, grads: bool, grad_scale: float = 1.0) -> Iterator[None]:
        """One backward pass through armed taps, recording Ω inputs and/or Γ gradients."""
        saved = (self.capture_input, self.capture_grad, self.grad_scale)
        self.set_capture(inputs, grads, grad_scale)
        try:
            yield
        finally:
            self.set_capture(*saved)
            self.end_pass()

    def set_capture(self, inputs: bool, grads: bool, grad_scale: float = 1.0) -> None:
        """Set what backward passes record: Ω inputs, Γ gradients (scaled by ``grad_scale``), both or neither."""
        self.capture_input, self.capture_grad, self.grad_scale = inputs, grads, grad_scale

    def end_pass(self) -> None:
        """Close one backward pass in every layer's statistics (KFAC-reduce flushes its per-example sums)."""
        for s in self.stats.values():
            s.end_pass()

    # -- plain-loop driving --------------------------------------------------------------------------------------
    def arm(self, *, inputs: bool, grads: bool, batch_mean: bool,
            fisher_pass: Callable[[torch.Tensor], None] | None = None) -> None:
        """Arm the taps for the next forward; its training backward records Ω inputs and/or Γ gradients.

        ``batch_mean``: the training loss is a batch mean, so its gradients are scaled by N.
        """
        self.armed = True
        self._train_flags = (inputs, grads, batch_mean)
        self.fisher_pass = fisher_pass

    def disarm(self) -> None:
        """Undo :meth:`arm`: later forwards get inert taps and backward passes record nothing."""
        self.armed = False
        self._train_flags = None
        self.fisher_pass = None
        self.set_capture(False, False)

    def examples_used(self) -> int:
        """How many leading examples of the batch feed the statistics."""
        if self.stats_fraction is not None:
            return subset_size(self.n_examples, self.stats_fraction)
        return self.n_examples

    def take(self, n_examples: int | None = None) -> dict[int, Factors]:
        """Normalised factors of the step just recorded (layer index → Factors); resets the accumulators.

        ``n_examples`` sets the current (last) micro-batch's batch size, by default the armed forward's; the
        examples of earlier micro-batches and a statistics subsample are accounted for.
        """
        if n_examples is not None:
            self.n_examples = n_examples
        total, used = self._closed
        total, used = total + self.n_examples, used + self.examples_used()
        self.last_examples = used
        g_scale = (total / self._grad_base) ** 2 if self._grad_base else 1.0
        out = {}
        for i, s in self.stats.items():
            self._note_masking(i, s)
            f = s.factors(used, g_scale)
            if f is not None:
                out[i] = f
        self.reset()
        return out

    def _note_masking(self, i: int, stats: BatchStatistics) -> None:
        """Record (and log once per layer and outcome) whether layer i's ignored positions were dropped."""
        why = self._unmasked.get(i)
        if why is None and stats.masked:
            why = MASKED if not stats.leaked else ("a dropped position carried a nonzero output gradient (real "
                                                   "tokens depend on it, e.g. a masked prompt): every position kept")
        if why is None:
            return
        name = self.layers[i].name
        if self.masking.get(name) != why:
            log.info("KFC layer %r, positions labelled ignore_index: %s", name, why)
        self.masking[name] = why

    def discard_statistics(self) -> None:
        """Drop what this step recorded so far (accumulators, micro-batch counts); the pass's targets stay."""
        self.stats = {}
        self.term_mask = None
        self._unmasked = {}
        self.n_examples = 0
        self._closed = (0, 0)
        self._grad_base = 0

    def reset(self) -> None:
        """Drop the accumulators and the per-pass settings of a driver (moving-average targets, block layout)."""
        self.discard_statistics()
        self.ema, self.ema_examples = {}, None
        self.max_factor_dim = None

    # -- driver interface: what drivers (the curvature estimator, kc.curvature) set and read -------------------
    def prepare_pass(self, ema: dict[int, tuple[torch.Tensor, float]],
                     max_factor_dim: int | Callable[[KFCLayer], tuple[int, int]] | None,
                     examples: int | None = None) -> None:
        """Drop the accumulators and set the targets of the next statistics pass.

        Args:
            ema: layer index → (running Ω, ε): the statistics kernels average this pass's Ω straight into it. Only
                for a pass whose number of examples is known before it starts (``examples``).
            max_factor_dim: factors wider than this are recorded as diagonal blocks (``curvature/blocks.py``;
                None: dense), or a function layer → (Ω blocks, Γ blocks) (the optimizer's layouts, a memory
                budget's included); decided per layer when its statistics start (with a live registry the layers
                of the next forward may not be known when the pass is prepared).
            examples: the examples of the whole pass, all micro-batches (what the epilogue average divides by);
                None: those of the first micro-batch.
        """
        self.reset()
        self.ema, self.max_factor_dim, self.ema_examples = ema, max_factor_dim, examples

    def set_examples(self, n_examples: int) -> None:
        """Set the batch size of the recorded forward (normally the output tap's job)."""
        self.n_examples = n_examples

    def set_stats_fraction(self, fraction: float | None) -> None:
        """Statistics from the first ``subset_size(N, fraction)`` examples of each batch; None: the whole batch."""
        self.stats_fraction = fraction

    @contextlib.contextmanager
    def using_stats_fraction(self, fraction: float | None) -> Iterator[None]:
        """Inside the block the statistics use ``fraction`` of the batch (None: all of it); restored after."""
        saved = self.stats_fraction
        self.stats_fraction = fraction
        try:
            yield
        finally:
            self.stats_fraction = saved

    def add_call(self, args: tuple, kwargs: dict) -> None:
        """Record one forward's arguments (called by the output tap for every forward with grad enabled).

        The labels a driver made visible for it (:meth:`visible_labels`) are recorded with it.
        """
        self.call_log = CallLog(args, kwargs, self.call_log, self.step_labels)

    @contextlib.contextmanager
    def visible_labels(self, labels: torch.Tensor | None) -> Iterator[None]:
        """Forwards inside the block are recorded with ``labels`` (the targets of their logits, e.g. compile_step's)."""
        saved, self.step_labels = self.step_labels, labels
        try:
            yield
        finally:
            self.step_labels = saved

    def observe_output(self, f: torch.Tensor) -> None:
        """The logits of the forward just recorded: its term mask, from its visible labels (:attr:`mask_fn`)."""
        if self.mask_fn is not None and not self._driven and self.call_log.prev is not None:
            self.term_mask = self.mask_fn(self.call_log.last(), f)

    def recorded_calls(self) -> list[RecordedCall]:
        """The forwards run with grad enabled since :meth:`clear_calls`, oldest first: the step's micro-batches."""
        return self.call_log.calls()

    def clear_calls(self) -> None:
        """Forget the recorded calls (the optimizer does at the end of ``step()`` and in ``zero_grad()``)."""
        self.call_log = NO_CALLS

    @contextlib.contextmanager
    def preserved_calls(self) -> Iterator[None]:
        """Extra forwards inside the block leave the recorded calls as they were.

        The output tap sees a statistics subset or the Fisher products' forwards too, but they are not the training
        batch.
        """
        saved = self.call_log
        try:
            yield
        finally:
            self.call_log = saved

    def record_backward(self, f: torch.Tensor, v: torch.Tensor, *, inputs: bool, retain_graph: bool = True) -> None:
        """One backward from the model output ``f`` with output gradient ``v`` through the armed taps.

        It reaches every tap through the shared slot but computes no weight gradient; records Γ, and Ω too if
        ``inputs``.
        """
        with self.backward_pass(inputs=inputs, grads=True):
            torch.autograd.grad(f, [self.slot], v, retain_graph=retain_graph, allow_unused=True)

    def finish_armed_step(self) -> dict[int, Factors]:
        """End a statistics step of a plain loop (``arm`` before its forward) and return its normalised factors.

        Closes the pass, takes the factors (none when no armed forward ran) and disarms the taps.
        """
        self.end_pass()
        self.last_examples = 0
        batch = self.take() if self.n_examples > 0 else {}
        self.reset()
        self.disarm()
        return batch


def no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off for the statistics (a bf16 XᵀX loses the factors' precision); outside autocast no context at all.

    Opening ``autocast(enabled=False)`` anyway cost ~9 % of the taps' time on small layers.
    """
    on = torch.is_autocast_enabled(device_type)
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()

