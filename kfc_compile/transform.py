"""``kc.transform``: trace a model, match its conv/linear sites, and insert capture taps."""
from __future__ import annotations

import logging
import warnings

from torch import nn

from kfc_compile.frontend.fx.rewrite import Instrumenter

log = logging.getLogger(__name__)

APPROXIMATIONS = ("expand", "reduce")


class InvalidModelError(TypeError, ValueError):
    """The object given as a model is not an ``nn.Module``."""


def check_approx(approx: str) -> str:
    """Return ``approx`` if it names a statistics approximation (``expand``, ``reduce``), else raise ValueError."""
    if approx not in APPROXIMATIONS:
        raise ValueError(f"unknown approx {approx!r}: expected one of {APPROXIMATIONS}")
    return approx


def transform(model: nn.Module, approx: str = "expand") -> nn.Module:
    """Return a module computing the same function as ``model`` with KFC capture taps after every conv/linear.

    The result shares its parameters with ``model`` (which is not modified). ``result.kfc`` lists the matched
    layers (``.layers``), the parameters left out with reasons (``.uncovered``) and the untraceable submodules
    kept as black boxes (``.black_boxes``); ``kc.report(result)`` prints them. ``approx`` picks KFAC-expand
    (= the paper's KFC) or KFAC-reduce statistics for layers with weight sharing over positions.
    """
    if not isinstance(model, nn.Module):
        raise InvalidModelError(f"transform expects a torch.nn.Module, got {type(model).__name__}")
    check_approx(approx)
    if hasattr(model, "kfc") and getattr(model.kfc, "approx", None) is not None:
        raise ValueError("model is already transformed (it has a .kfc registry); pass the original model")
    inst = Instrumenter(model, approx)
    tm, info = inst.finish(inst.instrument(model, ""))
    tm.kfc = info
    if not info.layers:
        warnings.warn(f"{type(model).__name__} has no conv/linear layer that KFC can precondition; "
                      "every parameter is left to the fallback optimizer", stacklevel=2)
    log.info("kfc: %d layers under KFC, %.1f%% of parameter elements", len(info.layers), 100 * info.coverage)
    return tm
