"""The layer kinds KFC covers: ONE table shared by the fx pass and the dynamo backend.

A kind knows the call targets that compute it (``F.linear`` is ``torch._C._nn.linear`` and ``F.conv2d`` is
``torch.conv2d``, so one set serves fx graphs and dynamo graphs alike), how to read the call's arguments by role
(input, weight, bias, static options) and how to build the site geometry (``geometry.py``) from them, and which stock
modules are calls of it. A front end only says how a graph value becomes a parameter (fx: ``get_attr``; dynamo:
a placeholder whose example input *is* the parameter); everything else about recognising a layer is here, so the
two front ends cannot disagree. Adding a layer kind is one ``SiteKind`` subclass plus one entry in ``KINDS``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from kfc_compile.sites.geometry import Site, conv_site, conv_transpose_site, linear_site

ParamOf = Callable[[Any], "nn.Parameter | None"]  # graph value -> the trainable parameter it is, or None


@dataclass
class Candidate:
    """One matched conv/linear call: the parameters, the site geometry, and the front end's handles.

    ``name`` is the owning module's qualified name for a module call (the layer's name), None for a functional
    call (the layer is then named after its weight). ``node``/``input_node`` are the front end's graph handles (None
    for calls inside black boxes and opaque calls, which are tapped at run time); ``weight_arg``/``bias_arg`` are the
    graph values passed as weight and bias (the uses of those parameters that this call accounts for).
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


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _static(v, is_graph_value: Callable[[Any], bool]) -> bool:
    """No graph value anywhere in ``v`` (a geometry argument must be a Python constant)."""
    if isinstance(v, (tuple, list)):
        return all(_static(i, is_graph_value) for i in v)
    return not is_graph_value(v)


class SiteKind:
    """A kind of layer call. Subclasses set ``name``, ``functions`` (call target → weight rank) and ``modules``."""

    name: str = ""
    functions: dict = {}
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
KINDS: tuple[SiteKind, ...] = (LinearKind(), ConvTransposeKind(), ConvKind())
_BY_FUNCTION = {target: kind for kind in KINDS for target in kind.functions}


def kind_of(target) -> SiteKind | None:
    """The kind computed by a ``call_function`` target, or None."""
    try:
        return _BY_FUNCTION.get(target)
    except TypeError:  # an unhashable target
        return None


def match_call(target, args: tuple, kwargs: dict, param_of: ParamOf,
               is_graph_value: Callable[[Any], bool]) -> Candidate | None:
    """The candidate for a ``call_function`` node, or None if it is not a layer call KFC can take."""
    kind = kind_of(target)
    return None if kind is None else kind.match(target, args, kwargs, param_of, is_graph_value)


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
