"""Which weights go under KFC: the rejection rules, ``KFCLayer`` construction and the uncovered accounting.

Both front ends collect ``Candidate`` calls and the other uses of parameters (with a reason each), then ask this
module. A weight is a KFC layer when every use of it, and of its bias, is a conv/linear call of one geometry with
one bias parameter; otherwise it and its bias are left to the fallback optimizer with the first reason that applies.
A weight may also have a layer already (the dynamo backend sees a model graph by graph): the new calls must then
agree with it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from torch import nn

from kfc_compile.registry import KFCLayer, Uncovered
from kfc_compile.sites.kinds import Candidate

OtherUse = Callable[[nn.Parameter], "str | None"]  # parameter -> why it is used outside a layer call, or None


def geometry(site) -> tuple:
    """What must agree between the uses of one weight for them to share a factor pair."""
    return site.kind, site.a_dim, site.g_dim, site.groups


def describe(site) -> str:
    """A site's geometry for a reason: ``kind in→out`` (per group, with the group count when grouped)."""
    return f"{site.kind} {site.a_dim}→{site.g_dim}" + (f" in {site.groups} groups" if site.groups > 1 else "")


def trainable_bias(cands: list[Candidate]) -> nn.Parameter | None:
    """The bias parameter of a weight's calls (a frozen or computed bias is a constant: not part of the layer)."""
    return next((c.bias for c in cands if c.bias is not None and c.bias.requires_grad), None)


def reject_reason(cands: list[Candidate], other_use: OtherUse, layer: KFCLayer | None = None) -> str:
    """Why the weight of ``cands`` (all its calls in one graph) cannot be a KFC layer; "" when it can.

    ``layer``: the weight's layer from earlier graphs, which the new calls must agree with.
    """
    weight = cands[0].weight
    why = other_use(weight)
    if why:
        return f"weight also {why}"
    if len({id(c.bias) for c in cands if c.bias is not None and c.bias.requires_grad}) > 1:
        return "weight shared by calls with different bias parameters"
    for c in cands:
        why = other_use(c.bias) if c.bias is not None else None
        if why:
            return f"bias also {why}"
    first = geometry(cands[0].site)
    if any(geometry(c.site) != first for c in cands) or (layer is not None and geometry(layer.sites[0]) != first):
        sites = [c.site for c in cands] + ([layer.sites[0]] if layer is not None else [])
        calls = ", ".join(sorted({describe(site) for site in sites}))
        return f"weight also used by calls of another kind, layout or geometry ({calls}): no shared Kronecker factors"
    if layer is not None:
        bias = trainable_bias(cands)
        if bias is not None and layer.bias is not None and bias is not layer.bias:
            return "weight shared by calls with different bias parameters"
        if bias is not None and layer.bias is None:
            return "weight used with a bias in one graph and without in another"
    return ""


def bind_sites(cands: list[Candidate]) -> None:
    """A call whose bias is computed or frozen contributes to the weight block only (its bias is a constant)."""
    for c in cands:
        if c.site.has_bias and (c.bias is None or not c.bias.requires_grad):
            c.site = dataclasses.replace(c.site, has_bias=False)


def new_layer(name: str, cands: list[Candidate]) -> KFCLayer:
    """The ``KFCLayer`` of an accepted weight and its calls (sites bound first, see ``bind_sites``)."""
    bind_sites(cands)
    bias = trainable_bias(cands)
    site = cands[0].site
    return KFCLayer(name=name, kind=site.kind, weight=cands[0].weight, bias=bias,
                    a_dim=site.a_dim + (bias is not None), g_dim=site.g_dim, groups=site.groups, uses=len(cands),
                    sites=[c.site for c in cands])


def layer_name(cand: Candidate, names: dict[int, str], guess: str = "<unnamed>") -> str:
    """A module call's module name; else the weight's qualified name without ``.weight``."""
    if cand.name is not None:
        return cand.name
    name = names.get(id(cand.weight), guess)
    return name[: -len(".weight")] if name.endswith(".weight") else name


def group_by_weight(cands: Iterable[Candidate]) -> list[list[Candidate]]:
    """Candidates grouped by weight parameter, in first-use order."""
    groups: dict[int, list[Candidate]] = {}
    for c in cands:
        groups.setdefault(id(c.weight), []).append(c)
    return list(groups.values())


def account(named_params: Iterable[tuple[str, nn.Parameter]], layers: list[KFCLayer],
            reason_of: Callable[[nn.Parameter], str]) -> tuple[list[Uncovered], list[str], int]:
    """(uncovered parameters with reasons, frozen parameter names, trainable elements) of a model's parameters."""
    covered = {id(p) for layer in layers for p in (layer.weight, layer.bias) if p is not None}
    uncovered, frozen, total, seen = [], [], 0, set()
    for name, p in named_params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if not p.requires_grad:
            frozen.append(name)
            continue
        total += p.numel()
        if id(p) not in covered:
            uncovered.append(Uncovered(name, tuple(p.shape), reason_of(p)))
    return uncovered, frozen, total


def leaf_reason(m: nn.Module, name: str) -> str:
    """Why the parameters of a module that is not a conv/linear call are not under KFC."""
    cls = type(m).__name__
    if isinstance(m, nn.MultiheadAttention):
        return f"{cls} '{name}': packed attention projections are computed functionally inside it"
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return f"{cls} '{name}': normalization layer (not conv/linear)"
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return f"{cls} '{name}': embedding (not conv/linear)"
    if isinstance(m, nn.RNNBase):
        return f"{cls} '{name}': recurrent layer (its weights act through the recurrence, not as one conv/linear call)"
    return f"{cls} '{name}': not a conv/linear layer"
