"""The ``kfc`` torch.compile backend: capture taps in every dynamo graph, then inductor.

``torch.compile(model, backend="kfc")`` (registered through the ``torch_dynamo_backends`` entry point, so no
import is needed) hands each dynamo graph of the model to ``kfc_backend``, which

1. finds every conv/linear call — ``torch.conv{1,2,3}d`` and ``torch._C._nn.linear`` (what ``nn.Conv*``,
   ``nn.Linear``, ``F.conv*`` and ``F.linear`` become in a dynamo graph) and the packed projections hidden inside
   ``F.multi_head_attention_forward`` (see ``mha.py``) — whose weight is a trainable ``nn.Parameter``
   (``example_inputs[i]`` *is* the parameter of placeholder i);
2. keeps a weight only if every use of it (and of its bias) in the graph is such a call with one geometry;
   anything else (tied with an embedding, used by a matmul, ...) leaves it to the fallback optimizer, with the
   reason — also retroactively, when a later graph reveals such a use;
3. inserts ``ops.tap(y, x, slot, key)`` after each kept call (the tap's backward calls the ``kfc::record`` op,
   which records only when statistics are due: one compiled graph serves both kinds of step);
4. delegates the rewritten graph to inductor (``compile_fx``), or to another backend named in
   ``options={"inner": ...}`` (e.g. ``"aot_eager"``, for debugging).

The layers found join a **registry** (``CompiledKFCInfo``, a ``KFCInfo``) owned by the model's parameters:
``registry_for(compiled_model)`` — what ``kc.KFC`` calls — creates it before the first call, and layers found
when dynamo compiles (first call, recompiles, each graph of a model with graph breaks) are appended to
``info.layers`` then. Graphs compiled before any registry exists go to an orphan registry that the model's
registry adopts later. ``info.version`` changes whenever the layer list does.
"""
from __future__ import annotations

import logging
import re
import warnings
import weakref
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from kfc_compile.capture import CaptureState, output_tap
from kfc_compile.compile import mha, ops
from kfc_compile.curvature.layers import Site, conv_site, linear_site
from kfc_compile.registry import KFCInfo, KFCLayer, Uncovered
from kfc_compile.transform import check_approx

log = logging.getLogger(__name__)

_CONV_TARGETS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_LINEAR_TARGETS = {torch._C._nn.linear, F.linear}
_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

# parameter -> weakref to its CompiledKFCInfo. The registry itself holds its parameters, so a strong value would
# keep the key alive forever; registries live on the compiled module (``model.kfc``) or, for graphs compiled before
# one exists, on the compiled graph (``kfc_backend``).
_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _owner(p: torch.Tensor) -> "CompiledKFCInfo | None":
    ref = _OWNER.get(p)
    return ref() if ref is not None else None


def _own(p: torch.Tensor, info: "CompiledKFCInfo") -> None:
    _OWNER[p] = weakref.ref(info)


_MODELS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # original module -> its registry (lives as long as it)
_SLOTS: dict[torch.device, nn.Parameter] = {}
STATS = {"graphs": 0, "sites": 0}  # graphs instrumented and taps inserted by this process (tests, benchmarks)


def _slot(device: torch.device) -> nn.Parameter:
    """One statistics slot per device, shared by every registry (merging registries keeps compiled graphs valid)."""
    device = torch.device(device)
    if device not in _SLOTS:
        _SLOTS[device] = nn.Parameter(torch.zeros((), device=device))
    return _SLOTS[device]


