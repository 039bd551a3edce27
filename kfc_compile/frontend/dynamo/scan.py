"""Scanning one dynamo graph: layer candidates, tappable self-attention calls, and every other parameter use.

Layer candidates come through the shared site-kind table; self-attention calls are those whose projections can be
tapped (``runtime/attention.py``); every other use of a parameter is kept with a reason.

In a dynamo graph parameters are placeholders whose example inputs *are* the parameters (fake ones in the subgraphs
of DDPOptimizer's split, resolved through the placeholder's ``grapharg``), or ``get_attr`` nodes when modules were
not inlined; ``nn.Linear``/``nn.Conv*``/``nn.ConvTranspose*``/``F.*`` calls all appear as
``torch._C._nn.linear`` / ``torch.conv*d`` / ``torch.conv_transpose*d``, matmuls as ``operator.matmul`` /
``torch.matmul`` / ``torch.addmm`` / ``call_method matmul``: the targets of ``sites/kinds.py``, matched there
(``match_node``) with the nodes around them (transposed weight views, a bias add after the call).
"""
from __future__ import annotations

import re
import warnings

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor

from kfc_compile.runtime import attention as mha
from kfc_compile.sites.geometry import linear_site
from kfc_compile.sites.kinds import Candidate, match_node


def _is_node(v) -> bool:
    return isinstance(v, fx.Node)


def source_guess(node: fx.Node) -> str:
    """A qualified-name guess for a parameter placeholder (``L['self']._modules['c']._parameters['weight']``)."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    text = getattr(source, "name", None) or node.name
    if callable(text):
        text = text()
    tokens = [a or b for a, b in re.findall(r"\['([^']+)'\]|\.(\w+)", text)]
    parts = [t for t in tokens if t not in ("self", "_modules", "_parameters", "L", "G")]
    name = ".".join(parts) or node.name
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _real_parameter(node: fx.Node, value) -> nn.Parameter | None:
    """The model parameter behind placeholder ``node`` (example input ``value``), or None for any other input.

    Dynamo hands a backend the parameters themselves as example inputs, except for the subgraphs its DDPOptimizer
    splits a graph into at DDP's gradient-bucket boundaries (``torch.compile(DDP(model))``): their example inputs
    are fake tensors. A split copies each placeholder's metadata, whose ``grapharg`` holds the real input dynamo
    lifted (the parameter a fake one stands for).
    """
    if not isinstance(value, nn.Parameter):
        return None
    if not isinstance(value, FakeTensor):
        return value
    try:
        real = node.meta["grapharg"].example
    except (KeyError, AttributeError, AssertionError):  # no grapharg, or its weak reference died
        real = None
    if isinstance(real, nn.Parameter) and not isinstance(real, FakeTensor):
        return real
    warnings.warn(f"kfc backend: graph input {node.name!r} is a fake parameter whose model parameter is unknown: "
                  "its uses are not instrumented (the parameter is trained by the fallback)", stacklevel=2)
    return None


class GraphScan:
    """One dynamo graph: candidate sites, other parameter uses, then the rewrite."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        self.param_of: dict[fx.Node, nn.Parameter] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) == len(example_inputs):
            for node, value in zip(placeholders, example_inputs, strict=True):
                p = _real_parameter(node, value)
                if p is not None:
                    self.param_of[node] = p
        for node in gm.graph.nodes:  # graphs with get_attr parameters (nn modules not inlined)
            if node.op == "get_attr":
                try:
                    p = gm.get_parameter(node.target)
                except AttributeError:
                    continue
                self.param_of[node] = p
        self.candidates: list[Candidate] = []
        self.mha_calls: dict[fx.Node, tuple[dict, Candidate | None, Candidate | None]] = {}
        self.other_uses: dict[int, str] = {}  # id(param) -> reason
        self.mha_reasons: dict[fx.Node, str] = {}

    def _param(self, v) -> nn.Parameter | None:
        return self.param_of.get(v) if isinstance(v, fx.Node) else None

    def scan(self) -> None:
        """Collect the candidates, the attention calls and the other parameter uses of the graph."""
        claimed: set[tuple[fx.Node, fx.Node]] = set()  # (user node, parameter node) uses that are sites
        for node in self.gm.graph.nodes:
            if node.op not in ("call_function", "call_method"):
                continue
            cand = match_node(node, self._param, _is_node)
            if cand is not None:
                if not self._tapped_already(cand.node):
                    self.candidates.append(cand)
                claimed |= cand.claims
            elif node.op == "call_function" and node.target is mha.MHA_TARGET:
                self._mha_site(node, claimed)
        for pnode, p in self.param_of.items():
            for user in pnode.users:
                if (user, pnode) in claimed:
                    continue
                what = user.target if user.op != "call_function" else getattr(user.target, "__name__", user.target)
                reason = self.mha_reasons.get(user) or f"used by {what} (only conv/linear calls are under KFC)"
                self.other_uses.setdefault(id(p), reason)

    def _tapped_already(self, node: fx.Node) -> bool:
        """The call's output feeds a capture tap traced from a ``kc.transform``ed model.

        That tap is an autograd function whose backward calls kfc::record: that model's own registry records it.
        """
        for user in node.users:
            if "autograd_function_apply" not in str(user.target):
                continue
            for arg in user.args:
                if isinstance(arg, fx.Node) and arg.op == "get_attr":
                    sub = getattr(self.gm, arg.target, None)
                    if isinstance(sub, fx.GraphModule) and any(
                            n.target in (torch.ops.kfc.record, torch.ops.kfc.record.default) for n in sub.graph.nodes):
                        return True
        return False

    def _mha_site(self, node: fx.Node, claimed: set) -> None:
        try:
            a = mha.bind(node.args, node.kwargs)
        except TypeError:
            return
        q = a["query"]
        example = q.meta.get("example_value") if isinstance(q, fx.Node) else None
        reason = mha.unsupported_reason(a, example.dim() if example is not None else None)
        w_in, w_out = self._param(a["in_proj_weight"]), self._param(a["out_proj_weight"])
        if not reason and (w_in is None or w_out is None
                           or any(_is_node(v) for v in (a["num_heads"], a["embed_dim_to_check"]))):
            reason = "attention projections that are not parameters"
        if reason:
            self.mha_reasons[node] = f"{reason}: not decomposed by the kfc backend"
            return
        b_in, b_out = self._param(a["in_proj_bias"]), self._param(a["out_proj_bias"])
        c_in = Candidate(w_in, b_in, linear_site(w_in, a["in_proj_bias"] is not None), node=node, role="mha_in")
        c_out = Candidate(w_out, b_out, linear_site(w_out, a["out_proj_bias"] is not None), node=node, role="mha_out")
        self.candidates += [c_in, c_out]
        self.mha_calls[node] = (a, c_in, c_out)
        for key in ("in_proj_weight", "out_proj_weight"):
            claimed.add((node, a[key]))
        for key, c in (("in_proj_bias", c_in), ("out_proj_bias", c_out)):
            if c.bias is not None:
                claimed.add((node, a[key]))
