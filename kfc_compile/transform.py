"""``kc.transform``: trace a model, match its conv/linear sites, and insert capture taps."""
from __future__ import annotations

import logging
import warnings

from torch import nn

from kfc_compile.curvature.statistics import check_approx
from kfc_compile.frontend import select
from kfc_compile.frontend.dynamo.plain import capture, shallow_copy
from kfc_compile.frontend.fx.rewrite import Instrumenter
from kfc_compile.registry import KFCInfo

log = logging.getLogger(__name__)


class InvalidModelError(TypeError, ValueError):
    """The object given as a model is not an ``nn.Module``."""


def _fx_transform(model: nn.Module, approx: str, graphs: dict) -> tuple[nn.Module, KFCInfo]:
    """The fx pass over ``model``.

    ``graphs``: its whole-traced graphs by training mode (none: trace with black boxes; two: the forward branches on
    ``self.training``, and the result switches between both graphs).
    """
    inst = Instrumenter(model, approx)
    root = inst.instrument(model, "", traced=graphs.get(model.training))
    other = inst.instrument(model, "", traced=graphs[not model.training]) if len(graphs) == 2 else None
    return inst.finish(root, other)


def transform(model: nn.Module, approx: str = "expand", frontend: str = "auto") -> nn.Module:
    """Return a module computing the same function as ``model`` with KFC capture taps after every conv/linear.

    The result shares its parameters with ``model`` (which is not modified). ``result.kfc`` lists the matched
    layers (``.layers``), the parameters left out with reasons (``.uncovered``) and the untraceable submodules
    kept as black boxes (``.black_boxes``); ``kc.report(result)`` prints them. ``approx`` picks KFAC-expand
    (= the paper's KFC) or KFAC-reduce statistics for layers with weight sharing over positions.

    ``frontend``: ``"fx"`` (the torch.fx pass: layers known at once), ``"dynamo"`` (dynamo capture: keyword
    arguments, ``None`` defaults, ``ModelOutput`` returns, ``self.training`` branches; layers join ``.kfc`` at the
    first call) or ``"auto"``: fx where it traces the whole forward the same way in train and eval mode, dynamo
    otherwise (``frontend/select.py``).
    """
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"transform expects a torch.nn.Module, got {type(model).__name__}")
    check_approx(approx)
    if hasattr(model, "kfc") and getattr(model.kfc, "approx", None) is not None:
        raise ValueError("model is already transformed (it has a .kfc registry); pass the original model")
    chosen, plan = select.choose(model, frontend)
    if chosen == "dynamo":
        log.info("kfc: dynamo capture for %s (%s)", type(model).__name__, plan.obstacle if plan else "asked for")
        tm = shallow_copy(model)
        capture(tm, approx)
        return tm
    tm, info = _fx_transform(model, approx, plan.graphs)
    tm.kfc = info
    if not info.layers:
        warnings.warn(f"{type(model).__name__} has no conv/linear layer that KFC can precondition; "
                      "every parameter is left to the fallback optimizer", stacklevel=2)
    log.info("kfc: %d layers under KFC, %.1f%% of parameter elements", len(info.layers), 100 * info.coverage)
    return tm