# -- the registry --------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class CompiledKFCInfo(KFCInfo):
    """``KFCInfo`` of a model compiled with the ``kfc`` backend. ``layers`` grows as dynamo compiles graphs (and
    may lose a layer whose weight turns out to have another use); ``version`` counts those changes."""

    names: dict = field(default_factory=dict, repr=False)  # id(param) -> qualified name
    params: list = field(default_factory=list, repr=False)  # the model's parameters (None for an orphan)
    rejected: dict = field(default_factory=dict, repr=False)  # id(param) -> reason
    site_keys: list = field(default_factory=list, repr=False)  # ops keys of the taps feeding ``state``
    version: int = 0
    graphs: int = 0  # dynamo graphs instrumented for this model
    orphan: bool = False

    def layer_of(self, weight: torch.Tensor) -> int | None:
        for i, layer in enumerate(self.layers):
            if layer.weight is weight:
                return i
        return None

    def refresh(self) -> None:
        """Recompute ``uncovered``, ``frozen`` and ``total_numel`` from the current layers."""
        covered = {id(l.weight) for l in self.layers} | {id(l.bias) for l in self.layers if l.bias is not None}
        uncovered, frozen, total, seen = [], [], 0, set()
        for p in self.params:
            if id(p) in seen:
                continue
            seen.add(id(p))
            name = self.names.get(id(p), "<unnamed>")
            if not p.requires_grad:
                frozen.append(name)
                continue
            total += p.numel()
            if id(p) not in covered:
                reason = self.rejected.get(id(p)) or (
                    "not used by any conv/linear call in the graphs compiled so far" if self.graphs
                    else "no graph compiled yet (layers are found at the first call)")
                uncovered.append(Uncovered(name, tuple(p.shape), reason))
        self.uncovered[:] = uncovered
        self.frozen[:] = frozen
        self.total_numel = total


def _new_info(approx: str, device: torch.device, orphan: bool) -> CompiledKFCInfo:
    state = CaptureState([], [], approx)
    state.slot = _slot(device)
    return CompiledKFCInfo(approx=approx, layers=state.layers, uncovered=[], black_boxes=[], frozen=[], state=state,
                           total_numel=0, orphan=orphan)


def _merge(dst: CompiledKFCInfo, src: CompiledKFCInfo) -> None:
    """Move ``src``'s layers, sites and taps into ``dst`` (their parameters are disjoint)."""
    offset = len(dst.layers)
    dst.layers.extend(src.layers)
    for key in src.site_keys:
        ref = ops.site_ref(key)
        layer_index, site = src.state.sites[ref.index]
        dst.state.sites.append((None if layer_index is None else layer_index + offset, site))
        ops.retarget(key, dst.state, len(dst.state.sites) - 1)
        dst.site_keys.append(key)
    dst.rejected.update(src.rejected)
    dst.graphs += src.graphs
    for p in src.params:
        _own(p, dst)
        if not any(p is q for q in dst.params):
            dst.params.append(p)
    for pid, name in src.names.items():
        dst.names.setdefault(pid, name)
    src.layers.clear(), src.state.sites.clear(), src.site_keys.clear(), src.params.clear()
    dst.version += 1


def _is_compiled_module(model) -> bool:
    from torch._dynamo.eval_frame import OptimizedModule

    return isinstance(model, OptimizedModule)


def registry_for(model: nn.Module, approx: str = "expand") -> CompiledKFCInfo:
    """The live registry of a model compiled with ``torch.compile(model, backend="kfc")``.

    Creates it on first use (before the first call is fine: layers join when dynamo compiles), stores it as
    ``model.kfc`` (on the compiled wrapper only; the original module is not modified), and routes the wrapper's
    output through the capture output tap (batch size, last inputs, the Fisher pass of plain training loops).
    """
    check_approx(approx)
    info = model.__dict__.get("kfc") if isinstance(model, nn.Module) else None
    if isinstance(info, CompiledKFCInfo):
        if info.approx != approx:
            if info.layers and info.state.stats:
                raise ValueError(f"model's kfc registry uses approx={info.approx!r}, not {approx!r}")
            info.approx = info.state.approx = approx
        return info
    if not _is_compiled_module(model):
        raise TypeError("registry_for expects a module compiled with torch.compile(model, backend='kfc'); "
                        f"got {type(model).__name__} (use kc.transform(model) for eager models)")
    backend = _innermost_backend(model)
    if backend is not kfc_backend:
        raise NotImplementedError(f"KFC on a model compiled with backend {getattr(backend, '__name__', backend)!r} "
                                  "(no capture taps) is not supported: use torch.compile(model, backend='kfc'), or "
                                  "torch.compile(kc.transform(model))")
    orig = model._orig_mod
    info = _MODELS.get(orig)
    if info is not None:  # the same module compiled again
        model.__dict__["kfc"] = info
        _install_output_tap(model, info.state)
        return registry_for(model, approx)
    params = list(orig.parameters())
    device = params[0].device if params else torch.device("cpu")
    found = []
    for p in params:
        owner = _owner(p)
        if owner is not None and owner not in found:
            found.append(owner)
    if not found:  # nothing compiled for this module yet: keep other modules' graphs away from it
        _separate_cache(model)
    named = [o for o in found if not o.orphan]
    info = named[0] if named else _new_info(approx, device, orphan=False)
    info.orphan = False
    for other in found:
        if other is not info:
            _merge(info, other)
    for name, p in orig.named_parameters(remove_duplicate=False):
        info.names.setdefault(id(p), name)
    for p in params:
        _own(p, info)
        if not any(p is q for q in info.params):
            info.params.append(p)
    if info.approx != approx:
        info.approx = info.state.approx = approx
    for layer in info.layers:  # names seen by an orphan registry were guessed from dynamo sources
        layer.name = _layer_name(info, layer.weight, layer.name)
    info.refresh()
    _MODELS[orig] = info
    model.__dict__["kfc"] = info
    _install_output_tap(model, info.state)
    return info


