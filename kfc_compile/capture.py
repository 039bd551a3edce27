"""The capture tap: an identity node after each conv/linear call that feeds the factor statistics.

When statistics are not due (the normal case) the tap returns its input untouched: no autograd node, no saved
tensor, no work. When armed, an ``autograd.Function`` keeps a reference to the layer input (which the layer
already saved for its weight gradient, so no extra memory) and, in the backward, hands (input, grad_output) to
``CaptureState.record``. Ω is computed from the saved input in the backward (compiler_notes.md §2), so the
forward graph carries no statistics work.

The tap returns its input marked dirty rather than a view, so in-place ops after a layer (``ReLU(inplace=True)``)
keep working. A shared scalar *slot* feeds every armed tap, so ``torch.autograd.grad(output, slot)`` runs a
backward that reaches every tap but computes no weight gradients: that is the Fisher pass that only feeds Γ.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

from kfc_compile.compile import ops as compile_ops
from kfc_compile.curvature.factors import BatchStatistics, Factors
from kfc_compile.registry import KFCLayer


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, slot, state, site_index):  # noqa: D401 - autograd signature
        ctx.save_for_backward(x)
        ctx.state, ctx.site_index = state, site_index
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        ctx.state.record(ctx.site_index, x, gy)
        return gy, None, torch.zeros((), dtype=ctx.state.slot.dtype, device=gy.device), None, None


class CaptureState:
    """Mode switch and per-step accumulators shared by all taps of one transformed model.

    ``sites[i] = (layer_index, site)``; layer_index is None for a site whose weight could not be put under KFC.

    Two ways to drive it:

    * explicitly (``kc.curvature``, the compiled step): ``armed_forward()`` around the forward, then one
      ``backward_pass(...)`` per backward, then ``take(n)``;
    * from a plain training loop (the optimizer): ``arm(...)`` before the forward of a statistics step. The
      output tap then records the batch size, sets the capture flags for the user's own ``loss.backward()``, and
      at the start of that backward calls ``fisher_pass(output)`` (e.g. a sampled-target backward that feeds Γ)
      while the graph is still alive. The driver calls ``end_pass()`` and ``take(n)`` afterwards.
    """

    def __init__(self, layers: list[KFCLayer], sites: list[tuple[int | None, object]], approx: str):
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
        self.blocks: dict[int, tuple[int, int]] = {}  # layer → (Ω blocks, Γ blocks) of block-diagonal factors
        self._train_flags: tuple[bool, bool, bool] | None = None  # (inputs, grads, grads are of a batch mean)
        self.fisher_pass: Callable[[torch.Tensor], None] | None = None
        self.last_inputs: tuple = ()  # positional inputs of the last forward with grad enabled (no copy)

    @property
    def sites(self) -> list:
        return self._sites

    @sites.setter
    def sites(self, sites: list) -> None:
        self._sites = sites
        # keys of the compile-clean taps (kfc::record), allocated here, outside any traced code
        self.compile_keys = [compile_ops.new_site(self, i) for i in range(len(sites))]

    # -- called by the taps --------------------------------------------------------------------------------------
    def record(self, site_index: int, x: torch.Tensor, gy: torch.Tensor) -> None:
        layer_index, site = self.sites[site_index]
        if layer_index is None or not (self.capture_input or self.capture_grad):
            return
        stats = self.stats.get(layer_index)
        if stats is None:
            layer = self.layers[layer_index]
            dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
            a_blocks, g_blocks = self.blocks.get(layer_index, (1, 1))
            stats = BatchStatistics(layer.groups, layer.a_dim, layer.g_dim, layer.bias is not None, self.approx,
                                    dtype, layer.weight.device, a_blocks=a_blocks, g_blocks=g_blocks)
            ema = self.ema.get(layer_index)
            if ema is not None and self.approx == "expand":
                stats.ema = (ema[0], ema[1], (1.0 - ema[1]) / self.examples_used())
            self.stats[layer_index] = stats
        used = self.examples_used()
        if used < self.n_examples:  # leading dim is N (or N·L for inputs flattened inside the model)
            x = x[: x.shape[0] * used // self.n_examples]
            gy = gy[: gy.shape[0] * used // self.n_examples]
        with torch.no_grad(), torch.autocast(device_type=x.device.type, enabled=False):
            if self.capture_input:
                stats.add_input(site, x.detach())
            if self.capture_grad:
                stats.add_output_grad(site, gy.detach(), self.grad_scale)

    def on_output(self, n_examples: int) -> None:
        """Called by the output tap's forward on an armed step of a plain training loop."""
        self.n_examples = n_examples
        if self._train_flags is not None:
            inputs, grads, batch_mean = self._train_flags
            self.set_capture(inputs, grads, float(n_examples) if batch_mean else 1.0)

    # -- explicit driving ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def armed_forward(self) -> Iterator[None]:
        """Forward passes inside this block get live taps (statistics may be taken in their backward)."""
        prev, self.armed = self.armed, True
        try:
            yield
        finally:
            self.armed = prev

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
        self.capture_input, self.capture_grad, self.grad_scale = inputs, grads, grad_scale

    def end_pass(self) -> None:
        for s in self.stats.values():
            s.end_pass()

    # -- plain-loop driving --------------------------------------------------------------------------------------
    def arm(self, *, inputs: bool, grads: bool, batch_mean: bool,
            fisher_pass: Callable[[torch.Tensor], None] | None = None) -> None:
        """Arm the taps for the next forward; its training backward records Ω inputs and/or Γ gradients
        (``batch_mean``: the training loss is a batch mean, so its gradients are scaled by N)."""
        self.armed = True
        self._train_flags = (inputs, grads, batch_mean)
        self.fisher_pass = fisher_pass

    def disarm(self) -> None:
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

        ``n_examples`` defaults to the armed forward's batch size; a statistics subsample is accounted for."""
        if n_examples is not None:
            self.n_examples = n_examples
        used = self.examples_used()
        out = {}
        for i, s in self.stats.items():
            f = s.factors(used)
            if f is not None:
                out[i] = f
        self.reset()
        return out

    def reset(self) -> None:
        """Drop the accumulators and the per-pass settings of a driver (moving-average targets, blocks)."""
        self.stats = {}
        self.ema = {}
        self.blocks = {}

    # -- driver interface: what drivers (the curvature estimator, kc.curvature) set and read -------------------
    def prepare_pass(self, ema: dict[int, tuple[torch.Tensor, float]], blocks: dict[int, tuple[int, int]]) -> None:
        """Drop the accumulators and set the targets of the next statistics pass.

        Args:
            ema: layer index → (running Ω, ε): the statistics kernels average this pass's Ω straight into it.
            blocks: layer index → (Ω blocks, Γ blocks) of the layers with block-diagonal factors.
        """
        self.reset()
        self.ema, self.blocks = ema, blocks

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

    def recorded_inputs(self) -> tuple:
        """Positional inputs of the last forward run with grad enabled (the tensors themselves, no copy)."""
        return self.last_inputs

    @contextlib.contextmanager
    def preserved_inputs(self) -> Iterator[None]:
        """Extra forwards inside the block leave the recorded inputs as they were.

        The output tap sees a statistics subset or the Fisher products' forwards too, but they are not the training
        batch.
        """
        saved = self.last_inputs
        try:
            yield
        finally:
            self.last_inputs = saved

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
        batch = self.take() if self.n_examples > 0 else {}
        self.reset()
        self.disarm()
        return batch


