"""The layer kinds KFC covers: ONE table shared by the fx pass and the dynamo backend.

A kind knows the call targets that compute it (``F.linear`` is ``torch._C._nn.linear`` and ``F.conv2d`` is
``torch.conv2d``, so one set serves fx graphs and dynamo graphs alike), how to read the call's arguments by role
(input, weight, bias, static options) and how to build the site geometry (``geometry.py``) from them, and which stock
modules are calls of it. A front end only says how a graph value becomes a parameter (fx: ``get_attr``; dynamo:
a placeholder whose example input *is* the parameter); everything else about recognising a layer is here, so the
two front ends cannot disagree. Adding a layer kind is one ``SiteKind`` subclass plus one entry in ``KINDS``.
"""
from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from kfc_compile.sites import patterns
from kfc_compile.sites.geometry import Site, conv_site, conv_transpose_site, linear_site, matmul_site

ParamOf = Callable[[Any], "nn.Parameter | None"]  # graph value -> the trainable parameter it is, or None


@dataclass
class Candidate:
    """One matched conv/linear call: the parameters, the site geometry, and the front end's handles.

    ``name`` is the owning module's qualified name for a module call (the layer's name), None for a functional
    call (the layer is then named after its weight). ``node``/``input_node`` are the front end's graph handles (None
    for calls inside black boxes and opaque calls, which are tapped at run time); ``weight_arg``/``bias_arg`` are the
    graph values passed as weight and bias; ``claims`` are the ``(user node, parameter node)`` uses of parameters
    that the call accounts for (set by :func:`match_node`: the call's own weight and bias arguments, and those of a
    pattern spanning several nodes, such as a transposed view of the weight or a bias added after the call).
    """

    weight: nn.Parameter
    bias: nn.Parameter | None
    site: Site
    name: str | None = None
    node: Any = None
    input_node: Any = None
    weight_arg: Any = None
    bias_arg: Any = None
    role: str = "call"  # "call"; the dynamo backend's attention projections: "mha_in", "mha_out"
    claims: set = field(default_factory=set)


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _static(v, is_graph_value: Callable[[Any], bool]) -> bool:
    """No graph value anywhere in ``v`` (a geometry argument must be a Python constant)."""
    if isinstance(v, (tuple, list)):
        return all(_static(i, is_graph_value) for i in v)
    return not is_graph_value(v)


class SiteKind:
    """A kind of layer call. Subclasses set ``name``, ``functions`` (call target → weight rank) and ``modules``.

    ``methods`` (``call_method`` name → the function it calls) lists the tensor methods that are calls of the kind.
    """

    name: str = ""
    functions: dict = {}
    methods: dict = {}
    modules: tuple[type, ...] = ()

    def match(self, target, args: tuple, kwargs: dict, param_of: ParamOf,
              is_graph_value: Callable[[Any], bool]) -> Candidate | None:
        """The candidate for a call of ``target``, or None when it is not a layer call KFC can take.

        Not a layer call KFC can take: weight not a parameter, input not a graph value, geometry not static, a weight
        of the wrong rank.
        """
        raise NotImplementedError

    def module_site(self, m: nn.Module) -> Site:
        """The site of a call of the stock module ``m`` of this kind."""
        raise NotImplementedError

    def call_reason(self, m: nn.Module, args: tuple | None) -> str:
        """Why a call of ``m`` with ``args`` after the input is not the module's static geometry; "" when it is.

        ``args`` None: not known before run time (a call inside an untraceable forward). Stock linear and conv
        forwards take the input only.
        """
        return ""

    def match_node(self, node, param_of: ParamOf, is_graph_value: Callable[[Any], bool]) -> Candidate | None:
        """The candidate for the graph node ``node`` (a call of this kind), with its tap node and claimed uses.

        The default: :meth:`match` on the node's arguments, tapped after the node, claiming the weight and bias
        arguments (a bias that is also the input is not claimed: that use is not a bias).
        """
        cand = self.match(node.target, node.args, node.kwargs, param_of, is_graph_value)
        if cand is None:
            return None
        cand.node = node
        cand.claims.add((node, cand.weight_arg))
        if cand.bias is not None and cand.bias_arg is not cand.input_node:
            cand.claims.add((node, cand.bias_arg))
        return cand


class LinearKind(SiteKind):
    """``F.linear(x, W, b)`` on inputs of any rank (``nn.Linear``)."""

    name = "linear"
    functions = {F.linear: 2}
    modules = (nn.Linear,)

    def match(self, target, args, kwargs, param_of, is_graph_value):
        """The candidate for an ``F.linear`` call with a 2-d parameter weight and a graph-value input, else None."""
        x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        weight = param_of(w)
        if weight is None or weight.dim() != 2 or not is_graph_value(x):
            return None
        return Candidate(weight, param_of(b), linear_site(weight, b is not None), input_node=x, weight_arg=w,
                         bias_arg=b)

    def module_site(self, m):
        """The site of an ``nn.Linear`` call."""
        return linear_site(m.weight, m.bias is not None)


