"""Plans for opaque calls with linear layers inside (``runtime/opaque.py`` runs them).

A plan says which weights of an ``nn.MultiheadAttention`` leaf or of an fx-wrapped function (``torch.fx.wrap``) are
tapped, and why the others are not.
"""
from __future__ import annotations

import inspect

import torch.fx as fx
from torch import nn

from kfc_compile.frontend.fx.trace import qualified
from kfc_compile.runtime.opaque import OpaquePlan, OpaqueSite
from kfc_compile.sites.geometry import linear_site
from kfc_compile.sites.kinds import Candidate


def is_opaque_function(target) -> bool:
    """A ``call_function`` target that is user or library Python code kept whole by the tracer (``torch.fx.wrap``).

    As opposed to a torch op whose semantics are known.
    """
    if not inspect.isfunction(target):
        return False
    module = getattr(target, "__module__", "") or ""
    return not (module == "torch" or module.startswith("torch.") or module in ("operator", "builtins", "math"))


def mha_plan(m: nn.MultiheadAttention, qual: str, node: fx.Node) -> tuple[OpaquePlan | None, str]:
    """The plan for a ``nn.MultiheadAttention`` leaf call, or None and why its projections stay uncovered."""
    cls = type(m).__name__
    names = ("query", "key", "value")
    qkv = [node.args[i] if len(node.args) > i else node.kwargs.get(n) for i, n in enumerate(names)]
    if not (qkv[0] is qkv[1] is qkv[2]):
        return None, (f"{cls} '{qual}': cross-attention (distinct query/key/value) applies the packed projection "
                      "in slices; not under KFC")
    causal = node.args[7] if len(node.args) > 7 else node.kwargs.get("is_causal", False)
    if causal is not False:
        return None, f"{cls} '{qual}': is_causal attention is not decomposed; not under KFC"
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        return None, f"{cls} '{qual}': separate q/k/v projection weights are not under KFC"
    if m.bias_k is not None or m.add_zero_attn:
        return None, f"{cls} '{qual}': attention with bias_k/bias_v or add_zero_attn is not under KFC"
    plan = OpaquePlan(qual, mha=(OpaqueSite(m.in_proj_weight, m.in_proj_bias, None),
                                 OpaqueSite(m.out_proj.weight, m.out_proj.bias, qualified(qual, "out_proj"))))
    return plan, ""


def function_plan(name: str, params: list[tuple[str, nn.Parameter, bool]]) -> tuple[OpaquePlan, dict[int, str]]:
    """The plan for an opaque function receiving ``params``, and the reasons for the parameters it does not tap.

    ``params`` are (qualified name, parameter, whether it is the weight of an ``nn.Linear`` module). A trainable 2-D
    parameter that is a Linear module's weight, or whose name ends in ``weight``, is tapped as the weight of
    ``F.linear`` calls (weight block only); the reasons for the others.
    """
    plan = OpaquePlan(name)
    reasons: dict[int, str] = {}
    seen: set[int] = set()
    for qual, p, linear_weight in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() == 2 and p.requires_grad and (linear_weight or qual.rpartition(".")[2].endswith("weight")):
            plan.linear.append(OpaqueSite(p, None, None))
        elif p.dim() == 1:
            reasons[id(p)] = (f"passed into {name} (inside an opaque call only the weights of F.linear calls are "
                              "under KFC; the bias it applies may be computed)")
        else:
            reasons[id(p)] = f"passed into {name} (not a linear weight; inside it only F.linear weights are tapped)"
    return plan, reasons


def candidate(site: OpaqueSite) -> Candidate:
    """The candidate of an opaque site (no graph node: the tap is added at run time)."""
    return Candidate(site.weight, site.bias, linear_site(site.weight, site.bias is not None), site.module_name)
