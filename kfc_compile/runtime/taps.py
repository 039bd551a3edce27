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

import inspect
import warnings
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


def forward_signature(forward: Callable) -> inspect.Signature | None:
    """The signature of a (bound) forward, for :func:`replay_inputs`; None when it has none to inspect."""
    try:
        return inspect.signature(forward)
    except (TypeError, ValueError):
        return None


def replay_inputs(signature: inspect.Signature | None, args: tuple, kwargs: Mapping) -> tuple | None:
    """A call's arguments as the positional tuple that replays it, or None when no positional call is the same.

    The optimizer's extra forwards (the statistics subset, the exact Fisher products) call the model with the
    recorded inputs as positional arguments. A keyword argument goes to its parameter's place, and parameters the
    caller skipped before it get their defaults, so ``forward(*replay)`` is the same call as
    ``forward(*args, **kwargs)`` (HF models: ``model(input_ids=ids, attention_mask=mask)``). A keyword-only
    parameter or an extra ``**kwargs`` entry has no positional place: None then.
    """
    if not kwargs:
        return tuple(args)
    if signature is None:
        return None
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return None
    given = bound.arguments
    out: list = []
    pending: list = []  # defaults of skipped parameters, kept only if a later argument is given
    for p in signature.parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            if p.name in given:
                out += pending + [given[p.name]]
                pending = []
            elif p.default is p.empty:
                return None
            else:
                pending.append(p.default)
        elif p.kind is p.VAR_POSITIONAL:
            if len(given.get(p.name, ())):
                out += pending + list(given[p.name])
                pending = []
        elif p.kind is p.KEYWORD_ONLY and p.name in given or p.kind is p.VAR_KEYWORD and len(given.get(p.name, {})):
            return None
    return tuple(out)


def output_tap(out, state: CaptureState, inputs: tuple | None = ()):
    """Applied to the model's output: keeps the forward's inputs, and starts the Fisher pass on armed steps.

    Keeps a reference to the forward's inputs (for Fisher-vector products on the batch; None: a call that
    :func:`replay_inputs` cannot replay, said once), and on an armed step of a plain loop records the batch size
    and runs the Fisher pass at the start of the training backward (see ``CaptureState``).
    """
    if not torch.is_grad_enabled():
        return out
    if inputs is None:
        if not state.warned_replay:
            state.warned_replay = True
            warnings.warn("kfc: this forward was called with keyword arguments that have no positional place "
                          "(keyword-only parameters or **kwargs): the optimizer cannot replay it for its exact "
                          "Fisher products or a statistics subset; pass them positionally, or use "
                          "clip_curvature='factored' (or clip=None) and stats_fraction=1.0", stacklevel=3)
        inputs = ()
    state.last_inputs = inputs
    if not state.armed:
        return out
    return _armed_output_tap(out, state)


@torch.compiler.disable
def _armed_output_tap(out, state: CaptureState):
    f = model_output(out, state.output_fn)
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
        """The model output, tapped (see :func:`output_tap`); ``inputs`` are the forward's positional inputs."""
        return output_tap(out, self.state, inputs)
