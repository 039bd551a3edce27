"""Which module ``kc.KFC`` instruments and trains: model resolution and routing.

A plain module is routed through its transformed graph.

``KFC`` accepts a plain ``nn.Module`` (transformed here, its forward routed in place), a ``kc.transform``ed module,
``torch.compile(kc.transform(m))``, or ``torch.compile(m, backend="kfc")`` (whose registry of layers is live: it
grows as dynamo compiles graphs). A ``DistributedDataParallel`` wrapper is looked through: its ``module`` is
instrumented and trained (routed in place, so DDP's own forward, and with it its gradient all-reduce, still runs);
under ``torch.compile(DDP(m), backend="kfc")`` too, ``m`` is the trained module (its layers come from the graphs
dynamo compiles for it).
"""
from __future__ import annotations

import logging
import types
import warnings

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfc_compile.frontend import select
from kfc_compile.frontend.dynamo.backend import compiled_module, registry_for
from kfc_compile.frontend.dynamo.plain import capture
from kfc_compile.registry import KFCInfo
from kfc_compile.transform import transform

log = logging.getLogger(__name__)


def is_compiled_module(model: object) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (dynamo's ``OptimizedModule``)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - dynamo unavailable
        return False
    return isinstance(model, OptimizedModule)


def _rnn_eagerly(model: nn.Module, approx: str, frontend: str) -> tuple[nn.Module, nn.Module, bool]:
    """Route ``torch.compile(m, backend="kfc")`` of a model with an ``nn.LSTM``/``GRU``/``RNN`` to the plain module.

    Dynamo skips any frame that holds one (it would run the model eagerly, with no graph for the backend to
    instrument), so the compiled wrapper runs the instrumented plain module instead (the same layers as
    ``kc.KFC(m)``), with a warning.
    """
    orig = model._orig_mod
    warnings.warn(f"{type(orig).__name__} holds a recurrent module, which torch.compile does not trace (dynamo would "
                  "run it eagerly): KFC instruments it without the compiler; the compiled wrapper runs it uncompiled",
                  stacklevel=4)
    tm = transform(orig, approx, frontend)
    model.__dict__["forward"] = tm.forward
    model.__dict__["kfc"] = tm.kfc
    return tm, orig, False


def route(model: nn.Module, tm: nn.Module) -> None:
    """Send the plain module's forward through its transformed graph, in place.

    ``model.forward`` becomes ``tm.forward`` and ``model.kfc`` the registry; ``model.train()``/``model.eval()``
    also switch ``tm`` (whose black-box copies keep their own flags). Parameters are shared, so
    ``model.state_dict()``, ``model.load_state_dict()`` and ``model.to()`` keep working (move the model before
    building the optimizer: moved buffers of fx-inlined attributes are not re-shared).

    Args:
        model: the user's module.
        tm: its transformed graph module (``kc.transform(model)``).
    """
    model.__dict__["_kfc_transformed"] = tm  # not a registered submodule: model.state_dict() is unchanged
    model.forward = tm.forward
    model.kfc = tm.kfc
    model.train = types.MethodType(_routed_train, model)  # a bound method: copy.deepcopy(model) stays consistent


def _routed_train(self: nn.Module, mode: bool = True) -> nn.Module:
    type(self).train(self, mode)
    self.__dict__["_kfc_transformed"].train(mode)
    return self


def resolve_model(model: object, approx: str, frontend: str = "auto") -> tuple[nn.Module, nn.Module, bool]:
    """The modules behind what was passed to ``KFC``.

    Args:
        model: a plain or transformed module, or a ``torch.compile`` wrapper of either.
        approx: the KFC approximation (``"expand"``/``"reduce"``); a transformed module must have been built with it.
        frontend: how to instrument a plain module (``frontend/select.py``): the fx pass (a transformed graph the
            module is then routed through) or dynamo capture (in place: the module's forward is captured).

    Returns:
        (module whose ``.kfc`` registry and forward KFC uses, module whose parameters are trained, whether the
        latter must be routed through the former with :func:`route`).
    """
    if isinstance(model, DistributedDataParallel):  # DDP's forward calls model.module, routed here
        return resolve_model(model.module, approx, frontend)
    if is_compiled_module(model):
        orig = model._orig_mod
        if isinstance(getattr(orig, "kfc", None), KFCInfo):  # torch.compile(kc.transform(m))
            return resolve_model(orig, approx)
        if any(isinstance(m, nn.RNNBase) for m in orig.modules()):
            return _rnn_eagerly(model, approx, frontend)
        registry_for(model, approx)
        return model, compiled_module(model), False  # torch.compile(DDP(m)): m, as for KFC(DDP(m))
    if not isinstance(model, nn.Module):
        raise TypeError(f"KFC expects an nn.Module or a kc.transform()ed module, got {type(model).__name__}")
    info = getattr(model, "kfc", None)
    if isinstance(info, KFCInfo):
        if info.approx != approx:
            raise ValueError(f"approx={approx!r} but the model was transformed with approx={info.approx!r}")
        tm = model.__dict__.get("_kfc_transformed", model)
        if tm is not model and getattr(tm, "kfc", None) is not info:  # a deepcopy: GraphModule drops .kfc
            tm.kfc = info
        return tm, model, False
    chosen, plan = select.choose(model, frontend)
    if chosen == "dynamo":
        log.info("kfc: dynamo capture for %s (%s)", type(model).__name__, plan.obstacle if plan else "asked for")
        capture(model, approx)
        return model, model, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = transform(model, approx, frontend="fx")  # traces again: cheap next to the first steps
    return tm, model, True


_ROUTING = ("forward", "kfc", "train", "_kfc_transformed")  # instance attributes routing and capture add


def _routed(model: object) -> list:
    """The modules instrumentation may change: a DDP's module; for ``torch.compile(DDP(m))`` the wrapper and ``m``."""
    if isinstance(model, DistributedDataParallel):
        return [model.module]
    inner = model._orig_mod if is_compiled_module(model) else None
    return [model, inner.module] if isinstance(inner, DistributedDataParallel) else [model]


def routing_snapshot(model: object) -> list[dict]:
    """The instance attributes of ``model`` that routing would change (to undo a failed instrumentation)."""
    return [{k: m.__dict__[k] for k in _ROUTING if k in m.__dict__} if isinstance(m, nn.Module) else {}
            for m in _routed(model)]


def restore_routing(model: object, saved: list[dict]) -> None:
    """Put back what :func:`routing_snapshot` saw: the user's model runs exactly as before."""
    for m, kept in zip(_routed(model), saved, strict=True):
        if not isinstance(m, nn.Module):
            continue
        for k in _ROUTING:
            if k in kept:
                m.__dict__[k] = kept[k]
            else:
                m.__dict__.pop(k, None)


def check_coverage(owner: nn.Module, info: KFCInfo, fallback: str | None) -> bool:
    """At construction: an error when nothing would be trained, a warning when nothing is under KFC.

    Returns whether layers are still pending (a live registry before its first graph: layers join when dynamo
    compiles).
    """
    pending = getattr(info, "version", None) is not None and not info.graphs
    if not info.layers and not pending:
        if fallback is None:
            raise ValueError(f"{type(owner).__name__} has no layer KFC can precondition and fallback=None: "
                             "nothing would be trained (use fallback='sgd' or 'adam')")
        warnings.warn(f"{type(owner).__name__} has no layer KFC can precondition: every parameter is trained "
                      f"by the {fallback!r} fallback", stacklevel=4)
    return pending


def warn_if_uncovered(owner: nn.Module, info: KFCInfo, layers: list, fallback: str | None, warned: set) -> None:
    """Once, when a live registry has seen the model run but holds no layer (as the fx path warns at once)."""
    graphs = getattr(info, "graphs", None)
    if graphs is None or layers or "nolayers" in warned or not (graphs or info.state.recorded_calls()):
        return
    warned.add("nolayers")
    why = (f"the {graphs} graph(s) compiled so far have no layer KFC can precondition" if graphs else
           "dynamo compiled no graph for it (it runs frames it cannot trace eagerly, e.g. any frame with an "
           "nn.LSTM/nn.GRU): use kc.KFC(model) on the plain module")
    warnings.warn(f"{type(owner).__name__}: {why}; every parameter is trained by the {fallback!r} fallback",
                  stacklevel=4)
