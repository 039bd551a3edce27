"""The ``kfc`` torch.compile backend: capture taps in every dynamo graph, then inductor.

``torch.compile(model, backend="kfc")`` (registered through the ``torch_dynamo_backends`` entry point, so no
import is needed) hands each dynamo graph of the model to ``kfc_backend``, which

1. finds every conv/linear call — ``torch.conv{1,2,3}d``, ``torch.conv_transpose{1,2,3}d`` and
   ``torch._C._nn.linear`` (what ``nn.Conv*``, ``nn.ConvTranspose*``, ``nn.Linear``, ``F.conv*`` and ``F.linear``
   become in a dynamo graph), matmuls with a parameter weight (``x @ W.T``, ``x @ W + b``,
   ``torch.addmm(b, x, W)``: ``sites/kinds.py``) and the packed projections hidden inside
   ``F.multi_head_attention_forward`` (see ``runtime/attention.py``) — whose weight is a trainable ``nn.Parameter``
   (``example_inputs[i]`` *is* the parameter of placeholder i; under ``torch.compile(DDP(model))`` dynamo's
   DDPOptimizer calls the backend once per gradient-bucket subgraph with fake example inputs, and the scan takes
   the parameter from the placeholder's ``grapharg``: every subgraph's layers join the one registry);
2. keeps a weight only if every use of it (and of its bias) in the graph is such a call with one geometry;
   anything else (tied with an embedding, summed, used by a matmul in another layout, ...) leaves it to the fallback
   optimizer, with the reason — also retroactively, when a later graph reveals such a use;
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
import types

import torch
import torch.fx as fx
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfc_compile.curvature.statistics import check_approx
from kfc_compile.frontend.dynamo.registry import CompiledKFCInfo, module_registry, owner, registry_for_graph
from kfc_compile.frontend.dynamo.scan import GraphScan, source_guess
from kfc_compile.runtime import attention as mha
from kfc_compile.runtime import record as ops
from kfc_compile.runtime.state import CaptureState, SiteEntry
from kfc_compile.runtime.taps import output_tap
from kfc_compile.sites import coverage

log = logging.getLogger(__name__)

STATS = {"graphs": 0, "sites": 0}  # graphs instrumented and taps inserted by this process (tests, benchmarks)


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
        info.use_approx(approx)
        return info
    if not _is_compiled_module(model):
        raise TypeError("registry_for expects a module compiled with torch.compile(model, backend='kfc'); "
                        f"got {type(model).__name__} (use kc.transform(model) for eager models)")
    backend = _innermost_backend(model)
    if backend is not kfc_backend:
        raise NotImplementedError(f"KFC on a model compiled with backend {getattr(backend, '__name__', backend)!r} "
                                  "(no capture taps) is not supported: use torch.compile(model, backend='kfc'), or "
                                  "torch.compile(kc.transform(model))")
    info = module_registry(compiled_module(model), approx, on_new=lambda: _separate_cache(model))
    model.__dict__["kfc"] = info
    _install_output_tap(model, info.state)
    return info


def compiled_module(model: nn.Module) -> nn.Module:
    """The module a compiled wrapper trains: ``model._orig_mod``, or for ``torch.compile(DDP(m))`` the module ``m``.

    DDP's forward graph-breaks (its reducer bookkeeping cannot be traced) and runs ``m`` inside a context dynamo
    skips, so dynamo compiles ``m``'s forward as a frame of its own (splitting its graph at DDP's gradient-bucket
    boundaries: ``torch._dynamo.backends.distributed``). Layers are named after ``m`` (no ``module.`` prefix),
    as for ``kc.KFC(DDP(m))``. Dynamo does not trace a top-level frame in ``torch.nn`` (``nn.Sequential``'s
    forward, ``nn.Linear``'s...): such an ``m`` would run uncompiled, with no graph for the backend, so its forward
    is given a traced frame (:func:`_traced_forward`).
    """
    orig = model._orig_mod
    if isinstance(orig, DistributedDataParallel):
        orig = orig.module
        _traced_forward(orig)
    return orig


def _traced_forward(module: nn.Module) -> None:
    """Run ``module``'s forward in a frame dynamo traces when its own is one dynamo skips (a ``torch.nn`` forward).

    The instance gets a bound ``forward`` (``_class_forward``, a function of this package: dynamo traces it and
    inlines the class's forward; ``copy.deepcopy`` rebinds it to the copy); the class is untouched and
    ``del module.forward`` undoes it.
    """
    from torch._dynamo import trace_rules

    if "forward" not in module.__dict__ and trace_rules.check(type(module).forward.__code__):
        module.forward = types.MethodType(_class_forward, module)


def _class_forward(self: nn.Module, *args, **kwargs):
    return type(self).forward(self, *args, **kwargs)


class _ModelBackend:
    """The backend of one compiled module, under its own identity.

    Dynamo keeps compiled code per code object and reuses an entry when its guards pass and the *innermost backend
    object* is the same; with parameters as graph inputs, a second module of the same class compiled with
    ``backend="kfc"`` would otherwise run the first module's graphs, whose taps feed the first module's registry
    (its own registry would stay empty). Wrapping the backend per module makes dynamo compile each module's graphs
    for it.
    """

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
    """Give this compiled module's backend its own identity (see ``_ModelBackend``); idempotent.

    Done when its registry is created before any graph was compiled for it; graphs compiled earlier for its own
    parameters keep matching (no recompile), and any later module of the class gets its own identity in turn.
    """
    link = _backend_link(model)
    inner = getattr(link, "_torchdynamo_orig_backend", None)
    if inner is not None and not isinstance(inner, _ModelBackend):
        link._torchdynamo_orig_backend = _ModelBackend(inner)


def _install_output_tap(model: nn.Module, state: CaptureState) -> None:
    """Route the compiled wrapper's output through the capture output tap."""
    compiled_forward = model.__dict__.get("forward")
    if compiled_forward is None or getattr(compiled_forward, "_kfc_output_tap", False):
        return

    def forward(*args, **kwargs):
        return output_tap(compiled_forward(*args, **kwargs), state, args, kwargs)

    forward._kfc_output_tap = True
    model.forward = forward


def _decide(info: CompiledKFCInfo, scan: GraphScan) -> dict[int, int]:
    """Register the graph's sites into ``info`` (rules: ``sites/coverage.py``).

    Returns id(candidate) -> record key for the taps to insert.
    """
    weights = {id(c.weight) for c in scan.candidates}
    biases = {id(c.bias) for c in scan.candidates if c.bias is not None}
    for p in {id(q): q for q in scan.param_of.values()}.values():
        reason = scan.other_uses.get(id(p))
        if reason is not None:  # also retroactive: a layer of an earlier graph leaves KFC
            role = "weight" if id(p) in weights else "bias" if id(p) in biases else ""
            info.reject(p, f"{role} also {reason}" if role else reason)

    def other_use(p: nn.Parameter) -> str | None:
        earlier = info.rejected.get(id(p))
        return scan.other_uses.get(id(p)) or (f"left out of KFC ({earlier})" if earlier else None)

    keys: dict[int, int] = {}
    for cands in coverage.group_by_weight(scan.candidates):
        weight = cands[0].weight
        if not weight.requires_grad or id(weight) in info.rejected:
            continue
        i = info.layer_of(weight)
        reason = coverage.reject_reason(cands, other_use, None if i is None else info.layers[i])
        if reason:
            info.reject(weight, reason)
            continue
        if i is None:
            guess = source_guess(next(n for n, p in scan.param_of.items() if p is weight))
            info.layers.append(coverage.new_layer(info.layer_name(weight, guess), cands))
            i = len(info.layers) - 1
            info.version += 1
        else:
            coverage.bind_sites(cands)
            info.layers[i].uses = max(info.layers[i].uses, len(cands))
        for c in cands:
            info.state.sites.append(SiteEntry(i, c.site))
            key = ops.new_site(info.state, len(info.state.sites) - 1, seq_first=c.role != "call")
            info.site_keys.append(key)
            keys[id(c)] = key
    return keys


def _rewrite(gm: fx.GraphModule, scan: GraphScan, keys: dict[int, int],
             slot: nn.Parameter) -> tuple[fx.GraphModule, int]:
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
        node.replace_all_uses_with(tapped, delete_user_cb=lambda user, tapped=tapped: user is not tapped)
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
    scan = GraphScan(gm, example_inputs)
    scan.scan()
    params = list({id(p): p for p in scan.param_of.values()}.values())
    if not scan.candidates and not any(owner(p) is not None for p in params):
        return gm, None, 0
    device = next((c.weight.device for c in scan.candidates), params[0].device if params else torch.device("cpu"))
    info = registry_for_graph(params, device)
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
    options and ``mode`` are inductor's, as for ``backend="inductor"``.
    """
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
