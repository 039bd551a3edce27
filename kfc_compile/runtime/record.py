"""Compile-clean statistics capture: the ``kfc::record`` op and the tap that calls it.

Inside a compiled graph a tap cannot run Python in its backward: dynamo/AOT would execute that Python once, at
trace time. So the backward of the tap calls an opaque custom op, ``kfc::record(x, gy, key)``, that stays a node
of the compiled backward graph (``has_side_effect`` keeps it through dead-code elimination; its fake
implementation does nothing) and whose real implementation runs at every backward, in eager Python:
it looks up ``key`` in a module-level site table and calls ``CaptureState.record``. That method reads the capture
flags at runtime and returns at once when no statistics are due, so the compiled graphs carry no guard on them:
statistics steps and plain steps run the same compiled graph.

Graph nodes may only hold importable module-level functions and ints, hence the table: ``key`` → (state, site
index in that state). A key can be re-pointed (``retarget``) when a registry is merged into another one. The table
holds states weakly (a dead model's statistics are simply not recorded), so it never keeps a model alive, and a
state's keys are freed with it.
"""
from __future__ import annotations

import itertools
import threading
import weakref

import torch

__all__ = ["live_keys", "new_site", "retarget", "site_ref", "tap"]


class _SiteRef:
    __slots__ = ("_state", "index", "seq_first")

    def __init__(self, state, index: int, seq_first: bool = False):
        self._state = weakref.ref(state)
        self.index = index
        self.seq_first = seq_first

    @property
    def state(self):
        return self._state()


_SITES: dict[int, _SiteRef] = {}
_NEXT = itertools.count()
_LOCK = threading.Lock()


def _release(key: int) -> None:
    """Drop a key whose state is gone (a key re-pointed to a live state stays)."""
    with _LOCK:
        ref = _SITES.get(key)
        if ref is not None and ref.state is None:
            del _SITES[key]


def new_site(state, index: int, seq_first: bool = False) -> int:
    """A key for site ``index`` of ``state`` (a ``CaptureState``), freed when the state is.

    ``seq_first``: the site sees (sequence, batch, ...) tensors (attention's projections); they are handed to the
    state batch-first.
    """
    with _LOCK:
        key = next(_NEXT)
        _SITES[key] = _SiteRef(state, index, seq_first)
    weakref.finalize(state, _release, key)
    return key


def site_ref(key: int) -> _SiteRef:
    """The (state, site index) a key points to."""
    return _SITES[key]


def retarget(key: int, state, index: int) -> None:
    """Point ``key`` at site ``index`` of another state (registries merged); it is then freed with that state."""
    ref = _SITES[key]
    ref._state, ref.index = weakref.ref(state), index
    weakref.finalize(state, _release, key)


def live_keys() -> int:
    """Keys currently allocated (tests: keys of dead models are freed)."""
    return len(_SITES)


@torch.library.custom_op("kfc::record", mutates_args=())
def record(x: torch.Tensor, gy: torch.Tensor, key: int) -> None:
    """Hand (layer input, output gradient) of one call site to its capture state (no-op unless capturing)."""
    ref = _SITES.get(key)  # None: the model is gone (a compiled graph outliving it records nothing)
    state = ref.state if ref is not None else None
    if state is not None:
        if ref.seq_first:
            x, gy = x.transpose(0, 1), gy.transpose(0, 1)
        state.record(ref.index, x, gy)


@record.register_fake
def _record_fake(x: torch.Tensor, gy: torch.Tensor, key: int) -> None:
    return None


torch.fx.node.has_side_effect(torch.ops.kfc.record.default)


class _CompiledTap(torch.autograd.Function):
    """Identity on ``y`` (returned marked dirty, so in-place ops after the layer keep working).

    The backward records (x, grad of y) through ``kfc::record`` and gives the statistics slot a zero gradient (the
    slot makes ``torch.autograd.grad(output, slot)`` reach every tap: the Fisher pass).
    """

    @staticmethod
    def forward(ctx, y, x, slot, key):  # noqa: D401 - autograd signature
        ctx.save_for_backward(x)
        ctx.key = key
        ctx.slot_meta = (slot.dtype, slot.device)
        ctx.mark_dirty(y)
        return y

    @staticmethod
    def backward(ctx, gy):
        (x,) = ctx.saved_tensors
        torch.ops.kfc.record(x, gy, ctx.key)
        dtype, device = ctx.slot_meta
        return gy, None, torch.zeros((), dtype=dtype, device=device), None


def tap(y: torch.Tensor, x: torch.Tensor, slot: torch.Tensor, key: int) -> torch.Tensor:
    """The node the ``kfc`` backend inserts after a conv/linear call.

    A module-level function: fx codegen needs an importable target.
    """
    return _CompiledTap.apply(y, x, slot, key)
