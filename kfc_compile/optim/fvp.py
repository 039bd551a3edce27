"""Exact Fisher products on a batch (subset) with forward-mode JVPs.

For directions u, w in parameter space, ``uᵀ F w = mean_n (J_n u)ᵀ H_n (J_n w)`` where J_n is the Jacobian of
example n's model output and H_n the Hessian of its per-example loss ℓ_n w.r.t. that output (the output-space
Fisher, exact for these exponential-family losses: ``Loss.fisher_inner`` in ``curvature/losses.py``).
F is the Fisher of the per-example loss averaged over examples, i.e. the curvature of a batch-mean objective;
``scale`` (N for a sum objective) multiplies it. One JVP per direction gives all inner products among the
directions (2 JVPs for the 4 scalars of §6.1). Several directions can go through one forward pass
(``torch.func.vmap`` over ``torch.func.jvp``: the primal once, the tangents batched). On CPU that is 0.84× the
time of one pass per direction on the KFC paper's CIFAR-10 net but 1.4× on a small MLP, where per-op overhead
dominates (docs/benchmarks.md, "Step cost"), so a model uses it when its forward does enough work per parameter
tensor (counted once, deterministically: the same choice after a resume); where the batched pass fails (an op
without a batching rule) one pass per direction runs from then on. Both give the same values up to rounding.

:class:`ExactGram` runs them on the leading examples of the step's recorded calls (all micro-batches of gradient
accumulation). Where the model has an op without forward-mode AD (CPU ``nn.LSTM`` / ``nn.GRU``, a custom
``autograd.Function`` without ``jvp``, some fused kernels) the step falls back to the Kronecker-factored curvature
(:func:`factored_gram`), with one warning naming the op.
"""
from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Sequence

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from kfc_compile.curvature.comm import full_tensor
from kfc_compile.curvature.distributed import Distributed
from kfc_compile.curvature.estimator import CurvatureEstimator, LayerState
from kfc_compile.curvature.losses import Loss
from kfc_compile.curvature.owner import without_fsdp_hooks
from kfc_compile.curvature.precondition import grad_matrix
from kfc_compile.curvature.subset import leading_subset
from kfc_compile.runtime.calls import RecordedCall
from kfc_compile.runtime.taps import model_output

log = logging.getLogger(__name__)

#: the batched pass of several directions pays from this many forward FLOPs per parameter tensor on (CPU: the
#: 8-layer autoencoder does 4e4 and loses 1.4×, the digits conv net 3e6 and gains 0.89×; bench/fisher_products.py)
BATCHED_MIN_FLOPS = 1e6
#: the op ``fwAD.make_dual`` ends in (``torch._VF._make_dual``, looked up once: ``torch._VF`` resolves per access)
_MAKE_DUAL = torch._C._VariableFunctions._make_dual


