"""Which module ``kc.KFC`` instruments and trains: model resolution and routing.

A plain module is routed through its transformed graph.

``KFC`` accepts a plain ``nn.Module`` (transformed here, its forward routed in place), a ``kc.transform``ed module,
``torch.compile(kc.transform(m))``, or ``torch.compile(m, backend="kfc")`` (whose registry of layers is live: it
grows as dynamo compiles graphs). A ``DistributedDataParallel`` wrapper is looked through: its ``module`` is
instrumented and trained (routed in place, so DDP's own forward, and with it its gradient all-reduce, still runs).
"""
from __future__ import annotations

import types
import warnings

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfc_compile.frontend.dynamo.backend import registry_for
from kfc_compile.registry import KFCInfo
from kfc_compile.transform import transform


def is_compiled_module(model: object) -> bool:
    """Whether ``model`` is a ``torch.compile`` wrapper (dynamo's ``OptimizedModule``)."""
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - dynamo unavailable
        return False
    return isinstance(model, OptimizedModule)


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


def resolve_model(model: object, approx: str) -> tuple[nn.Module, nn.Module, bool]:
    """The modules behind what was passed to ``KFC``.

    Args:
        model: a plain or transformed module, or a ``torch.compile`` wrapper of either.
        approx: the KFC approximation (``"expand"``/``"reduce"``); a transformed module must have been built with it.

    Returns:
        (module whose ``.kfc`` registry and forward KFC uses, module whose parameters are trained, whether the
        latter must be routed through the former with :func:`route`).
    """
    if isinstance(model, DistributedDataParallel):  # DDP's forward calls model.module, routed here
        return resolve_model(model.module, approx)
    if is_compiled_module(model):
        if isinstance(getattr(model._orig_mod, "kfc", None), KFCInfo):  # torch.compile(kc.transform(m))
            return resolve_model(model._orig_mod, approx)
        registry_for(model, approx)
        return model, model._orig_mod, False
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = transform(model, approx)
    return tm, model, True