def subset_size(n: int, fraction: float) -> int:
    """Examples in a leading subset of a batch of n: ceil(fraction·n), but at least 2 when n allows (train-mode
    BatchNorm needs more than one example)."""
    return max(min(2, n), min(n, math.ceil(fraction * n)))


def tap(y: torch.Tensor, x: torch.Tensor, state: CaptureState, site_index: int) -> torch.Tensor:
    """Identity on ``y``; when the state is armed, records (x, grad of y) in the backward."""
    if not torch.is_grad_enabled() or not y.requires_grad:
        return y
    if torch.compiler.is_compiling():
        # Inside a dynamo graph the tap is always there and its backward calls the opaque kfc::record op, which
        # reads the capture flags at run time (compile/ops.py): no guard on ``armed``, no graph break, one graph
        # for statistics and plain steps. (A Python backward would run ``record`` once, at trace time.)
        return compile_ops.tap(y, x, state.slot, state.compile_keys[site_index])
    if not state.armed:
        return y
    return _Tap.apply(y, x, state.slot, state, site_index)


class Tap(nn.Module):
    """The graph node inserted after a conv/linear call (``call_module`` of this module)."""

    def __init__(self, state: CaptureState, site_index: int):
        super().__init__()
        self.state = state
        self.site_index = site_index

    def forward(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return tap(y, x, self.state, self.site_index)

    def extra_repr(self) -> str:
        return f"site={self.site_index}"


class _OutputTap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, slot, state):  # noqa: D401 - autograd signature
        ctx.state = state
        ctx.save_for_backward(f)
        ctx.mark_dirty(f)
        return f

    @staticmethod
    def backward(ctx, grad):
        state = ctx.state
        fisher_pass = state.fisher_pass
        if fisher_pass is not None:
            # f is this node's own output (marked dirty), so the Fisher pass re-enters here: pass through then.
            (f,) = ctx.saved_tensors
            train_flags = (state.capture_input, state.capture_grad, state.grad_scale)
            state.fisher_pass = None
            try:
                with torch.enable_grad():
                    fisher_pass(f)
            finally:
                state.fisher_pass = fisher_pass
                state.set_capture(*train_flags)
        return grad, torch.zeros((), dtype=state.slot.dtype, device=grad.device), None


def model_output(out) -> torch.Tensor:
    """The tensor the loss is computed from: the output itself, or the first tensor of a tuple/list/dict."""
    if isinstance(out, torch.Tensor):
        return out
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"cannot find the model output tensor in a {type(out).__name__}")


def output_tap(out, state: CaptureState, inputs: tuple = ()):
    """Applied to the model's output. Keeps a reference to the forward's inputs (for Fisher-vector products on
    the batch), and on an armed step of a plain loop records the batch size and runs the Fisher pass at the start
    of the training backward (see ``CaptureState``)."""
    if not torch.is_grad_enabled():
        return out
    state.last_inputs = inputs
    if not state.armed:
        return out
    return _armed_output_tap(out, state)


@torch.compiler.disable
def _armed_output_tap(out, state: CaptureState):
    f = model_output(out)
    state.on_output(f.shape[0])
    if state.fisher_pass is None or not f.requires_grad:
        return out
    tapped = _OutputTap.apply(f, state.slot, state)
    if isinstance(out, torch.Tensor):
        return tapped
    return out  # f was marked dirty in place: the container already holds the tapped tensor


class OutputTap(nn.Module):
    """The graph node inserted before the model's output (``call_module`` of this module)."""

    def __init__(self, state: CaptureState):
        super().__init__()
        self.state = state

    def forward(self, out, *inputs):
        return output_tap(out, self.state, inputs)