class ModelMembers:
    """A model's named parameters and buffers, walked once and kept while its module tree is unchanged.

    Walking the tree every call (``named_parameters`` / ``named_buffers``, and ``functional_call``'s own walk for
    tied names) was ~0.1 ms of each exact-ν step on the 8-layer autoencoder. The walk is kept with a snapshot of
    every module's ``_parameters`` / ``_buffers`` / ``_modules`` entries (objects by identity, and their counts);
    any change there (a parameter, buffer or submodule replaced, added or removed, ``load_state_dict(assign=True)``)
    makes :meth:`current` walk again, so the result is always that of a fresh walk. In-place updates of the values
    (optimizer steps, ``load_state_dict``'s copies) change nothing here.

    The walk also keeps, per (first) name, the module dict entries that hold the tensor under each of its names
    (:attr:`slots`): :meth:`swap_in` puts tensors there and :meth:`restore` puts the originals back, which is what
    ``functional_call`` does (``torch.nn.utils.stateless``: ``module._parameters[name] = tensor``) without its
    per-call name resolution and context managers (~0.1 ms of the autoencoder's exact-ν pass).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._lens: list[tuple[dict, int]] = []
        self._entries: list[tuple[dict, str, object]] = []
        self.params: list[tuple[str, torch.Tensor]] = []
        self.buffers: list[tuple[str, torch.Tensor]] = []
        self.names: dict[int, str] = {}  # id(parameter) -> its (first) name
        self.aliases: list[tuple[str, str]] = []  # (tied name, the name whose tensor it takes)
        self.slots: dict[str, list[tuple[dict, str]]] = {}  # first name -> (module dict, key) under every name
        self.modules: list[nn.Module] = []
        self.direct = True  # swap_in can stand for functional_call (no TorchScript / DataParallel module)
        self.sharded = False  # a parameter is a DTensor (FSDP2): passes take its whole tensor
        self._walk()

    def current(self) -> ModelMembers:
        """Self, walked again first if the module tree changed since the last walk."""
        if not (self.direct and all(len(d) == n for d, n in self._lens)
                and all(d.get(k) is v for d, k, v in self._entries)):  # (TorchScript modules: walked every call)
            self._walk()
        return self

    def tied(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``tensors`` with every tied name of the model given its first name's tensor (as ``tie_weights=True``)."""
        if not self.aliases:
            return tensors
        return {**tensors, **{a: tensors[n] for a, n in self.aliases if n in tensors}}

    def swap_in(self, tensors: dict[str, torch.Tensor]) -> list[tuple[dict, str, object]]:
        """Put each tensor (keyed by its first name) in the module entries of all its names; returns the originals.

        Pass the result to :meth:`restore` (in a ``finally``); on an error here the entries are already restored.
        """
        saved: list[tuple[dict, str, object]] = []
        try:
            for n, t in tensors.items():
                for d, k in self.slots[n]:
                    saved.append((d, k, d[k]))
                    d[k] = t
        except BaseException:
            self.restore(saved)
            raise
        return saved

    @staticmethod
    def restore(saved: list[tuple[dict, str, object]]) -> None:
        """Put back what :meth:`swap_in` replaced (in reverse order: a tensor under two names ends as it was)."""
        for d, k, old in reversed(saved):
            d[k] = old

    def _walk(self) -> None:
        model = self.model
        self.modules = list(model.modules())
        self.direct = not any(isinstance(m, (torch.jit.ScriptModule, nn.DataParallel)) for m in self.modules)
        dicts = [d for m in self.modules for d in (m._parameters, m._buffers, m._modules)] if self.direct else []
        self._lens = [(d, len(d)) for d in dicts]
        self._entries = [(d, k, v) for d in dicts for k, v in d.items()]
        self.params = list(model.named_parameters())
        self.buffers = list(model.named_buffers())
        first: dict[int, str] = {}
        for n, t in (*self.params, *self.buffers):
            first.setdefault(id(t), n)
        self.names = {id(p): n for n, p in self.params}
        every = (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
        self.aliases = [(n, first[id(t)]) for n, t in every if first[id(t)] != n]
        self.slots = {}
        for n, t in every if self.direct else ():
            prefix, _, key = n.rpartition(".")
            owner = model.get_submodule(prefix)
            d = owner._parameters if owner._parameters.get(key) is t else owner._buffers
            self.slots.setdefault(first[id(t)], []).append((d, key))
        self.sharded = any(hasattr(p, "to_local") for _, p in self.params)


class FisherProducts:
    """JVPs of a (transformed) model's output w.r.t. its parameters.

    Buffers are copied so that BatchNorm running statistics are not touched by these extra forwards.
    """

    def __init__(self, model: nn.Module, spec: Loss, select=None):
        self.model = model
        self.spec = spec
        self.select = select  # picks the logits from the model's output (``model_output``)
        self.members = ModelMembers(model)
        self.batched: bool | None = None  # several directions in one vmapped pass; None: not decided yet

    def outputs_and_jvps(self, call: RecordedCall | tuple, directions: list[dict[torch.Tensor, torch.Tensor]]
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Model output f of ``call`` and ``J·d`` for each direction (dict parameter → tensor of its shape).

        ``call`` is a recorded call or a tuple of positional inputs. Parameters missing from a direction get a zero
        tangent; parameters the model does not use are ignored.

        Raises:
            NotImplementedError: an op of the model has no forward-mode AD (torch's error, naming it).
        """
        if not isinstance(call, RecordedCall):
            call = RecordedCall(tuple(call), {})
        # FSDP2: sharded parameters and directions as whole tensors, and FSDP's own hooks off (owner.py)
        members = self.members.current()
        params = {n: full_tensor(p.detach()) for n, p in members.params} if members.sharded else {
            n: p.detach() for n, p in members.params}
        buffers = {n: b.detach() for n, b in members.buffers}
        names = members.names
        named = [{names[id(p)]: full_tensor(v) for p, v in d.items() if id(p) in names} for d in directions]
        moving = {n: params[n] for d in named for n in d}
        if not moving:
            with torch.no_grad():
                bufs = {n: b.clone() for n, b in buffers.items()}
                f = model_output(self._call({**params, **bufs}, call), self.select)
            return f, [torch.zeros_like(f) for _ in directions]

        if len(named) > 1 and self.batched is None:
            self.batched = self._batch_pays(call, params, buffers)
            log.info("exact Fisher products: %s", "one batched pass for all directions" if self.batched
                     else "one pass per direction (too little work per op for the batched pass to pay)")
        if len(named) > 1 and self.batched:
            try:
                return self._batched_jvps(call, params, buffers, moving, named)
            except Exception as e:  # noqa: BLE001 - any failure of the batched pass: the per-direction passes
                self.batched = False
                log.info("exact Fisher products: one pass per direction (the batched pass failed: %s)",
                         str(e).splitlines()[0] if str(e) else type(e).__name__)
        return self._sequential_jvps(call, params, buffers, moving, named)

    def _call(self, tensors: dict[str, torch.Tensor], call: RecordedCall):
        """The model on ``call`` with ``tensors`` (name → tensor) for its parameters and buffers, tied names included.

        ``functional_call``'s swap, done on the entries :class:`ModelMembers` keeps (``functional_call`` itself
        for a TorchScript or ``DataParallel`` module, which it refuses with its own error).
        """
        members = self.members
        if not members.direct:
            return functional_call(self.model, members.tied(tensors), call.args, call.kwargs, tie_weights=False)
        saved = members.swap_in(tensors)
        try:
            return self.model(*call.args, **call.kwargs)
        finally:
            members.restore(saved)

    def _batch_pays(self, call, params, buffers) -> bool:
        """Whether the model's forward does ≥ :data:`BATCHED_MIN_FLOPS` per parameter tensor on ``call``.

        Counted (``FlopCounterMode``) on one primal forward with the RNG state put back, so the choice depends
        only on the model and the batch shape: a resumed run makes the same one.
        """
        cuda = sorted({p.device.index or 0 for p in params.values() if p.device.type == "cuda"})
        with (torch.no_grad(), torch.random.fork_rng(devices=cuda),
              without_fsdp_hooks(self.model, self.members.modules), FlopCounterMode(display=False) as counter):
            bufs = {n: b.clone() for n, b in buffers.items()}
            self._call({**params, **bufs}, call)
        return counter.get_total_flops() >= BATCHED_MIN_FLOPS * max(len(params), 1)

    def _sequential_jvps(self, call, params, buffers, moving, named):
        """One forward-mode pass per direction."""
        f = None
        outs = []
        # the fused scaled-dot-product-attention kernels have no forward-mode AD: the math backend (composite ops)
        # gives the same values and JVPs through attention
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), without_fsdp_hooks(self.model, self.members.modules):
            for d in named:
                with fwAD.dual_level() as level:
                    duals = make_duals(moving, d, level)
                    # fresh buffer copies per pass: BatchNorm's in-place running-stat updates stay local
                    bufs = {n: b.clone() for n, b in buffers.items()}
                    out = model_output(self._call({**params, **duals, **bufs}, call), self.select)
                    primal, tangent = fwAD.unpack_dual(out)
                    f = primal.detach().clone()
                    outs.append(torch.zeros_like(f) if tangent is None else tangent.detach().clone())
        return f, outs

    def _batched_jvps(self, call, params, buffers, moving, named):
        """All directions in one pass: ``vmap`` over ``jvp``, the primal computed once, the tangents batched.

        Random ops (dropout) draw one mask for all directions (``randomness="same"``): the Gram matrix of one
        function.
        """
        tangents = {n: torch.stack([d[n].to(prim.dtype) if n in d else torch.zeros_like(prim) for d in named])
                    for n, prim in moving.items()}

        def forward(moved):
            bufs = {n: b.clone() for n, b in buffers.items()}  # BatchNorm's in-place running-stat updates stay local
            return model_output(self._call({**params, **moved, **bufs}, call), self.select)

        def push(t):
            return torch.func.jvp(forward, (moving,), (t,))

        with (torch.no_grad(), sdpa_kernel(SDPBackend.MATH), without_fsdp_hooks(self.model, self.members.modules),
              warnings.catch_warnings()):
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            f, tangent = torch.func.vmap(push, out_dims=(None, 0), randomness="same")(tangents)
        return f.detach(), [t.detach() for t in tangent.unbind(0)]


def make_duals(primals: dict[str, torch.Tensor], tangents: dict[str, torch.Tensor], level: int
               ) -> dict[str, torch.Tensor]:
    """``fwAD.make_dual(primal, tangent)`` per name (a zero tangent where ``tangents`` has none), at ``level``.

    The first goes through ``fwAD.make_dual`` (its checks, the import of torch's JVP decompositions); the others,
    when both tensors are floating point and no export is tracing, call the op it calls (``torch._VF._make_dual``)
    directly: the same dual tensors, without ~2 µs of Python per parameter.
    """
    out: dict[str, torch.Tensor] = {}
    fast = False
    for n, prim in primals.items():
        t = tangents[n].to(prim.dtype) if n in tangents else torch.zeros_like(prim)
        if fast and prim.dtype.is_floating_point:  # t has its dtype
            out[n] = _MAKE_DUAL(prim, t, level=level)
            continue
        with warnings.catch_warnings():
            # the first make_dual imports torch's JVP decompositions, which call the deprecated torch.jit.script:
            # torch's own warning, not the user's concern
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
            out[n] = fwAD.make_dual(prim, t, level=level)
        fast = not torch.compiler.is_exporting()
    return out


def gram(spec: Loss, f: torch.Tensor, jvps: list[torch.Tensor], scale: float = 1.0,
         mask: torch.Tensor | None = None, c: float | None = None) -> torch.Tensor:
    """Matrix of ``scale·(J u_i)ᵀ H (J u_j)`` over the given JVPs (fp64, symmetric).

    H over ``mask``'s real terms with the term weight ``c`` (``Loss.fisher_inner``) where labels are visible.
    """
    k = len(jvps)
    C = [[0.0] * k for _ in range(k)]  # Python floats, one tensor at the end (not one indexed store per entry)
    for i in range(k):
        for j in range(i, k):
            C[i][j] = C[j][i] = float(spec.fisher_inner(f, jvps[i], jvps[j], mask, c)) * scale
    return torch.tensor(C, dtype=torch.float64).reshape(k, k)



class ExactGram:
    """The Gram matrix of the objective's exact Fisher among directions, on the step's leading examples.

    ``gram(directions, fraction)`` (``updates.GramFn``): one JVP per direction and per recorded call that the
    leading ``fraction`` of the step's batch reaches, the per-call matrices averaged with their examples as
    weights; times the estimator's curvature scale. Falls back to :func:`factored_gram` for the step when an op
    has no forward-mode AD (one warning per optimizer, naming the op). Distributed (``distributed``): the mean of
    the ranks' matrices, the Fisher of the objective DDP differentiates.
    """

    def __init__(self, products: FisherProducts, estimator: CurvatureEstimator, warned: set[str],
                 distributed: Distributed | None = None):
        self.products = products
        self.estimator = estimator
        self.warned = warned
        self.distributed = distributed

    def __call__(self, directions: list[dict[torch.Tensor, torch.Tensor]], fraction: float) -> torch.Tensor:
        """Gram matrix (fp64) among ``directions`` (parameter → tensor; missing parameters: 0)."""
        C = self._local(directions, fraction)
        return C if self.distributed is None else self.distributed.mean("fisher", C)

    def _local(self, directions: list[dict[torch.Tensor, torch.Tensor]], fraction: float) -> torch.Tensor:
        est = self.estimator
        capture = est.capture
        calls = capture.recorded_calls()
        parts = leading_subset(calls, fraction)
        grams, sizes = [], []
        try:
            with capture.preserved_calls():
                for part, call in zip(parts, calls, strict=False):
                    f, jv = self.products.outputs_and_jvps(part, directions)
                    grams.append(gram(self.products.spec, f, jv, est.scale, est.term_mask(part, f),
                                      est.term_weight(call, f)))
                    sizes.append(f.shape[0])
        except RuntimeError as e:  # NotImplementedError included
            op = missing_forward_ad(e)
            if op is None:
                raise
            if "forward-ad" not in self.warned:
                self.warned.add("forward-ad")
                warnings.warn(f"{op} has no forward-mode AD: the exact Fisher products (clip_curvature='exact', "
                              "mode='adaptive') use the Kronecker-factored curvature of the KFC layers instead "
                              "(0 on the other parameters) on the steps where it runs", RuntimeWarning, stacklevel=4)
            if est.distributed is not None:  # the factors the ranks folded locally, averaged (a collective)
                est.distributed.settle(est.states)
            return factored_gram(est.states, directions, est.scale)
        if len(grams) == 1:
            return grams[0]
        return sum(c * n for c, n in zip(grams, sizes, strict=True)) / sum(sizes)


def missing_forward_ad(error: BaseException) -> str | None:
    """The op an error says has no forward-mode AD (a description when unnamed), or None for any other error.

    torch raises ``NotImplementedError`` (a ``RuntimeError``) for these; another ``RuntimeError`` counts only when
    its message is about forward mode.
    """
    if not isinstance(error, RuntimeError):
        return None
    text = str(error)
    named = re.search(r"forward AD with (\S+)", text)
    if named:
        return f"the op {named.group(1)}"
    if not isinstance(error, NotImplementedError) and not re.search(r"forward[- ]mode|forward AD|jvp", text):
        return None
    fn = None  # a custom autograd.Function without jvp: torch's message does not name it, its jvp frame's ctx does
    tb = error.__traceback__
    while tb is not None:
        ctx = tb.tb_frame.f_locals.get("ctx", tb.tb_frame.f_locals.get("self"))
        fn = getattr(ctx, "_forward_cls", None) or fn
        tb = tb.tb_next
    return f"the autograd.Function {fn.__qualname__}" if fn is not None else f"an op ({text.splitlines()[0]})"


def factored_gram(states: Sequence[LayerState], directions: list[dict[torch.Tensor, torch.Tensor]],
                  scale: float = 1.0) -> torch.Tensor:
    """Matrix of ``scale·uᵢᵀ F̂ uⱼ`` under the Kronecker-factored curvature (fp64, symmetric).

    F̂ is the undamped block-diagonal ``kron(Γ, Ω)`` of the KFC layers' moving averages, as the exact Fisher it
    replaces (damping and weight decay are added by the callers); parameters outside KFC and layers without
    factors yet contribute 0.
    """
    k = len(directions)
    C = torch.zeros(k, k, dtype=torch.float64)
    for s in states:
        if s.running is None:
            continue
        A, G = s.running.A, s.running.G
        if s.layout.blocked:
            A, G = s.layout.to_dense(A, G)
        layer = s.layer
        mats = [grad_matrix(layer, 0.0, (d.get(layer.weight), None if layer.bias is None else d.get(layer.bias)))
                for d in directions]
        mats = [None if m is None else m.double() for m in mats]
        prods = [None if m is None else G.double() @ m @ A.double() for m in mats]
        for i in range(k):
            for j in range(i, k):
                if mats[i] is not None and prods[j] is not None:
                    C[i, j] += float((mats[i] * prods[j]).sum())
                    C[j, i] = C[i, j]
    return C * scale
