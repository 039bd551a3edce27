"""Resuming over a model whose layers do not exist yet.

Over a model compiled with the kfc backend whose layers are not compiled yet (a fresh model before its first
forward), ``KFC.load_state_dict`` keeps the state_dict and applies it at its next layer sync, before the step uses
them; a step while it still waits is refused here.
"""
from __future__ import annotations


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
