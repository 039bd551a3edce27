"""Building the instrumented module: a capture tap after every matched site.

Traceable parts become an ``fx.GraphModule`` whose graph gets one ``Tap`` node per site. An untraceable
submodule stays an opaque call; it is shallow-copied and its own children are instrumented recursively (a conv or
linear child becomes a copy whose class adds the tap to the stock forward). Parameters are shared with the
original model, which is never modified.
"""
from __future__ import annotations

import copy
import types
from collections import defaultdict

import torch.fx as fx
from torch import nn

from kfc_compile.frontend.fx import plans
from kfc_compile.frontend.fx.scan import OpaqueMatch, Use, scan_graph
from kfc_compile.frontend.fx.trace import is_layer_module, qualified, trace_with_fallback
from kfc_compile.registry import BlackBox, KFCInfo, KFCLayer
from kfc_compile.runtime import opaque
from kfc_compile.runtime.state import CaptureState, SiteEntry
from kfc_compile.runtime.taps import OutputTap, Tap, forward_signature, output_tap, replay_inputs, tap
from kfc_compile.sites import coverage
from kfc_compile.sites.kinds import Candidate, module_site

_TAPPED_CLASSES: dict[type, type] = {}


def _tapped_class(cls: type) -> type:
    """A subclass of a conv/linear module class whose forward ends with the capture tap."""
    if cls not in _TAPPED_CLASSES:
        def forward(self, input):
            return tap(cls.forward(self, input), input, self._kfc_state, self._kfc_site)
        _TAPPED_CLASSES[cls] = type(f"KFC{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _TAPPED_CLASSES[cls]


def _shallow_copy(m: nn.Module) -> nn.Module:
    new = copy.copy(m)
    new._modules = dict(m._modules)
    new._parameters = dict(m._parameters)
    new._buffers = dict(m._buffers)
    return new


class Instrumenter:
    """One pass over a model: collects sites and parameter uses, inserts taps, then decides the layers."""

    def __init__(self, model: nn.Module, approx: str):
        self.model = model
        self.state = CaptureState([], [], approx)
        self.matches: list[Candidate] = []
        self.site_taps: list[tuple[object, object]] = []  # (graph module or swapped module, tap node or None)
        self.uses: list[Use] = []
        self.black_boxes: list[BlackBox] = []
        self.plans: list[opaque.OpaquePlan] = []
        self.names: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(id(p), name)

    # -- instrumentation ---------------------------------------------------------------------------------------
    def instrument(self, module: nn.Module, prefix: str, traced: fx.GraphModule | None = None) -> nn.Module:
        """Trace ``module`` (``prefix`` in the model), tap its sites, wrap its opaque calls, recurse into black boxes.

        Returns the module to use in its place: the instrumented graph module, or a wrapper that taps the sites at run
        time when the module's own forward cannot be traced. ``traced``: the module's graph, already traced whole.
        """
        gm, boxes = (traced, []) if traced is not None else trace_with_fallback(module)
        if gm is None:
            if not any(b.name == (prefix or "<root>") for b in self.black_boxes):  # the parent's trace may have it
                self.black_boxes.append(BlackBox(prefix or "<root>", boxes[0].reason))
            return self._instrument_opaque(module, prefix)
        opaque = {b.name for b in boxes}
        self.black_boxes += [BlackBox(qualified(prefix, b.name), b.reason) for b in boxes]
        sites, uses, opaque_calls = scan_graph(gm, f"{prefix}." if prefix else "", opaque)
        self.uses += uses
        for match in sites:
            self._add_graph_tap(gm, match)
        for call in opaque_calls:
            self._wrap_opaque(gm, call)
        for name in opaque:
            parent_name, _, child = name.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            setattr(parent, child, self.instrument(module.get_submodule(name), qualified(prefix, name)))
        gm.recompile()
        for name, sub in gm.named_modules():  # fx makes fresh containers; keep the original train/eval flags
            try:
                sub.training = module.get_submodule(name).training
            except AttributeError:
                sub.training = gm.training  # a tap added here: follow its graph module
        return gm

    def _add_graph_tap(self, gm: fx.GraphModule, match: Candidate) -> None:
        index = len(self.matches)
        self.matches.append(match)
        tap_name = f"_kfc_tap_{index}"
        gm.add_submodule(tap_name, Tap(self.state, index))
        with gm.graph.inserting_after(match.node):
            tap_node = gm.graph.call_module(tap_name, (match.node, match.input_node))
        match.node.replace_all_uses_with(tap_node, delete_user_cb=lambda user: user is not tap_node)
        self.site_taps.append((gm, tap_node))

    def _wrap_opaque(self, gm: fx.GraphModule, call: OpaqueMatch) -> None:
        """Register the sites inside an opaque call and replace the call by a wrapper that taps them."""
        plan, node = call.plan, call.node
        if node.op == "call_module":  # nn.MultiheadAttention leaf: a copy whose class runs under the mode
            parent_name, _, child = node.target.rpartition(".")
            parent = gm.get_submodule(parent_name) if parent_name else gm
            current = getattr(parent, child)
            if getattr(current, "_kfc_plan", None) is not None:
                return  # a shared module called again: its wrapper taps every call (extra uses = extra positions)
            owner = _shallow_copy(current)
            owner.__class__ = opaque.capturing_class(type(current))
            owner._kfc_plan = plan
            setattr(parent, child, owner)
        else:
            name = f"_kfc_opaque_{len(self.plans)}"
            gm.add_submodule(name, opaque.OpaqueCall(node.target, plan))
            with gm.graph.inserting_after(node):
                new_node = gm.graph.call_module(name, node.args, node.kwargs)
            node.replace_all_uses_with(new_node)
            gm.graph.erase_node(node)
            owner = gm
        for site in plan.sites:
            site.index = len(self.matches)
            self.matches.append(plans.candidate(site))
        self.plans.append(plan)
        self.site_taps += [(owner, None)] * len(plan.sites)

    def _instrument_opaque(self, module: nn.Module, prefix: str) -> nn.Module:
        if is_layer_module(module):
            return self._swap_layer(module, prefix)
        new = _shallow_copy(module)
        if isinstance(module, nn.MultiheadAttention):
            self.uses += [Use(p, coverage.leaf_reason(module, prefix)) for p in module.parameters()]
            return new
        for p in module._parameters.values():
            if p is not None:
                self.uses.append(Use(p, f"used inside the untraceable forward of '{prefix or '<root>'}'"))
        for name, child in module._modules.items():
            if child is not None:
                new._modules[name] = self.instrument(child, qualified(prefix, name))
        return new

    def _swap_layer(self, module: nn.Module, prefix: str) -> nn.Module:
        site, why = module_site(module, None)  # called by an untraceable forward: arguments unknown
        if site is None:
            self.uses += [Use(p, why) for p in module.parameters()]
            return module
        new = _shallow_copy(module)
        new.__class__ = _tapped_class(type(module))
        index = len(self.matches)
        new._kfc_state, new._kfc_site = self.state, index
        self.matches.append(Candidate(module.weight, module.bias, site, prefix))
        self.site_taps.append((new, None))
        return new

    # -- decision ------------------------------------------------------------------------------------------------
    def finish(self, root: nn.Module, other_mode: fx.GraphModule | None = None) -> tuple[nn.Module, KFCInfo]:
        """Decide which weights are under KFC, remove taps of the others, add the output tap, build ``tm.kfc``.

        ``other_mode``: the instrumented graph of the other training mode (the model branches on
        ``self.training``); its sites were instrumented by this instrumenter too, so one decision covers both graphs,
        and the result switches between them (:func:`mode_switch`).
        """
        other_uses: dict[int, list[str]] = defaultdict(list)
        for use in self.uses:
            other_uses[id(use.param)].append(use.reason)

        def other_use(p: nn.Parameter) -> str | None:
            return next(iter(other_uses.get(id(p), [])), None)

        index = {id(m): i for i, m in enumerate(self.matches)}
        layers: list[KFCLayer] = []
        site_layer: list[int | None] = [None] * len(self.matches)
        rejected: dict[int, str] = {}
        for cands in coverage.group_by_weight(self.matches):
            if not cands[0].weight.requires_grad:
                continue
            reason = coverage.reject_reason(cands, other_use)
            if reason:
                for p in (cands[0].weight, *(c.bias for c in cands if c.bias is not None)):
                    rejected[id(p)] = reason
                continue
            for c in cands:
                site_layer[index[id(c)]] = len(layers)
            layers.append(coverage.new_layer(coverage.layer_name(cands[0], self.names), cands))

        for i, (owner, tap_node) in enumerate(self.site_taps):
            if site_layer[i] is None and tap_node is not None:
                tap_node.replace_all_uses_with(tap_node.args[0])
                owner.graph.erase_node(tap_node)
                owner.delete_submodule(tap_node.target)
        root = self._add_output_tap(root)
        if other_mode is not None:
            root = mode_switch(root, self._add_output_tap(other_mode))
        for owner in {id(o): o for o, _ in self.site_taps}.values():  # once per graph, not once per site
            if isinstance(owner, fx.GraphModule):
                owner.recompile()
        self.state.layers = layers
        self.state.sites = [SiteEntry(site_layer[i], m.site) for i, m in enumerate(self.matches)]
        for plan in self.plans:
            plan.bind(self.state)
        uncovered, frozen, total = coverage.account(
            self.model.named_parameters(), layers,
            lambda p: rejected.get(id(p)) or other_use(p) or "not used by any traced call")
        return root, KFCInfo(self.state.approx, layers, uncovered, self.black_boxes, frozen, self.state, total)

    def _add_output_tap(self, root: nn.Module) -> nn.Module:
        if isinstance(root, fx.GraphModule):
            out_node = next(n for n in reversed(root.graph.nodes) if n.op == "output")
            root.add_submodule("_kfc_output_tap", OutputTap(self.state).train(root.training))
            with root.graph.inserting_before(out_node):
                inputs = tuple(n for n in root.graph.nodes if n.op == "placeholder")
                tapped = root.graph.call_module("_kfc_output_tap", (out_node.args[0], *inputs))
            out_node.args = (tapped,)
            root.recompile()
            return root
        cls = type(root)
        state = self.state
        signature = forward_signature(cls.forward.__get__(root))

        def forward(self, *args, **kwargs):
            return output_tap(cls.forward(self, *args, **kwargs), state, replay_inputs(signature, args, kwargs))

        root.__class__ = type(f"KFC{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
        return root


def mode_switch(gm: fx.GraphModule, other: fx.GraphModule) -> fx.GraphModule:
    """Make ``gm`` run ``other`` (traced in the other training mode) while its ``training`` flag says so.

    ``gm`` was traced in one mode; whenever its flag differs from that mode, ``other`` runs; ``train()``/``eval()``
    switch both.
    ``other`` is kept outside the module tree (``__dict__``): both graphs share every parameter and leaf module, so
    ``named_parameters()`` and ``state_dict()`` stay those of one graph. The switch is an instance-level ``forward``
    and ``train`` (the class and its generated code are untouched).
    """
    traced_training = gm.training
    graph_forward = type(gm).forward
    gm.__dict__["_kfc_other_mode"] = other

    def forward(*args, **kwargs):
        if gm.training != traced_training:
            return other(*args, **kwargs)
        return graph_forward(gm, *args, **kwargs)

    gm.forward = forward
    gm.train = types.MethodType(_switch_train, gm)
    other.train(traced_training)
    return gm


def _switch_train(self: fx.GraphModule, mode: bool = True) -> fx.GraphModule:
    type(self).train(self, mode)
    self.__dict__["_kfc_other_mode"].train(mode)
    return self
