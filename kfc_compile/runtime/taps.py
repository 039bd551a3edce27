"""The capture tap: an identity node after each conv/linear call that feeds the factor statistics.

When statistics are not due (the normal case) the tap returns its input untouched: no autograd node, no saved
tensor, no work. When armed, an ``autograd.Function`` keeps a reference to the layer input (which the layer
already saved for its weight gradient, so no extra memory) and, in the backward, hands (input, grad_output) to
``CaptureState.record``. Ω is computed from the saved input in the backward (docs/architecture.md, Compiler facts), so
the forward graph carries no statistics work.

The tap returns its input marked dirty rather than a view, so in-place ops after a layer (``ReLU(inplace=True)``)
keep working. A shared scalar *slot* feeds every armed tap, so ``torch.autograd.grad(output, slot)`` runs a
backward that reaches every tap but computes no weight gradients: that is the Fisher pass that only feeds Γ.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from kfc_compile.runtime import record as record_op
from kfc_compile.runtime.state import CaptureState


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


def tap(y: torch.Tensor, x: torch.Tensor, state: CaptureState, site_index: int) -> torch.Tensor:
    """Identity on ``y``; when the state is armed, records (x, grad of y) in the backward."""
    if not torch.is_grad_enabled() or not y.requires_grad:
        return y
    if torch.compiler.is_compiling():
        # Inside a dynamo graph the tap is always there and its backward calls the opaque kfc::record op, which
        # reads the capture flags at run time (``record.py``): no guard on ``armed``, no graph break, one graph
        # for statistics and plain steps. (A Python backward would run ``record`` once, at trace time.)
        return record_op.tap(y, x, state.slot, state.compile_keys[site_index])
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
        """The layer output ``y``, tapped with the layer input ``x`` when statistics are due (see :func:`tap`)."""
        return tap(y, x, self.state, self.site_index)

    def extra_repr(self) -> str:
        """The index of the tapped site, for ``print(model)``."""
        return f"site={self.site_index}"


class _FisherTrigger:
    """The Fisher pass of one armed forward: run once, by the first backward that reaches one of its output taps.

    That is the tapped logits, or a loss the model computed itself from them (HF ``labels=``: ``out.loss`` is not
    computed from the tapped tensor, so a backward from it never reaches the logits' tap).
    """

    def __init__(self, state: CaptureState):
        self.state = state
        self.done = False

    def fire(self, f: torch.Tensor) -> None:
        state = self.state
        fisher_pass = state.fisher_pass
        if self.done or fisher_pass is None:
            return
        self.done = True
        # the Fisher pass starts from f, so it re-enters f's tap: that passes through (done; no fisher_pass)
        train_flags = (state.capture_input, state.capture_grad, state.grad_scale)
        state.fisher_pass = None
        try:
            with torch.enable_grad():
                fisher_pass(f)
        finally:
            state.fisher_pass = fisher_pass
            state.set_capture(*train_flags)


class _OutputTap(torch.autograd.Function):
    """On the logits: a backward that reaches them starts the Fisher pass.

    In place (``f`` marked dirty: every reference to the logits is the tapped tensor), or with ``dirty=False`` a
    new tensor the caller puts in the output in their place: an in-model loss may have saved the logits for its
    backward, which a version bump of them would break (HF DeBERTa's ``torch.gather``).
    """

    @staticmethod
    def forward(ctx, f, slot, state, trigger, dirty=True):  # noqa: D401 - autograd signature
        ctx.state, ctx.trigger = state, trigger
        ctx.save_for_backward(f)
        if not dirty:
            return f.view_as(f)
        ctx.mark_dirty(f)
        return f

    @staticmethod
    def backward(ctx, grad):
        (f,) = ctx.saved_tensors
        ctx.trigger.fire(f)
        return grad, torch.zeros((), dtype=ctx.state.slot.dtype, device=grad.device), None, None, None


class _LossTap(torch.autograd.Function):
    """On a loss the model returns next to its logits: a backward from it starts the Fisher pass from the logits."""

    @staticmethod
    def forward(ctx, loss, trigger, logits):  # noqa: D401 - autograd signature
        # logits: (the tapped logits,) in a tuple, so that they are no input of this node (no gradient edge); their
        # graph is alive at the start of this backward
        (ctx.f,), ctx.trigger = logits, trigger
        ctx.mark_dirty(loss)
        return loss

    @staticmethod
    def backward(ctx, grad):
        ctx.trigger.fire(ctx.f)
        return grad, None, None


def model_output(out, select: Callable[[object], torch.Tensor] | None = None) -> torch.Tensor:
    """The tensor the Fisher is built on (the logits).

    ``select(out)`` when given, else the output itself, its ``.logits`` / ``["logits"]`` (HF ``ModelOutput``s,
    dicts), or the first tensor with a batch dimension of a tuple / list / dict (a 0-d tensor there is a loss).
    """
    if select is not None:
        f = select(out)
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"output= returned a {type(f).__name__}, not the logits tensor")
        return f
    if isinstance(out, torch.Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ()
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return v
    raise TypeError(f"cannot find the logits in a model output of type {type(out).__name__}: pass "
                    "output=lambda out: ... (to kc.KFC, kc.curvature or kc.compile_step) to select them")


def output_tap(out, state: CaptureState, args: tuple = (), kwargs: dict | None = None):
    """Applied to the model's output: records the forward's call, and starts the Fisher pass on armed steps.

    Records the call ``model(*args, **kwargs)`` of every forward with grad enabled (references, no copies: the
    optimizer replays the step's calls on a leading subset for its statistics pass and its exact Fisher products),
    and on an armed step of a plain loop records the batch size and runs the Fisher pass at the start of the
    training backward (see ``CaptureState``).
    """
    if not torch.is_grad_enabled():
        return out
    state.add_call(args, {} if kwargs is None else kwargs)
    if not state.armed:
        return out
    return _armed_output_tap(out, state)


@torch.compiler.disable
def _armed_output_tap(out, state: CaptureState):
    f = model_output(out, state.output_fn)
    state.on_output(f.shape[0])
    state.observe_output(f)
    if state.fisher_pass is None or not f.requires_grad:
        return out
    trigger = _FisherTrigger(state)
    if isinstance(out, torch.Tensor):
        return _OutputTap.apply(f, state.slot, state, trigger)
    values = list(out.values() if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else ())
    # the model's own loss (a 0-d tensor next to the logits), computed from the untapped logits
    losses = [v for v in values if isinstance(v, torch.Tensor) and v is not f and v.dim() == 0 and v.requires_grad]
    keys = [k for k, v in out.items() if v is f] if isinstance(out, Mapping) and losses else []
    tapped = _OutputTap.apply(f, state.slot, state, trigger, not keys)
    for k in keys:  # a mapping (HF ModelOutput) with its own loss: the logits left untouched, replaced by the tap
        out[k] = tapped
    for loss in losses:
        _LossTap.apply(loss, trigger, (tapped,))
    return out  # f (unless replaced) and any loss were marked dirty in place: the container holds the taps


class OutputTap(nn.Module):
    """The graph node inserted before the model's output (``call_module`` of this module)."""

    def __init__(self, state: CaptureState):
        super().__init__()
        self.state = state

    def forward(self, out, *inputs):
        """The model output, tapped (see :func:`output_tap`); ``inputs`` are the graph's inputs, in order."""
        return output_tap(out, self.state, inputs)