class _ModelBackend:
    """The backend of one compiled module, under its own identity.

    Dynamo keeps compiled code per code object and reuses an entry when its guards pass and the *innermost backend
    object* is the same; with parameters as graph inputs, a second module of the same class compiled with
    ``backend="kfc"`` would otherwise run the first module's graphs, whose taps feed the first module's registry
    (its own registry would stay empty). Wrapping the backend per module makes dynamo compile each module's graphs
    for it."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)


def _backend_link(model):
    """The last wrapper in a compiled module's callback chain (its ``_torchdynamo_orig_backend`` is the backend)."""
    link = model.dynamo_ctx.callback
    while hasattr(getattr(link, "_torchdynamo_orig_backend", None), "_torchdynamo_orig_backend"):
        link = link._torchdynamo_orig_backend
    return link


def _innermost_backend(model):
    """The backend a compiled module was built with (unwrapping dynamo's, torch.compile's and our wrappers)."""
    fn = getattr(_backend_link(model), "_torchdynamo_orig_backend", None)
    if isinstance(fn, _ModelBackend):
        fn = fn.inner
    return getattr(fn, "compiler_fn", fn)


def _separate_cache(model) -> None:
    """Give this compiled module's backend its own identity (see ``_ModelBackend``); idempotent. Done when its
    registry is created before any graph was compiled for it; graphs compiled earlier for its own parameters keep
    matching (no recompile), and any later module of the class gets its own identity in turn."""
    link = _backend_link(model)
    inner = getattr(link, "_torchdynamo_orig_backend", None)
    if inner is not None and not isinstance(inner, _ModelBackend):
        link._torchdynamo_orig_backend = _ModelBackend(inner)


def _install_output_tap(model: nn.Module, state: CaptureState) -> None:
    compiled_forward = model.__dict__.get("forward")
    if compiled_forward is None or getattr(compiled_forward, "_kfc_output_tap", False):
        return

    def forward(*args, **kwargs):
        return output_tap(compiled_forward(*args, **kwargs), state, args)

    forward._kfc_output_tap = True
    model.forward = forward


def _layer_name(info: CompiledKFCInfo, weight: torch.Tensor, guess: str) -> str:
    name = info.names.get(id(weight))
    if name is None:
        return guess
    return name[: -len(".weight")] if name.endswith(".weight") else name


# -- graph scanning ------------------------------------------------------------------------------------------------

@dataclass
class _Candidate:
    node: fx.Node
    input_node: fx.Node | None
    weight: nn.Parameter
    bias: nn.Parameter | None
    site: Site
    role: str = "call"  # "call", "mha_in", "mha_out"


def _arg(node: fx.Node, i: int, name: str, default=None):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _has_node(v) -> bool:
    if isinstance(v, fx.Node):
        return True
    if isinstance(v, (tuple, list)):
        return any(_has_node(i) for i in v)
    return False


def _source_guess(node: fx.Node) -> str:
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


