"""Turning a model into an fx graph: the leaf policy and the partial-trace fallback.

Every ``nn.Linear``/``_ConvNd`` subclass with the stock ``forward`` is a leaf (so torchvision's ``Conv3DSimple``
is not inlined into a ``get_attr`` + ``conv3d`` and lost). A submodule whose forward cannot be traced
(data-dependent control flow, iteration over proxies) is retried as an opaque leaf; the caller instruments
what is inside it separately. Tracing therefore never fails on a model merely because part of it is untraceable.
"""
from __future__ import annotations

import logging
import os
import traceback

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils import parametrize

from kfc_compile.registry import BlackBox

log = logging.getLogger(__name__)

_STOCK_FORWARDS = {
    nn.Linear.forward, nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward,
    nn.ConvTranspose1d.forward, nn.ConvTranspose2d.forward, nn.ConvTranspose3d.forward,
}


def qualified(prefix: str, name: str) -> str:
    """``prefix.name`` for a submodule path (either part may be empty)."""
    return f"{prefix}.{name}" if prefix and name else prefix or name


def is_layer_module(m: nn.Module) -> bool:
    """A linear or conv module whose forward is the stock one (so its call is exactly one F.linear/F.conv)."""
    return (isinstance(m, (nn.Linear, _ConvNd)) and type(m).forward in _STOCK_FORWARDS
            and not parametrize.is_parametrized(m))


class KFCTracer(fx.Tracer):
    """``symbolic_trace``'s tracer with conv/linear leaves, opaque submodules, and a stack of modules in progress."""

    def __init__(self, opaque: set[str]):
        super().__init__()
        self.opaque = opaque
        self.stack: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """Conv/linear modules, opaque submodules and ``nn.MultiheadAttention`` are leaves; the rest as fx decides."""
        if is_layer_module(m) or qualname in self.opaque or (is_fsdp_unit(m) and m is not self.root):
            return True  # an FSDP2 unit: called with its hooks (its parameters are sharded outside them)
        if isinstance(m, nn.MultiheadAttention):
            return True  # its projections are functional calls behind control flow; matched as uncovered
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        """Trace a call of ``m``, keeping on ``stack`` the qualified names of the non-leaf modules being traced."""
        try:
            qualname = self.path_of_module(m)
        except NameError:
            return super().call_module(m, forward, args, kwargs)
        if self.is_leaf_module(m, qualname):
            return super().call_module(m, forward, args, kwargs)
        self.stack.append(qualname)
        out = super().call_module(m, forward, args, kwargs)
        self.stack.pop()
        return out


#: the black-box reason of an FSDP2 unit inside the model: a leaf of the parent's graph, so that FSDP's hooks run
FSDP_UNIT = "an FSDP2 unit (fully_shard): called with its hooks, its own forward instrumented in place"


def is_fsdp_unit(m: nn.Module) -> bool:
    """Whether ``m`` is an FSDP2 unit (``fully_shard`` applied to it)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return False
    return isinstance(m, FSDPModule)


def fsdp_units(module: nn.Module) -> list[str]:
    """The outermost FSDP2 units inside ``module`` to instrument in place (no layer modules, no own parameters).

    fx traces through a submodule's ``forward`` without its hooks, which would leave a unit's parameters sharded
    in the forward; as leaves they are called with their hooks, and their own forward is instrumented in place. A
    unit with parameters of its own (read as graph attributes, which would not follow FSDP's unsharding) stays a
    plain leaf: its parameters go to the fallback.
    """
    units: list[str] = []
    for name, m in module.named_modules():
        if any(name.startswith(u + ".") for u in units) or not name or not is_fsdp_unit(m) or is_layer_module(m):
            continue
        if not any(True for _ in m.parameters(recurse=False)):
            units.append(name)
    return units


_LIBRARY_DIRS = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(__file__)))


def _reason(e: Exception) -> str:
    """What stopped tracing, in words, and where: the innermost frame of the model's own code (file:line)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    where = ""
    for frame in reversed(traceback.extract_tb(e.__traceback__)):
        if not frame.filename.startswith(_LIBRARY_DIRS) and not frame.filename.startswith("<"):
            where = f" at {os.path.basename(frame.filename)}:{frame.lineno} ({(frame.line or '').strip()[:80]})"
            break
    return f"{type(e).__name__}: {text[:200]}{where}"


def trace_with_fallback(module: nn.Module) -> tuple[fx.GraphModule | None, list[BlackBox]]:
    """Trace ``module``; submodules that fail become opaque leaves.

    Returns (None, [root reason]) if the root's own forward is untraceable. Black-box names are relative to
    ``module``.
    """
    opaque: dict[str, str] = dict.fromkeys(fsdp_units(module), FSDP_UNIT)
    while True:
        tracer = KFCTracer(set(opaque))
        try:
            graph = tracer.trace(module)
        except Exception as e:  # noqa: BLE001 - any tracing failure means "keep it opaque"
            if not tracer.stack or tracer.stack[-1] in opaque:
                return None, [BlackBox("", _reason(e))]
            opaque[tracer.stack[-1]] = _reason(e)
            log.info("kfc: submodule %r is untraceable (%s); keeping it opaque", tracer.stack[-1], _reason(e))
            continue
        gm = fx.GraphModule(tracer.root, graph, type(module).__name__)
        return gm, [BlackBox(name, reason) for name, reason in opaque.items()]
