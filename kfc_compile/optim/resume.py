"""Restoring the layer-dependent part of a ``kc.KFC`` state_dict: groups, ``torch.optim`` state, factors, inverses.

``KFC.load_state_dict`` restores the rest (step count, once-only warnings, RNG) at once. Over a model compiled with
the kfc backend whose layers are not compiled yet (a fresh model before its first forward) this part waits until
the layers appear: ``KFC`` keeps the state_dict and applies it at its next layer sync, before the step uses them.
"""
from __future__ import annotations

import torch

from kfc_compile.curvature.estimator import CurvatureEstimator


def load_layers(optimizer: torch.optim.Optimizer, estimator: CurvatureEstimator, state_dict: dict) -> None:
    """Restore the groups and ``torch.optim`` state of ``optimizer`` and the estimator's per-layer state.

    Raises:
        ValueError: the saved layers (names, or factor shapes) are not the estimator's; nothing is changed then.
    """
    kfc = state_dict["kfc"]
    saved = [entry["name"] for entry in kfc["layers"]]
    if saved != [s.layer.name for s in estimator.states]:
        raise ValueError(f"state_dict layers {saved} do not match this optimizer's "
                         f"{[s.layer.name for s in estimator.states]}")
    for s, entry in zip(estimator.states, kfc["layers"], strict=True):
        s.check(entry)
    torch.optim.Optimizer.load_state_dict(optimizer, {k: v for k, v in state_dict.items() if k != "kfc"})
    estimator.scale = float(kfc["scale"])
    for s, entry in zip(estimator.states, kfc["layers"], strict=True):
        s.load(entry)
    estimator.rebuild_buckets()


def require_applied(pending: dict | None) -> None:
    """Refuse a step while a loaded state_dict still waits for its layers (it would train as a fresh optimizer).

    Raises:
        RuntimeError: ``pending`` is a state_dict not applied yet.
    """
    if pending is not None:
        names = [entry["name"] for entry in pending["kfc"]["layers"]]
        raise RuntimeError(f"the loaded KFC state_dict waits for its layers {names}, but the kfc backend has not "
                           "compiled any layer of this model yet: run its forward (with grad enabled, through the "
                           "torch.compile(..., backend='kfc') module) before opt.step(); if dynamo reported hitting "
                           "its recompile limit, the model ran uncompiled")