_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}


class ConvKind(SiteKind):
    """``F.conv{1,2,3}d`` with any stride, padding, dilation and groups (``nn.Conv{1,2,3}d``, any padding mode)."""

    name = "conv"
    functions = {F.conv1d: 3, F.conv2d: 4, F.conv3d: 5}
    modules = (_ConvNd,)

    def match(self, target, args, kwargs, param_of, is_graph_value):
        """The candidate for a conv call with a parameter weight of the call's rank and static geometry, else None."""
        vals = {name: _arg(args, kwargs, i, name, _CONV_DEFAULTS.get(name)) for i, name in enumerate(_CONV_ARGS)}
        weight = param_of(vals["weight"])
        if weight is None or weight.dim() != self.functions[target] or not is_graph_value(vals["input"]):
            return None
        geometry = [vals[k] for k in ("stride", "padding", "dilation", "groups")]
        if not _static(geometry, is_graph_value):
            return None
        try:
            site = conv_site(weight, vals["bias"] is not None, *geometry)
        except ValueError:  # a call torch itself rejects (e.g. padding='same' with a stride)
            return None
        return Candidate(weight, param_of(vals["bias"]), site, input_node=vals["input"], weight_arg=vals["weight"],
                         bias_arg=vals["bias"])

    def module_site(self, m):
        """The site of an ``nn.Conv{1,2,3}d`` call, with the module's padding mode."""
        return conv_site(m.weight, m.bias is not None, m.stride, m.padding, m.dilation, m.groups, m.padding_mode)


class MatmulKind(SiteKind):
    """A 2-d parameter as the weight of a matmul: a linear layer on inputs of any rank (all leading dims positions).

    ``x @ W.T`` (any transposed view of W feeding only this call) is ``F.linear(x, W)``: a :class:`LinearSite`.
    ``x @ W``, ``torch.mm(x, W)`` and ``torch.addmm(b, x, W)`` (HF's ``Conv1D``) hold W as (in, out): a
    :class:`~kfc_compile.sites.geometry.MatmulSite`. A bias is ``addmm``'s, or a parameter of shape (out,) added
    right after the call (``x @ W + b``), which then is the layer output.
    """

    name = "matmul"
    functions = {torch.matmul: 2, operator.matmul: 2, torch.mm: 2, torch.addmm: 2, torch.Tensor.matmul: 2,
                 torch.Tensor.__matmul__: 2, torch.Tensor.mm: 2, torch.Tensor.addmm: 2}
    methods = {"matmul": torch.matmul, "__matmul__": torch.matmul, "mm": torch.mm, "addmm": torch.addmm}
    _ADDMM = (torch.addmm, torch.Tensor.addmm)

    def match(self, target, args, kwargs, param_of, is_graph_value):
        """The candidate for ``x @ W`` / ``x @ Wᵀ`` / ``addmm(b, x, W)`` with a 2-d parameter W, else None.

        None also for an input that is not a graph value or is a parameter itself (no batch rows), and for
        ``addmm`` with ``alpha``/``beta`` (not the plain linear map). ``addmm``'s bias counts only when it is a
        parameter of shape (out,); another parameter there stays an other use.
        """
        target = self.methods.get(target, target) if isinstance(target, str) else target
        if target in self._ADDMM:
            scales = [kwargs.get(k, 1) for k in ("beta", "alpha")]
            if set(kwargs) - {"input", "mat1", "mat2", "beta", "alpha"} or any(
                    is_graph_value(v) or v != 1 for v in scales):
                return None
            b, x, w = (_arg(args, kwargs, i, name) for i, name in enumerate(("input", "mat1", "mat2")))
        else:
            if set(kwargs) - {"input", "other", "mat2"}:  # e.g. out=
                return None
            b, x, w = None, _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other", kwargs.get("mat2"))
        if not is_graph_value(x) or param_of(x) is not None:
            return None
        weight, claims = param_of(w), set()
        if weight is not None and weight.dim() == 2:
            make = matmul_site
        else:
            found = patterns.transposed_param(w, param_of)
            if found is None:
                return None
            (weight, source), make = found, linear_site
            claims.add((w, source))
        site, bias = make(weight, b is not None), param_of(b)
        if bias is not None and tuple(bias.shape) != (site.out_features,):
            # not a bias of this layer (that parameter's use stays unclaimed): the call is bias-free for W
            site, bias, b = dataclasses.replace(site, has_bias=False), None, None
        return Candidate(weight, bias, site, input_node=x, weight_arg=w, bias_arg=b, claims=claims)

    def match_node(self, node, param_of, is_graph_value):
        """The candidate of :meth:`match`, extended to a bias added right after a bias-free call."""
        cand = super().match_node(node, param_of, is_graph_value)
        if cand is None or cand.bias_arg is not None:
            return cand
        found = patterns.bias_add_after(node, param_of, cand.site.out_features)
        if found is not None:
            cand.node, cand.bias, cand.bias_arg = found
            cand.site = dataclasses.replace(cand.site, has_bias=True)
            cand.claims.add((cand.node, cand.bias_arg))
        return cand


