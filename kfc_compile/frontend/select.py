"""Which front end takes a plain module: the fx pass where it is the better tool, dynamo capture elsewhere.

The fx pass (``frontend/fx``) gives layers before the first call, exact taps inside opaque calls (attention
modules, fx-wrapped functions such as torchvision's Swin attention, whose padded tokens it keeps out of the
statistics) and a transformed module with no compiler underneath. It is right for a forward that torch.fx can
trace whole, with positional tensor arguments. fx bakes the training mode it traced in (eval outputs of a model with
stochastic depth would stay stochastic), so the model is traced in both modes and, where the graphs differ, the
transformed module carries both and switches with ``train()``/``eval()`` (the root module's flag decides; stock
``torch.nn`` leaves such as Dropout and BatchNorm read their own flags at run time). Dynamo capture
(``frontend/dynamo/plain.py``) takes everything else: keyword arguments and ``None`` defaults (fx would trace a proxy
where the caller passes None), ``*args``/``**kwargs``, untraceable Python.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from kfc_compile.frontend.fx.trace import FSDP_UNIT, trace_with_fallback

FRONTENDS = ("auto", "fx", "dynamo")


def check_frontend(frontend: str) -> str:
    """``frontend`` if it is one of :data:`FRONTENDS`, else a ValueError listing them."""
    if frontend not in FRONTENDS:
        raise ValueError(f"unknown frontend {frontend!r}: expected one of {FRONTENDS}")
    return frontend


def _signature_obstacle(model: nn.Module) -> str:
    try:
        sig = inspect.signature(type(model).forward)
    except (TypeError, ValueError):
        return "its forward has no inspectable signature"
    for p in list(sig.parameters.values())[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return f"its forward takes {'*' if p.kind == p.VAR_POSITIONAL else '**'}{p.name}"
        if p.default is not p.empty:
            return f"its forward argument {p.name!r} has a default ({p.default!r}); fx would trace it as a tensor"
    return ""


def trace_in_mode(model: nn.Module, training: bool) -> tuple[fx.GraphModule | None, list]:
    """``trace_with_fallback(model)`` with every module's training flag set to ``training`` (restored after)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        for m, _ in flags:
            m.training = training
        return trace_with_fallback(model)
    finally:
        for m, flag in flags:
            m.training = flag


@dataclass
class FxPlan:
    """What the fx pass would do with a model.

    ``obstacle`` ("" when fx is the tool), and its traced graphs by training mode — one entry when the forward
    computes the same graph in both modes, two when it branches on ``self.training`` (the transformed module then
    switches between them with ``train()``/``eval()``).
    """

    obstacle: str
    graphs: dict[bool, fx.GraphModule]


def fx_plan(model: nn.Module) -> FxPlan:
    """Trace ``model`` in its mode and in the other one, and say whether the fx pass can take it whole."""
    why = _signature_obstacle(model)
    if why:
        return FxPlan(why, {})
    gm, boxes = trace_in_mode(model, model.training)
    if gm is not None and boxes and all(b.reason == FSDP_UNIT for b in boxes):
        return FxPlan("", {})  # FSDP2 units are leaves with hooks by design: instrumented with them (rewrite.py)
    if gm is None or boxes:  # trace_with_fallback names at least one black box then
        return FxPlan(f"torch.fx cannot trace all of its forward ({boxes[0].name or 'the root module'}: "
                      f"{boxes[0].reason})", {})
    other, other_boxes = trace_in_mode(model, not model.training)
    if other is None or other_boxes:
        return FxPlan("torch.fx traces it in one mode only", {})
    if other.code == gm.code:
        return FxPlan("", {model.training: gm})
    return FxPlan("", {model.training: gm, not model.training: other})


def choose(model: nn.Module, frontend: str) -> tuple[str, FxPlan | None]:
    """(front end for ``model``, its fx plan when fx is chosen) for a requested ``frontend`` of :data:`FRONTENDS`."""
    check_frontend(frontend)
    if frontend == "dynamo":
        return "dynamo", None
    plan = fx_plan(model)
    if frontend == "fx" or not plan.obstacle:
        return "fx", plan
    return "dynamo", plan