class _Scan:
    """One dynamo graph: candidate sites, other parameter uses, then the rewrite."""

    def __init__(self, gm: fx.GraphModule, example_inputs):
        self.gm = gm
        self.param_of: dict[fx.Node, nn.Parameter] = {}
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) == len(example_inputs):
            for node, value in zip(placeholders, example_inputs):
                if isinstance(value, nn.Parameter):
                    self.param_of[node] = value
        for node in gm.graph.nodes:  # graphs with get_attr parameters (nn modules not inlined)
            if node.op == "get_attr":
                try:
                    p = gm.get_parameter(node.target)
                except AttributeError:
                    continue
                self.param_of[node] = p
        self.candidates: list[_Candidate] = []
        self.mha_calls: dict[fx.Node, tuple[dict, _Candidate | None, _Candidate | None]] = {}
        self.other_uses: dict[int, str] = {}  # id(param) -> reason
        self.mha_reasons: dict[fx.Node, str] = {}

    def param(self, v) -> nn.Parameter | None:
        return self.param_of.get(v) if isinstance(v, fx.Node) else None

    def scan(self) -> None:
        claimed: set[tuple[fx.Node, fx.Node]] = set()  # (user node, parameter node) uses that are sites
        for node in self.gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in _LINEAR_TARGETS or node.target in _CONV_TARGETS:
                cand = self._call_site(node)
                if cand is not None:
                    if not self._tapped_already(node):
                        self.candidates.append(cand)
                    claimed.add((node, _arg(node, 1, "weight")))
                    b = _arg(node, 2, "bias")
                    if cand.bias is not None:
                        claimed.add((node, b))
            elif node.target is mha.MHA_TARGET:
                self._mha_site(node, claimed)
        for pnode, p in self.param_of.items():
            for user in pnode.users:
                if (user, pnode) in claimed:
                    continue
                what = user.target if user.op != "call_function" else getattr(user.target, "__name__", user.target)
                reason = self.mha_reasons.get(user) or f"used by {what} (only conv/linear calls are under KFC)"
                self.other_uses.setdefault(id(p), reason)

    def _tapped_already(self, node: fx.Node) -> bool:
        """The call's output feeds a capture tap traced from a ``kc.transform``ed model (an autograd function whose
        backward calls kfc::record): that model's own registry records it."""
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

    def _call_site(self, node: fx.Node) -> _Candidate | None:
        if node.target in _LINEAR_TARGETS:
            x, w, b = _arg(node, 0, "input"), _arg(node, 1, "weight"), _arg(node, 2, "bias")
            weight = self.param(w)
            if weight is None or weight.dim() != 2 or not isinstance(x, fx.Node):
                return None
            bias = self.param(b)
            return _Candidate(node, x, weight, bias, linear_site(weight, b is not None))
        vals = {name: _arg(node, i, name, _CONV_DEFAULTS.get(name)) for i, name in enumerate(_CONV_ARGS)}
        weight = self.param(vals["weight"])
        if weight is None or not isinstance(vals["input"], fx.Node):
            return None
        if weight.dim() != _CONV_TARGETS[node.target] + 2:
            return None
        geometry = [vals[k] for k in ("stride", "padding", "dilation", "groups")]
        if any(_has_node(v) for v in geometry):
            return None
        try:
            site = conv_site(weight, vals["bias"] is not None, *geometry)
        except ValueError:
            return None
        return _Candidate(node, vals["input"], weight, self.param(vals["bias"]), site)

    def _mha_site(self, node: fx.Node, claimed: set) -> None:
        try:
            a = mha.bind(node.args, node.kwargs)
        except TypeError:
            return
        q = a["query"]
        example = q.meta.get("example_value") if isinstance(q, fx.Node) else None
        reason = mha.unsupported_reason(a, example.dim() if example is not None else None)
        w_in, w_out = self.param(a["in_proj_weight"]), self.param(a["out_proj_weight"])
        if not reason and (w_in is None or w_out is None or _has_node([a["num_heads"], a["embed_dim_to_check"]])):
            reason = "attention projections that are not parameters"
        if reason:
            self.mha_reasons[node] = f"{reason}: not decomposed by the kfc backend"
            return
        b_in, b_out = self.param(a["in_proj_bias"]), self.param(a["out_proj_bias"])
        c_in = _Candidate(node, None, w_in, b_in, linear_site(w_in, a["in_proj_bias"] is not None), "mha_in")
        c_out = _Candidate(node, None, w_out, b_out, linear_site(w_out, a["out_proj_bias"] is not None), "mha_out")
        self.candidates += [c_in, c_out]
        self.mha_calls[node] = (a, c_in, c_out)
        for key in ("in_proj_weight", "out_proj_weight"):
            claimed.add((node, a[key]))
        for key, c in (("in_proj_bias", c_in), ("out_proj_bias", c_out)):
            if c.bias is not None:
                claimed.add((node, a[key]))


# -- the backend ---------------------------------------------------------------------------------------------------