_CONVT_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONVT_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "output_padding": 0, "groups": 1, "dilation": 1}


class ConvTransposeKind(SiteKind):
    """``F.conv_transpose{1,2,3}d`` (``nn.ConvTranspose{1,2,3}d``): the factors of the equivalent direct conv.

    A module call with ``output_size=`` is not taken: the module picks its output_padding from the input size at
    run time, while a site's geometry is fixed when the graph is scanned (the dynamo backend sees the resulting
    ``conv_transpose*d`` call with that output_padding as a constant, and takes it).
    """

    name = "conv_transpose"
    functions = {F.conv_transpose1d: 3, F.conv_transpose2d: 4, F.conv_transpose3d: 5}
    modules = (_ConvTransposeNd,)

    def match(self, target, args, kwargs, param_of, is_graph_value):
        """The candidate for a transposed-conv call with a parameter weight and static geometry, else None."""
        vals = {name: _arg(args, kwargs, i, name, _CONVT_DEFAULTS.get(name)) for i, name in enumerate(_CONVT_ARGS)}
        weight = param_of(vals["weight"])
        if weight is None or weight.dim() != self.functions[target] or not is_graph_value(vals["input"]):
            return None
        geometry = [vals[k] for k in ("stride", "padding", "output_padding", "groups", "dilation")]
        if not _static(geometry, is_graph_value):
            return None
        try:
            site = conv_transpose_site(weight, vals["bias"] is not None, *geometry)
        except ValueError:  # a call torch itself rejects
            return None
        return Candidate(weight, param_of(vals["bias"]), site, input_node=vals["input"], weight_arg=vals["weight"],
                         bias_arg=vals["bias"])

    def module_site(self, m):
        """The site of an ``nn.ConvTranspose{1,2,3}d`` call without ``output_size``."""
        return conv_transpose_site(m.weight, m.bias is not None, m.stride, m.padding, m.output_padding, m.groups,
                                   m.dilation)

    def call_reason(self, m, args):
        """Why a call with ``output_size`` (or with arguments not known before run time) is not taken."""
        cls = type(m).__name__
        if args is None:
            return (f"{cls}: called inside an untraceable forward, where output_size= would choose its "
                    "output_padding at run time")
        if any(a is not None for a in args):
            return (f"{cls}: called with output_size=, which chooses its output_padding from the input size at "
                    "run time (set output_padding on the module instead)")
        return ""


# ConvTransposeKind before ConvKind: _ConvTransposeNd is a _ConvNd subclass (module_site takes the first kind)
KINDS: tuple[SiteKind, ...] = (LinearKind(), ConvTransposeKind(), ConvKind(), MatmulKind())
_BY_FUNCTION = {target: kind for kind in KINDS for target in kind.functions}
_BY_METHOD = {name: kind for kind in KINDS for name in kind.methods}


def kind_of(target) -> SiteKind | None:
    """The kind computed by a ``call_function`` target, or None."""
    try:
        return _BY_FUNCTION.get(target)
    except TypeError:  # an unhashable target
        return None


def match_node(node, param_of: ParamOf, is_graph_value: Callable[[Any], bool]) -> Candidate | None:
    """The candidate for a graph node (``call_function`` or ``call_method``), or None if it is not a layer call.

    What both front ends call on every node; the candidate's ``node`` is where the tap goes and its ``claims`` the
    parameter uses it accounts for.
    """
    if node.op == "call_function":
        kind = kind_of(node.target)
    elif node.op == "call_method":
        kind = _BY_METHOD.get(node.target)
    else:
        kind = None
    return None if kind is None else kind.match_node(node, param_of, is_graph_value)


def module_site(m: nn.Module, args: tuple | None = ()) -> tuple[Site | None, str]:
    """The site of a call of a stock conv/linear module, or None and the reason it is not covered.

    ``args``: the call's arguments after the input (positional, then keyword values); None when they are not known
    before run time (the module is called inside an untraceable forward).
    """
    for kind in KINDS:
        if isinstance(m, kind.modules):
            why = kind.call_reason(m, args)
            return (None, why) if why else (kind.module_site(m), "")
    return None, f"{type(m).__name__}: not a conv/linear layer"
