"""Finding conv/linear sites in an fx graph, and recording every other use of a parameter with a reason.

A *site* is one call: a ``call_module`` of a stock conv/linear module, or a ``call_function``/``call_method`` of a
layer kind's target (``sites/kinds.py``: ``F.linear``, ``F.conv{1,2,3}d``, matmuls) whose weight is a ``get_attr`` of a
parameter (or, for a matmul, a transposed view of one). Anything else that touches a parameter is a *use* that keeps
that parameter out of KFC, with a reason for the report.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.fx as fx
from torch import nn

from kfc_compile.frontend.fx import plans
from kfc_compile.frontend.fx.trace import is_layer_module
from kfc_compile.runtime.opaque import OpaquePlan
from kfc_compile.sites.coverage import leaf_reason
from kfc_compile.sites.kinds import Candidate, match_node, module_site


@dataclass
class Use:
    """A use of a parameter that is not a matched site."""

    param: nn.Parameter
    reason: str


def _param(gm: fx.GraphModule, node) -> nn.Parameter | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            obj = gm.get_parameter(node.target)
        except AttributeError:
            return None
        return obj if isinstance(obj, nn.Parameter) else None
    return None


# reading a parameter's metadata (``w.dtype``, ``w.device``, ``w.shape``, ``w.size()``) is not a use of its values
_METADATA_ATTRS = frozenset({"dtype", "device", "shape", "ndim", "layout", "requires_grad", "is_cuda"})
_METADATA_METHODS = frozenset({"size", "dim"})


def _reads_metadata(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` only reads the metadata of the parameter ``node`` (no use of its values)."""
    if user.op == "call_function" and user.target is getattr and len(user.args) == 2 and user.args[0] is node:
        return user.args[1] in _METADATA_ATTRS
    return user.op == "call_method" and user.target in _METADATA_METHODS and user.args[:1] == (node,)


def _is_node(v) -> bool:
    return isinstance(v, fx.Node)


def _op_name(node: fx.Node) -> str:
    t = node.target
    return getattr(t, "__name__", str(t)) if node.op == "call_function" else f"{node.op} {t}"


@dataclass
class OpaqueMatch:
    """An opaque call with linear weights inside (see ``plans.py``): the node and what to tap in it."""

    node: fx.Node
    plan: OpaquePlan


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
               ) -> tuple[list[Candidate], list[Use], list[OpaqueMatch]]:
    """All sites, all other parameter uses, and the opaque calls with linear weights inside, of one traced graph.

    Black-box submodules are skipped.
    """
    sites: list[Candidate] = []
    uses: list[Use] = []
    opaque_calls: list[OpaqueMatch] = []
    claimed: set[tuple[fx.Node, fx.Node]] = set()  # (user node, get_attr node) parameter uses that are sites
    opaque_nodes: dict[fx.Node, dict[int, str]] = {}  # node -> reasons of its non-tapped parameter arguments
    for node in gm.graph.nodes:
        if node.op == "call_module":
            if node.target in black_boxes:
                continue
            m = gm.get_submodule(node.target)
            qual = f"{prefix}{node.target}"
            if is_layer_module(m):
                site, why = module_site(m, (*node.args[1:], *(v for k, v in node.kwargs.items() if k != "input")))
                if site is not None and isinstance(node.args[0] if node.args else None, fx.Node):
                    sites.append(Candidate(m.weight, m.bias, site, qual, node=node, input_node=node.args[0]))
                    continue
                uses += [Use(p, why or f"{type(m).__name__} '{qual}': call not matched") for p in m.parameters()]
                continue
            if isinstance(m, nn.MultiheadAttention):
                plan, why = plans.mha_plan(m, qual, node)
                if plan is not None:
                    opaque_calls.append(OpaqueMatch(node, plan))
                    continue
                uses += [Use(p, why) for p in m.parameters()]
                continue
            reason = leaf_reason(m, qual)
            uses += [Use(p, reason) for p in m.parameters()]
        elif node.op in ("call_function", "call_method"):
            match = match_node(node, lambda v: _param(gm, v), _is_node)
            if match is not None:
                sites.append(match)
                claimed |= match.claims
            elif node.op == "call_function" and plans.is_opaque_function(node.target):
                params = _param_args(gm, node)
                if params:
                    plan, reasons = plans.function_plan(node.target.__name__, params)
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
            if (user, node) not in claimed and not _reads_metadata(user, node):
                uses.append(Use(p, f"used by {_op_name(user)} (only conv/linear calls are under KFC)"))
    return sites, uses, opaque_calls