def _registry_for_graph(params: list[nn.Parameter], device) -> CompiledKFCInfo:
    owners = []
    for p in params:
        owner = _owner(p)
        if owner is not None and owner not in owners:
            owners.append(owner)
    if not owners:
        info = _new_info("expand", device, orphan=True)
        owners = [info]
    info = next((o for o in owners if not o.orphan), owners[0])
    for other in owners:
        if other is not info:
            _merge(info, other)
    for p in params:
        if _owner(p) is not info:
            _own(p, info)
            if info.orphan:
                info.params.append(p)
    return info


def _reject(info: CompiledKFCInfo, param: torch.Tensor, reason: str) -> None:
    """Keep ``param`` out of KFC from now on; drops its layer if an earlier graph made it one."""
    info.rejected.setdefault(id(param), reason)
    i = info.layer_of(param)
    if i is None:
        return
    layer = info.layers.pop(i)
    if layer.bias is not None:
        info.rejected.setdefault(id(layer.bias), reason)
    sites = info.state.sites
    for j, (li, site) in enumerate(sites):
        if li == i:
            sites[j] = (None, site)
        elif li is not None and li > i:
            sites[j] = (li - 1, site)
    info.version += 1
    warnings.warn(f"kfc backend: layer {layer.name!r} leaves KFC ({reason}); it is now trained by the fallback",
                  stacklevel=3)


def _geometry(site: Site) -> tuple:
    return site.kind, site.a_dim, site.g_dim, site.groups


def _decide(info: CompiledKFCInfo, scan: _Scan) -> dict[int, int]:
    """Register the graph's sites into ``info``; returns id(candidate) -> ops key for the taps to insert."""
    in_calls = {id(c.weight) for c in scan.candidates} | {id(c.bias) for c in scan.candidates if c.bias is not None}
    for p in {id(q): q for q in scan.param_of.values()}.values():
        reason = scan.other_uses.get(id(p))
        if reason is not None:
            _reject(info, p, f"also {reason}" if id(p) in in_calls else reason)
    by_weight: dict[int, list[_Candidate]] = {}
    for c in scan.candidates:
        by_weight.setdefault(id(c.weight), []).append(c)
    keys: dict[int, int] = {}
    for cands in by_weight.values():
        weight = cands[0].weight
        if not weight.requires_grad or id(weight) in info.rejected:
            continue
        biases = {id(c.bias) for c in cands if c.bias is not None and c.bias.requires_grad}
        reason = ""
        if len(biases) > 1:
            reason = "weight shared by calls with different bias parameters"
        elif any(_geometry(c.site) != _geometry(cands[0].site) for c in cands):
            reason = "weight shared by calls of different kinds or geometries"
        elif any(c.bias is not None and id(c.bias) in info.rejected for c in cands):
            reason = "its bias is also used outside conv/linear calls"
        bias = next((c.bias for c in cands if c.bias is not None and c.bias.requires_grad), None)
        i = info.layer_of(weight)
        if not reason and i is not None:
            layer = info.layers[i]
            if _geometry(layer.sites[0]) != _geometry(cands[0].site):
                reason = "weight shared by calls of different kinds or geometries"
            elif bias is not None and layer.bias is not None and bias is not layer.bias:
                reason = "weight shared by calls with different bias parameters"
            elif bias is not None and layer.bias is None:
                reason = "weight used with a bias in one graph and without in another"
        if reason:
            _reject(info, weight, reason)
            continue
        sites = []
        for c in cands:
            if c.site.has_bias and (c.bias is None or not c.bias.requires_grad):
                c.site = type(c.site)(**{**c.site.__dict__, "has_bias": False})  # computed/frozen bias: W only
            sites.append(c.site)
        if i is None:
            guess = _source_guess(next(n for n, p in scan.param_of.items() if p is weight))
            site = sites[0]
            info.layers.append(KFCLayer(
                name=_layer_name(info, weight, guess), kind=site.kind, weight=weight, bias=bias,
                a_dim=site.a_dim + (bias is not None), g_dim=site.g_dim, groups=site.groups, uses=len(cands),
                sites=sites))
            i = len(info.layers) - 1
            info.version += 1
        else:
            layer = info.layers[i]
            layer.uses = max(layer.uses, len(cands))
        for c in cands:
            info.state.sites.append((i, c.site))
            key = ops.new_site(info.state, len(info.state.sites) - 1, seq_first=c.role != "call")
            info.site_keys.append(key)
            keys[id(c)] = key
    return keys


