"""Finding conv/linear sites in an fx graph, and recording every other use of a parameter with a reason.

A *site* is one call: a ``call_module`` of a stock Linear/Conv module, or a ``call_function`` of
``F.linear``/``F.conv{1,2,3}d`` (= ``torch.conv*d``) whose weight is a ``get_attr`` of a parameter. Anything
else that touches a parameter is a *use* that keeps that parameter out of KFC, with a reason for the report.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvTransposeNd

from kfc_compile.curvature.layers import Site, conv_site, linear_site
from kfc_compile.graph import opaque
from kfc_compile.graph.trace import is_layer_module

_FUNCTIONAL_CONV = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


@dataclass
class SiteMatch:
    """One matched call: the graph node (or None inside a black box), its input node, the site geometry."""

    node: fx.Node | None
    input_node: fx.Node | None
    weight: nn.Parameter
    bias: nn.Parameter | None  # the bias parameter, if the call's bias is a parameter
    site: Site
    module_name: str | None  # qualified name of the owning module, None for a functional call


@dataclass
class Use:
    """A use of a parameter that is not a matched site."""

    param: nn.Parameter
    reason: str


def module_site(m: nn.Module) -> tuple[Site | None, str]:
    """The site of a stock conv/linear module, or None and the reason it is not supported."""
    if isinstance(m, _ConvTransposeNd):
        return None, (f"{type(m).__name__}: transposed convolution is not under KFC (its factors swap roles: Ω from "
                      "the input channels, Γ from output-gradient patches, and the bias does not fit that "
                      "Kronecker form)")
    if isinstance(m, nn.Linear):
        return linear_site(m.weight, m.bias is not None), ""
    return conv_site(m.weight, m.bias is not None, m.stride, m.padding, m.dilation, m.groups, m.padding_mode), ""


def leaf_reason(m: nn.Module, name: str) -> str:
    """Why the parameters of a non-conv/linear leaf module are not under KFC."""
    cls = type(m).__name__
    if isinstance(m, nn.MultiheadAttention):
        return f"{cls} '{name}': packed attention projections are computed functionally inside it"
    if isinstance(m, (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)):
        return f"{cls} '{name}': normalization layer (not conv/linear)"
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)):
        return f"{cls} '{name}': embedding (not conv/linear)"
    return f"{cls} '{name}': not a conv/linear layer"


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _param(gm: fx.GraphModule, node) -> nn.Parameter | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            obj = gm.get_parameter(node.target)
        except AttributeError:
            return None
        return obj if isinstance(obj, nn.Parameter) else None
    return None


def _functional_site(gm: fx.GraphModule, node: fx.Node) -> SiteMatch | None:
    """Match ``F.linear``/``F.conv*d`` with a parameter weight and static geometry."""
    if node.target is F.linear:
        x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
        weight = _param(gm, w)
        if weight is None or not isinstance(x, fx.Node):
            return None
        bias = _param(gm, b)
        return SiteMatch(node, x, weight, bias, linear_site(weight, b is not None), None)
    if node.target in _FUNCTIONAL_CONV:
        vals = {name: _arg(node, i, name, _CONV_DEFAULTS.get(name)) for i, name in enumerate(_CONV_ARGS)}
        weight = _param(gm, vals["weight"])
        if weight is None or not isinstance(vals["input"], fx.Node):
            return None
        if weight.dim() != _FUNCTIONAL_CONV[node.target] + 2:
            return None
        geometry = [vals[k] for k in ("stride", "padding", "dilation", "groups")]
        if any(isinstance(v, fx.Node) or (isinstance(v, (tuple, list)) and any(isinstance(i, fx.Node) for i in v))
               for v in geometry):
            return None
        site = conv_site(weight, vals["bias"] is not None, *geometry)
        return SiteMatch(node, vals["input"], weight, _param(gm, vals["bias"]), site, None)
    return None


def _op_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if node.op == "call_function" else f"{node.op} {t}"


@dataclass
class OpaqueMatch:
    """An opaque call with linear weights inside (see ``opaque.py``): the node and what to tap in it."""

    node: fx.Node
    plan: opaque.OpaquePlan


def _param_args(gm: fx.GraphModule, node: fx.Node) -> list[tuple[str, nn.Parameter, bool]]:
    """The parameters passed directly to a call: (name, parameter, whether it is an ``nn.Linear``'s weight)."""
    out = []
    for a in (*node.args, *node.kwargs.values()):
        for v in (a if isinstance(a, (list, tuple)) else (a,)):
            p = _param(gm, v)
            if p is not None:
                owner_name, _, attr = v.target.rpartition(".")
                owner = gm.get_submodule(owner_name) if owner_name else gm
                out.append((v.target, p, isinstance(owner, nn.Linear) and attr == "weight"))
    return out


def scan_graph(gm: fx.GraphModule, prefix: str, black_boxes: set[str]
               ) -> tuple[list[SiteMatch], list[Use], list[OpaqueMatch]]:
    """All sites, all other parameter uses, and the opaque calls with linear weights inside, of one traced graph
    (black-box submodules are skipped)."""
    sites: list[SiteMatch] = []
    uses: list[Use] = []
    opaque_calls: list[OpaqueMatch] = []
    matched_nodes: dict[fx.Node, SiteMatch] = {}
    opaque_nodes: dict[fx.Node, dict[int, str]] = {}  # node -> reasons of its non-tapped parameter arguments
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if node.target in black_boxes:
                continue
            m = gm.get_submodule(node.target)
            qual = f"{prefix}{node.target}"
            if is_layer_module(m):
                site, why = module_site(m)
                if site is not None and isinstance(node.args[0] if node.args else None, fx.Node):
                    sites.append(SiteMatch(node, node.args[0], m.weight, m.bias, site, qual))
                    continue
                uses += [Use(p, why or f"{type(m).__name__} '{qual}': call not matched") for p in m.parameters()]
                continue
            if isinstance(m, nn.MultiheadAttention):
                plan, why = opaque.mha_plan(m, qual, node)
                if plan is not None:
                    opaque_calls.append(OpaqueMatch(node, plan))
                    continue
                uses += [Use(p, why) for p in m.parameters()]
                continue
            reason = leaf_reason(m, qual)
            uses += [Use(p, reason) for p in m.parameters()]
        elif node.op == "call_function":
            match = _functional_site(gm, node)
            if match is not None:
                sites.append(match)
                matched_nodes[node] = match
            elif opaque.is_opaque_function(node.target):
                params = _param_args(gm, node)
                if params:
                    plan, reasons = opaque.function_plan(node.target.__name__, params)
                    opaque_nodes[node] = reasons
                    if plan.linear:
                        opaque_calls.append(OpaqueMatch(node, plan))
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        p = _param(gm, node)
        if p is None:
            continue
        for user in node.users:
            if user in opaque_nodes:
                reason = opaque_nodes[user].get(id(p))
                if reason:
                    uses.append(Use(p, reason))
                continue
            m = matched_nodes.get(user)
            as_weight = m is not None and m.weight is p and _arg(user, 1, "weight") is node
            as_bias = m is not None and m.bias is p and _arg(user, 2, "bias") is node and m.input_node is not node
            if not (as_weight or as_bias):
                uses.append(Use(p, f"used by {_op_name(user)} (only conv/linear calls are under KFC)"))
    return sites, uses, opaque_calls
