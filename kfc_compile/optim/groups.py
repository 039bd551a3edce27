"""``kc.KFC``'s parameter groups: role ``"kfc"`` and role ``"fallback"``.

The KFC group holds the KFC layers' weights and biases (preconditioned), the fallback group every other trainable
parameter (for the SGD or Adam fallback).

With a live registry (``torch.compile(m, backend="kfc")``) layers join and leave as dynamo compiles graphs: the
KFC group then exists from the start (possibly empty) and the split is redone whenever the layer list changes.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from kfc_compile.optim.options import KFCOptions
from kfc_compile.registry import KFCLayer


def layer_params(layers: Sequence[KFCLayer]) -> list[nn.Parameter]:
    """The weights and biases of the layers, in layer order."""
    return [p for layer in layers for p in (layer.weight, layer.bias) if p is not None]


def find_group(groups: Sequence[dict], role: str) -> dict | None:
    """The group with that role (``"kfc"`` or ``"fallback"``), or None."""
    return next((g for g in groups if g["role"] == role), None)


def _names(owner: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in owner.named_parameters()}


def initial_groups(layers: Sequence[KFCLayer], owner: nn.Module, options: KFCOptions,
                   pending: bool) -> tuple[list[dict], list[str]]:
    """The parameter groups of a new optimizer.

    Args:
        layers: the KFC layers.
        owner: the module whose parameters are trained.
        options: the optimizer's options (initial hyper-parameters, fallback kind).
        pending: a live registry with nothing compiled yet: keep an empty KFC group for the layers to come.

    Returns:
        (groups, names of the fallback parameters: empty without a fallback).

    Raises:
        ValueError: no parameter would be trained.
    """
    covered = {id(p) for p in layer_params(layers)}
    rest = [p for p in owner.parameters() if p.requires_grad and id(p) not in covered]
    names = _names(owner)
    fallback_names = [names.get(id(p), "?") for p in rest] if options.fallback is not None else []
    if rest and options.fallback is None:
        warnings.warn(f"fallback=None: {len(rest)} parameter tensor(s) outside KFC are not trained: "
                      f"{[names.get(id(p), '?') for p in rest][:8]}", stacklevel=3)
    groups = []
    common = hyper_parameters(options)
    kfc_params = layer_params(layers)
    if kfc_params or pending:
        groups.append({"params": kfc_params, "role": "kfc", **common})
    if rest and options.fallback is not None:
        groups.append({"params": rest, "role": "fallback", **common, "lr": options.fallback_learning_rate,
                       "betas": options.fallback_betas, "eps": options.fallback_eps})
    if not groups:
        raise ValueError("the model has no trainable parameter")
    return groups, fallback_names


def hyper_parameters(options: KFCOptions) -> dict:
    """The hyper-parameters every group starts with (the optimizer's ``defaults``)."""
    return dict(lr=options.lr, momentum=options.momentum, damping=options.damping, weight_decay=options.weight_decay)


def regroup(groups: list[dict], defaults: dict, layers: Sequence[KFCLayer], owner_params: Sequence[torch.Tensor],
            owner: nn.Module) -> list[str] | None:
    """Redo the split in place after the layer list changed.

    The layers' parameters form the KFC group (created first with ``defaults`` if missing), the other trainable
    ``owner_params`` the fallback group.

    Returns:
        The fallback parameters' names, or None when there is no fallback group.
    """
    kfc_params = layer_params(layers)
    covered = {id(p) for p in kfc_params}
    kg = find_group(groups, "kfc")
    if kg is None:
        kg = {**defaults, "params": [], "role": "kfc"}
        groups.insert(0, kg)
    kg["params"] = kfc_params
    fg = find_group(groups, "fallback")
    if fg is None:
        return None
    fg["params"] = [p for p in owner_params if p.requires_grad and id(p) not in covered]
    names = _names(owner)
    return [names.get(id(p), "?") for p in fg["params"]]