def _rewrite(gm: fx.GraphModule, scan: _Scan, keys: dict[int, int], slot: nn.Parameter) -> tuple[fx.GraphModule, int]:
    graph = gm.graph
    taps = 0
    if not keys:
        return gm, 0
    slot_name = "_kfc_slot"
    gm.register_parameter(slot_name, slot)
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        slot_node = graph.get_attr(slot_name)
    for c in scan.candidates:
        if c.role != "call" or id(c) not in keys:
            continue
        node = c.node
        with graph.inserting_after(node):
            tapped = graph.call_function(ops.tap, (node, c.input_node, slot_node, keys[id(c)]))
        node.replace_all_uses_with(tapped, delete_user_cb=lambda user: user is not tapped)
        taps += 1
    for node, (a, c_in, c_out) in scan.mha_calls.items():
        k_in, k_out = keys.get(id(c_in), -1), keys.get(id(c_out), -1)
        if k_in < 0 and k_out < 0:
            continue
        args = (a["query"], a["embed_dim_to_check"], a["num_heads"], a["in_proj_weight"], a["in_proj_bias"],
                a["dropout_p"], a["out_proj_weight"], a["out_proj_bias"], a["training"], a["key_padding_mask"],
                a["need_weights"], a["attn_mask"], a["average_attn_weights"], slot_node, k_in, k_out)
        with graph.inserting_after(node):
            new = graph.call_function(mha.self_attention, args)
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        taps += (k_in >= 0) + (k_out >= 0)
    graph.lint()
    new_gm = fx.GraphModule(gm, graph)
    # dynamo's bookkeeping refers to the original graph's attributes; AOT lifts the slot parameter itself
    new_gm.meta.update({k: v for k, v in gm.meta.items() if k != "dynamo_compile_id"})
    new_gm.__dict__.pop("_param_name_to_source", None)
    return new_gm, taps


def instrument(gm: fx.GraphModule, example_inputs) -> tuple[fx.GraphModule, CompiledKFCInfo | None, int]:
    """Insert capture taps into one dynamo graph; returns (graph module, registry or None, taps inserted)."""
    scan = _Scan(gm, example_inputs)
    scan.scan()
    params = list({id(p): p for p in scan.param_of.values()}.values())
    if not scan.candidates and not any(_owner(p) is not None for p in params):
        return gm, None, 0
    device = next((c.weight.device for c in scan.candidates), params[0].device if params else torch.device("cpu"))
    info = _registry_for_graph(params, device)
    keys = _decide(info, scan)
    info.graphs += 1
    new_gm, taps = _rewrite(gm, scan, keys, info.state.slot)
    info.refresh()
    STATS["graphs"] += 1
    STATS["sites"] += taps
    log.info("kfc backend: graph %d, %d taps, %d layers in the registry", info.graphs, taps, len(info.layers))
    return new_gm, info, taps


def kfc_backend(gm: fx.GraphModule, example_inputs, options: dict | None = None, mode: str | None = None):
    """The ``kfc`` torch.compile backend (see the module docstring).

    ``options={"inner": name}`` picks the backend the instrumented graph is handed to (default: inductor); other
    options and ``mode`` are inductor's, as for ``backend="inductor"``."""
    options = dict(options or {})
    inner = options.pop("inner", "inductor")
    new_gm, info, _ = instrument(gm, example_inputs)
    # The Fisher pass of a statistics step runs the compiled backward with retain_graph=True before the training
    # backward: AOT's donated buffers (saved tensors freed during the backward) forbid that.
    with torch._functorch.config.patch(donated_buffer=False):
        if inner == "inductor":
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            patches = {**(list_mode_options(mode) if mode else {}), **options}
            compiled = compile_fx(new_gm, example_inputs, config_patches=patches or None)
        else:
            from torch._dynamo.backends.registry import lookup_backend

            compiled = lookup_backend(inner)(new_gm, example_inputs)
    if info is not None and info.orphan and new_gm is not gm:
        # No module holds this registry yet: the instrumented graph module does (AOT keeps it, with the slot
        # parameter it lifted, for as long as the compiled graph lives; the callable returned here is not kept).
        new_gm._kfc_registry = info
    return compiled
