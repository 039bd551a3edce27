"""Call patterns that span several graph nodes: a transposed view of a parameter, a bias added right after a call.

Both front ends scan ``torch.fx`` graphs (the fx pass's traced graphs, dynamo's graphs), so a layer kind whose call
is more than one node reads the neighbouring nodes here, through the ``fx.Node`` fields only (``op``, ``target``,
``args``, ``kwargs``, ``users``), with the front end's own ``param_of`` saying which graph values are parameters.
What each front end writes for the same Python code differs (``W.T`` is ``getattr(W, "T")`` in an fx trace and
``aten.numpy_T`` in a dynamo graph), so the tables below hold both spellings.

A pattern also says which parameter uses it accounts for: ``(user node, parameter node)`` pairs, which the front
ends then do not report as other uses.
"""
from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch import nn

ParamOf = Callable[[Any], "nn.Parameter | None"]  # graph value -> the trainable parameter it is, or None
Claim = tuple[fx.Node, fx.Node]  # (user node, parameter node): a parameter use a matched pattern accounts for

_aten = torch.ops.aten
# W.T / W.mT: an fx trace records the attribute access, a dynamo graph the aten op
_TRANSPOSE_ATTRS = {"T", "mT"}
_TRANSPOSE_OPS = {_aten.numpy_T, _aten.numpy_T.default, _aten.mT, _aten.t, _aten.t.default}
# W.t(), W.transpose(0, 1), W.permute(1, 0), ... as methods (call_method) and as functions (call_function)
_TRANSPOSE_FUNCTIONS = {torch.t: "t", torch.transpose: "transpose", torch.swapaxes: "transpose",
                        torch.swapdims: "transpose", torch.permute: "permute"}
_TRANSPOSE_METHODS = {"t": "t", "transpose": "transpose", "swapaxes": "transpose", "swapdims": "transpose",
                      "permute": "permute"}
# y + b: operator.add (``+``), torch.add, Tensor.add
_ADD_FUNCTIONS = {operator.add, torch.add}
_ADD_METHODS = {"add"}


def _is_node(v) -> bool:
    return isinstance(v, fx.Node)


def _transpose_style(node: fx.Node) -> str | None:
    """How ``node`` transposes its first argument ("t", "transpose", "permute", "attr"), or None."""
    if node.op == "call_function":
        if node.target is getattr and len(node.args) == 2 and node.args[1] in _TRANSPOSE_ATTRS:
            return "attr"
        try:
            if node.target in _TRANSPOSE_OPS:
                return "attr"
            return _TRANSPOSE_FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method":
        return _TRANSPOSE_METHODS.get(node.target)
    return None


def _swaps_two_dims(style: str, args: tuple, kwargs: dict) -> bool:
    """Whether the (static) dims of a 2-d ``transpose``/``permute`` call swap the two dims."""
    if style == "attr":
        return True
    if style == "t":
        return len(args) == 1 and not kwargs
    rest = args[1:]
    if style == "transpose":
        dims = [*rest, *(kwargs[k] for k in ("dim0", "dim1") if k in kwargs)]
    else:
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else list(rest)
        dims += list(kwargs.get("dims", ()))
    if len(dims) != 2 or not all(isinstance(d, int) and not isinstance(d, bool) and -2 <= d < 2 for d in dims):
        return False
    d0, d1 = (d % 2 for d in dims)
    return d0 != d1 if style == "transpose" else (d0, d1) == (1, 0)


def transposed_param(v, param_of: ParamOf) -> tuple[nn.Parameter, fx.Node] | None:
    """``(W, W's node)`` when the graph value ``v`` is a transposed view of a 2-d parameter W that feeds one call.

    ``W.T``, ``W.mT``, ``W.t()``, ``torch.t(W)``, ``W.transpose(0, 1)`` (any spelling of the two dims),
    ``W.permute(1, 0)``, ``W.swapaxes(0, 1)``. The view must have no other user than the call that takes it: a
    transpose also used elsewhere is an other use of W, reported as such.
    """
    if not _is_node(v) or len(v.users) != 1 or not v.args:
        return None
    style = _transpose_style(v)
    if style is None:
        return None
    source = v.args[0]
    weight = param_of(source)
    if weight is None or weight.dim() != 2 or not _swaps_two_dims(style, v.args, v.kwargs):
        return None
    return weight, source


def bias_add_after(node: fx.Node, param_of: ParamOf, out_features: int
                   ) -> tuple[fx.Node, nn.Parameter, fx.Node] | None:
    """``(add node, b, b's node)`` when the only use of ``node``'s output is ``+ b`` with a parameter b of shape (out,).

    Either operand order; ``torch.add`` and ``Tensor.add`` without ``alpha``. The add is then the layer's output
    (the tap goes after it); an output used elsewhere too, or another addend, leaves the call without a bias.
    """
    if len(node.users) != 1:
        return None
    add = next(iter(node.users))
    if add.kwargs or len(add.args) != 2 or not (
            (add.op == "call_function" and add.target in _ADD_FUNCTIONS)
            or (add.op == "call_method" and add.target in _ADD_METHODS)):
        return None
    a, b = add.args
    other = b if a is node else a if b is node else None
    if other is None or other is node:
        return None
    bias = param_of(other)
    if bias is None or tuple(bias.shape) != (out_features,):
        return None
    return add, bias, other
