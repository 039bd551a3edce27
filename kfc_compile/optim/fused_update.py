"""KFC-pre's per-step update as one function of tensors: fused eager, or compiled with ``torch.compile``.

The common path of ``mode="pre"`` (dense, grouped and same-shape-bucketed layers, factored or eigen damping, the
factored or exact ν of v or of the step μp + v, the SGD fallback's parameters in the same update vector, momentum,
weight decay) as functions of lists of tensors: ∇h = grad + wd·θ, the gradient matrices, the bucket products
Γ⁻¹GΩ⁻¹ (``precondition.dense_solve``), the finite check of F̂⁻¹∇h, ν (the factored ν of the step adds the
buffers' pᵀF̂p, ``curvature_product.py``), the clipping scale, p ← μp + s·v and θ ← θ + p. They replace the
per-tensor Python of ``estimator.precondition`` + ``updates.pre_update`` + ``rules.momentum_step_`` with the same
arithmetic (float64: equal to ≤ 1e-12 relative; the scalars' sums in another order).

* **eager** (the default): the directions and ν in a few batched ops, one host sync for (finite, ν, scale), then
  the momentum step with ``torch._foreach_*`` exactly as ``rules.momentum_step_`` does it.
* **compiled** (``KFC(compile_update=True)``): the same under ``torch.compile(fullgraph=True, dynamic=False)``
  (inductor). lr, μ, wd, the clip bound and η enter as one fp64 vector and the inverses (and F̂'s tensors) as
  inputs, so schedulers, statistics and inverse refreshes never recompile; the finite check and the clip decision
  are ``torch.where`` inside the graph (nothing is changed on a faulty step), read back with one ``.tolist()``.
  With the exact ν the graph is cut in two around the exact Fisher products (a JVP of the model, eager).

A *plan* (which layers have a gradient, the buckets' structure, which parameters the fallback updates, whether wd
is 0) is built once per configuration and cached; a configuration the plan cannot take (``mode="adaptive"``,
distributed KFC, DTensor parameters, a layer without an inverse or a bucket with a member missing its gradient,
no KFC group; compiled only: live-block or blocked inverses, whose products gather a data-dependent block — the
eager plan applies them with their own ``LayerInverse.solve``) keeps ``updates.py``'s path, decided once per
configuration and logged at DEBUG on ``kfc_compile.optim.fused_update``.
"""
from __future__ import annotations

import logging
import math
import types
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import torch

from kfc_compile.curvature.curvature_product import dense_quadratic, product_tensors, quadratic
from kfc_compile.curvature.precondition import bucket_tensors, dense_solve
from kfc_compile.optim.options import KFCOptions
from kfc_compile.optim.rules import clip_threshold
from kfc_compile.sites.geometry import Site

log = logging.getLogger(__name__)

#: what :meth:`FusedPre.step` returns when F̂⁻¹∇h has inf/NaN entries (the caller skips the step)
NATURAL_FAULT = "the preconditioned gradient F̂⁻¹∇h has inf/NaN entries"
#: the ``torch.compile`` backend of ``compile_update=True``
BACKEND = "inductor"
# positions in the scalar vector
LR, MOM, WD, FLR, FMOM, FWD, CLIP, ETA = range(8)


@dataclass(frozen=True)
class LayerSpec:
    """The static geometry of one KFC layer in a plan."""

    site: Site  # weight_matrix / weight_from_matrix
    shape: torch.Size  # the weight's
    bias_shape: torch.Size | None
    groups: int
    g_dim: int
    a_in: int  # columns of the weight block (a_dim without the bias column)


@dataclass(frozen=True)
class Spec:
    """Everything static about a step's update: a change here is a new plan (and one recompile)."""

    layers: tuple[LayerSpec, ...]
    buckets: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...]  # (method, member positions, groups each);
    # method "solve" (eager only): a live-block or blocked inverse, applied by its own LayerInverse.solve
    kfc_wd: bool  # weight decay of the KFC group ≠ 0
    fallback_wd: bool
    clip: str | None  # None, "factored" or "exact"
    clip_on: str  # "update" or "step"


# -- the update as functions of tensors ---------------------------------------------------------------------------


def _matrices(spec: Spec, ts) -> list[torch.Tensor]:
    """The layers' ``[W | b]`` matrices ``(groups, g, a)`` of per-parameter tensors (``precondition.grad_matrix``)."""
    mats, pos = [], 0
    for lay in spec.layers:
        gW = lay.site.weight_matrix(ts[pos])
        if lay.bias_shape is None:
            mats.append(gW)
            pos += 1
            continue
        gb = ts[pos + 1].reshape(lay.groups, lay.g_dim, 1)
        if gb.dtype != gW.dtype:
            gW, gb = gW.to(torch.promote_types(gW.dtype, gb.dtype)), gb.to(gW.dtype)
        mats.append(torch.cat([gW, gb], dim=-1))
        pos += 2
    return mats


def _stacked(members, mats, dtype) -> torch.Tensor:
    if len(members) > 1:
        return torch.cat([mats[i].to(dtype) for i in members])
    m = mats[members[0]]
    return m if m.dtype == dtype else m.to(dtype)


def _naturals(spec: Spec, params, grads, invs, scal) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(F̂⁻¹∇h, ∇h) per KFC parameter (weight, then bias, layer by layer), as ``estimator.precondition`` builds them."""
    hs = [g + scal[WD] * p for g, p in zip(grads, params, strict=True)] if spec.kfc_wd else list(grads)
    mats = _matrices(spec, hs)
    out: list[torch.Tensor | None] = [None] * len(spec.layers)
    for (method, members, counts), tensors in zip(spec.buckets, invs, strict=True):
        g = _stacked(members, mats, tensors[0].dtype)
        U = tensors[0].solve(g) if method == "solve" else dense_solve(method, tensors, scal[ETA], g)
        if len(members) == 1:
            out[members[0]] = U
            continue
        for i, part in zip(members, torch.split(U, list(counts)), strict=True):
            out[i] = part
    nats = []
    for lay, U in zip(spec.layers, out, strict=True):
        nats.append(lay.site.weight_from_matrix(U[..., :lay.a_in], lay.shape))
        if lay.bias_shape is not None:
            nats.append(U[..., lay.a_in].reshape(lay.bias_shape))
    return nats, hs


def _flat64(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors]).to(torch.float64) if tensors else torch.zeros(0).double()


def _buffer_terms(spec: Spec, bufs, hs, invs, curvs, scal) -> torch.Tensor:
    """μ²·pᵀF̂p − 2μ·lr·⟨p, ∇h⟩: the momentum buffers' share of the factored ν(μp + v), as F̂v = −lr·∇h."""
    mats, q = _matrices(spec, bufs), torch.zeros((), dtype=torch.float64)
    for (method, members, _), tensors, cur in zip(spec.buckets, invs, curvs, strict=True):
        P = _stacked(members, mats, tensors[0].dtype)
        q = q + (quadratic(tensors[0], P) if method == "solve" else dense_quadratic(method, cur, scal[ETA], P))
    return scal[MOM] * scal[MOM] * q - 2.0 * scal[MOM] * scal[LR] * (_flat64(bufs) @ _flat64(hs))


def _directions(spec: Spec, params, grads, bufs, invs, curvs, fparams, fgrads, fbufs, scal):
    """F̂⁻¹∇h's finite flag, the updates v (KFC, then fallback), what the exact ν measures, and the factored ν."""
    nats, hs = _naturals(spec, params, grads, invs, scal)
    fhs = [g + scal[FWD] * p for g, p in zip(fgrads, fparams, strict=True)] if spec.fallback_wd else list(fgrads)
    flat = torch.cat([n.reshape(-1) for n in nats])
    lo, hi = torch.aminmax(flat)  # a read of F̂⁻¹∇h without isfinite's bool temporary (curvature.guard.all_finite)
    finite = torch.isfinite(lo) & torch.isfinite(hi)
    nlr, nflr = -scal[LR], -scal[FLR]
    vs = [n * nlr for n in nats] + [g * nflr for g in fhs]
    moms = [scal[MOM]] * len(nats) + [scal[FMOM]] * len(fhs)
    measured = vs if spec.clip != "exact" or spec.clip_on == "update" else [
        b * m + v for b, m, v in zip(list(bufs) + list(fbufs), moms, vs, strict=True)]
    nu = None
    if spec.clip == "factored":  # dᵀF̂d: lr²·⟨F̂⁻¹∇h, ∇h⟩ (+ the buffers' terms), plus the fallback's wd·‖d‖²
        nu = scal[LR] * scal[LR] * (flat.to(torch.float64) @ _flat64(hs))
        fd = vs[len(nats):]
        if spec.clip_on == "step":
            nu = nu + _buffer_terms(spec, bufs, hs, invs, curvs, scal)
            fd = [b * scal[FMOM] + v for b, v in zip(fbufs, fd, strict=True)]
        if spec.fallback_wd and fhs:
            nu = nu + scal[FWD] * sum((t.double() * t.double()).sum() for t in fd)
    return finite, vs, measured, nu


def _exact_nu(spec: Spec, g00: torch.Tensor, measured, scal) -> torch.Tensor:
    """ν = vᵀFv (the exact Fisher's Gram entry) + wd·‖v‖² (wd of the KFC group)."""
    if not spec.kfc_wd:
        return g00
    v = _flat64(measured)
    return g00 + scal[WD] * (v @ v)


def _scale(spec: Spec, nu: torch.Tensor, scal) -> torch.Tensor:
    """The clipping scale s = sqrt(C/ν) where ν > C, else 1 (a 0-d fp64 tensor)."""
    return torch.where(nu > scal[CLIP], torch.sqrt(scal[CLIP] / nu), torch.ones_like(nu))


def _guarded_apply(spec: Spec, ok, scale, vs, params, bufs, fparams, fbufs, scal) -> None:
    """P ← μ'p + s·v; θ ← θ + p in place, where ``ok`` (μ' = s·μ with clip_on="step"); unchanged elsewhere."""
    n = len(params)
    for ps, bs, ts, mom in ((params, bufs, vs[:n], scal[MOM]), (fparams, fbufs, vs[n:], scal[FMOM])):
        mom = mom * scale if spec.clip_on == "step" and spec.clip is not None else mom
        for p, b, v in zip(ps, bs, ts, strict=True):
            new = b * mom + v.to(p.dtype) * scale
            b.copy_(torch.where(ok, new, b))
            p.copy_(torch.where(ok, p + new, p))


def _whole(spec: Spec, params, grads, bufs, invs, curvs, fparams, fgrads, fbufs, scal) -> torch.Tensor:
    """The factored-ν (or unclipped) update in one graph; returns [finite F̂⁻¹∇h, ν, s] (fp64)."""
    finite, vs, _, nu = _directions(spec, params, grads, bufs, invs, curvs, fparams, fgrads, fbufs, scal)
    nu = torch.zeros((), dtype=torch.float64) if nu is None else nu
    scale = _scale(spec, nu, scal) if spec.clip is not None else torch.ones((), dtype=torch.float64)
    ok = finite & torch.isfinite(nu)
    _guarded_apply(spec, ok, scale, vs, params, bufs, fparams, fbufs, scal)
    return torch.stack([finite.to(torch.float64), nu, scale])


def _second(spec: Spec, g00, vs, measured, params, bufs, fparams, fbufs, scal) -> torch.Tensor:
    """The exact-ν update after the Fisher products; returns [1, ν, s] (fp64)."""
    nu = _exact_nu(spec, g00, measured, scal)
    scale = _scale(spec, nu, scal)
    _guarded_apply(spec, torch.isfinite(nu), scale, vs, params, bufs, fparams, fbufs, scal)
    return torch.stack([torch.ones_like(nu), nu, scale])


def _eager_apply(spec: Spec, scale: float | None, vs, params, bufs, fparams, fbufs, moms: tuple[float, float]) -> None:
    """``rules.momentum_step_``'s foreach ops on all buffers (Python scalars: the same rounding as there)."""
    n = len(params)
    for ps, bs, ts, mom in ((params, bufs, vs[:n], moms[0]), (fparams, fbufs, vs[n:], moms[1])):
        if not ps:
            continue
        if scale is not None and spec.clip_on == "step":
            mom *= scale
        ts = [v.to(p.dtype) for p, v in zip(ps, ts, strict=True)]
        torch._foreach_mul_(bs, mom)
        torch._foreach_add_(bs, ts, alpha=1.0 if scale is None else scale)
        torch._foreach_add_(ps, bs)


# -- the plan and the step ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Plan:
    """One configuration's spec, its parameters in the update's order, and its compiled functions (lazily)."""

    spec: Spec
    params: list[torch.Tensor]  # KFC parameters: weight, bias, layer by layer
    fparams: list[torch.Tensor]  # the SGD fallback's parameters with a gradient
    buckets: tuple[int, ...]  # the estimator's buckets the spec's are (those with a member that has a gradient)
    compiled: dict | None = None

    def fn(self, name: str, compile_update: bool):
        """``_whole`` / ``_directions`` / ``_second``, compiled once per plan when ``compile_update``."""
        f = {"whole": _whole, "first": _directions, "second": _second}[name]
        if not compile_update:
            return f
        if self.compiled is None:
            self.compiled = {}
        if name not in self.compiled:  # a copy of the function per plan: dynamo's cache (and its recompile limit)
            f = types.FunctionType(f.__code__.replace(), f.__globals__, f.__name__)  # is per code object
            self.compiled[name] = torch.compile(f, fullgraph=True, dynamic=False, backend=BACKEND)
        return self.compiled[name]


class FusedPre:
    """KFC-pre's common path for one optimizer (see the module docstring): plans per configuration, the step."""

    def __init__(self, options: KFCOptions, distributed: bool):
        self.options = options
        self.compile = bool(getattr(options, "compile_update", False))
        why = None
        if options.mode != "pre":
            why = f"mode={options.mode!r}"
        elif distributed:
            why = "distributed KFC"
        elif getattr(options, "adapt_damping", False):  # its Levenberg–Marquardt rule lives on updates.py's path
            why = f"adapt_damping={options.adapt_damping!r}"
        self._off = why
        if why is not None:
            log.debug("fused KFC-pre update not taken: %s (updates.py's path)", why)
        self._plans: dict[tuple, Plan | str] = {}
        self._buckets = None  # the estimator's bucket list the structure below was read from
        self._structure: tuple | None = None

    def step(self, est, kg: dict | None, fg: dict | None, state: MutableMapping, exact_gram, info: dict):
        """Apply KFC-pre's update if this configuration's plan takes it.

        Returns:
            None when not taken (the caller runs ``updates.pre_update``); else "" (applied, or skipped for a
            non-finite ν with ``info["skipped"]`` set) or :data:`NATURAL_FAULT` (nothing changed: skip the step).
        """
        if self._off is not None or kg is None:
            return None
        plan = self._plan(est, kg, fg)
        if plan is None:
            return None
        o = self.options
        sgd = fg if fg is not None and o.fallback == "sgd" else None
        spec = plan.spec
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in plan.params]
        bufs, created = _buffers(plan.params, state)
        fgrads = [p.grad for p in plan.fparams]
        fbufs, fcreated = _buffers(plan.fparams, state)
        invs = [_sides(est.buckets[i].inverse, method) for i, (method, _, _) in zip(plan.buckets, spec.buckets,
                                                                                      strict=True)]
        lr = kg["lr"]
        values = [lr, kg["momentum"], kg["weight_decay"], 0.0 if sgd is None else sgd["lr"],
                  0.0 if sgd is None else sgd["momentum"], 0.0 if sgd is None else sgd["weight_decay"],
                  0.0 if o.clip is None else clip_threshold(o.clip, o.clip_scaling, lr),
                  est.buckets[plan.buckets[0]].inverse.eta]
        scal = torch.tensor(values, dtype=torch.float64)
        products = spec.clip == "factored" and spec.clip_on == "step"  # F̂ itself, for the buffers' pᵀF̂p
        curvs = [product_tensors(est.buckets[i].inverse) if products and method != "solve" else ()
                 for i, (method, _, _) in zip(plan.buckets, spec.buckets, strict=True)]
        args = (plan.params, grads, bufs, invs, curvs, plan.fparams, fgrads, fbufs, scal)
        if spec.clip == "exact":
            finite, vs, measured, _ = plan.fn("first", self.compile)(spec, *args)
            if not bool(finite):
                return _undo(state, created + fcreated, NATURAL_FAULT)
            v = dict(zip(plan.params + plan.fparams, measured, strict=True))
            g00 = exact_gram([v], o.clip_fraction)[0, 0]
            if self.compile:
                out = plan.fn("second", True)(spec, g00, vs, measured, plan.params, bufs, plan.fparams, fbufs, scal)
            else:
                nu = _exact_nu(spec, g00, measured, scal)
                out = torch.stack([torch.ones_like(nu), nu, _scale(spec, nu, scal)])
        elif self.compile:
            out = plan.fn("whole", True)(spec, *args)
        else:
            finite, vs, _, nu = _directions(spec, *args)
            out = torch.stack([finite.to(torch.float64), torch.zeros((), dtype=torch.float64) if nu is None else nu,
                               torch.ones((), dtype=torch.float64) if nu is None else _scale(spec, nu, scal)])
        ok, nu, scale = out.tolist()
        if not ok:
            return _undo(state, created + fcreated, NATURAL_FAULT)
        if o.clip is not None:
            info["nu"] = nu
            if not math.isfinite(nu):
                info["skipped"] = True
                return _undo(state, created + fcreated, "")
            info["clip_scale"] = scale
        if not self.compile:
            clipped = o.clip is not None and nu > values[CLIP]
            _eager_apply(spec, scale if clipped else None, vs, plan.params, bufs, plan.fparams, fbufs,
                         (values[MOM], values[FMOM]))
        return ""

    def _plan(self, est, kg: dict, fg: dict | None) -> Plan | None:
        buckets = est.buckets
        if buckets is not self._buckets:
            self._buckets = buckets
            self._structure = tuple((b.inverse.bucket_key, tuple(b.members), tuple(b.counts)) for b in buckets)
        present = tuple(s.layer.weight.grad is not None or (s.layer.bias is not None and s.layer.bias.grad is not None)
                        for s in est.states)
        o = self.options
        fparams = [p for p in fg["params"] if p.grad is not None] if fg is not None and o.fallback == "sgd" else []
        fwd = bool(fg["weight_decay"]) if fg is not None and o.fallback == "sgd" else False
        layers = tuple(id(s.layer.weight) for s in est.states)  # a live registry may swap a layer for a same-shaped one
        key = (self._structure, present, layers, tuple(id(p) for p in fparams), bool(kg["weight_decay"]), fwd)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._build(est, present, fparams, bool(kg["weight_decay"]), fwd)
            self._plans[key] = plan
            if isinstance(plan, str):
                log.debug("fused KFC-pre update not taken for this configuration: %s (updates.py's path)", plan)
            else:
                log.debug("fused KFC-pre update: %d layers in %d buckets, %d fallback parameters, %s",
                          len(plan.spec.layers), len(plan.spec.buckets), len(fparams),
                          "compiled" if self.compile else "eager")
        return plan if isinstance(plan, Plan) else None

    def _build(self, est, present: tuple, fparams: list, kfc_wd: bool, fallback_wd: bool) -> Plan | str:
        """The plan of this configuration, or why it cannot take it."""
        states = est.states
        if not any(present):
            return "no KFC layer has a gradient"
        position, layers, params = {}, [], []
        for i, (s, has) in enumerate(zip(states, present, strict=True)):
            if not has:
                continue
            lay = s.layer
            if s.inverse is None:
                return f"layer {lay.name!r} has no inverse yet"
            position[i] = len(layers)
            layers.append(LayerSpec(lay.sites[0], lay.weight.shape, None if lay.bias is None else lay.bias.shape,
                                    lay.groups, lay.g_dim, lay.a_dim - (lay.bias is not None)))
            params += [lay.weight] + ([lay.bias] if lay.bias is not None else [])
        if any(hasattr(p, "to_local") for p in params + fparams):
            return "DTensor (sharded) parameters"
        buckets, used = [], []
        for j, b in enumerate(est.buckets):
            dense = bucket_tensors(b)
            if dense is None and self.compile:  # its product gathers a data-dependent live block, or tiles
                return f"layer {states[b.members[0]].layer.name!r} has a live-block or blocked inverse"
            dense = dense or ("solve", ())  # eager: the inverse's own solve, as apply_buckets calls it
            members = [position.get(i) for i in b.members]
            if any(m is None for m in members):
                if all(m is None for m in members):
                    continue
                return "a bucket has members without a gradient"
            buckets.append((dense[0], tuple(members), tuple(b.counts)))
            used.append(j)
        if len({est.buckets[j].inverse.eta for j in used}) > 1:
            return "buckets with different η"
        covered = {m for _, members, _ in buckets for m in members}
        if covered != set(range(len(layers))):
            return "a layer with a gradient is in no bucket"
        o = self.options
        clip = None if o.clip is None else o.clip_curvature
        spec = Spec(tuple(layers), tuple(buckets), kfc_wd, fallback_wd, clip, o.clip_on)
        return Plan(spec, params, list(fparams), tuple(used))


def _sides(inv, method: str) -> tuple[torch.Tensor, ...]:
    """The tensors of a dense bucket's inverse (``precondition.bucket_tensors`` without its checks, per step)."""
    if method == "solve":
        return (inv,)
    return (inv.Ginv, inv.Ainv) if method == "factored" else (inv.QG, inv.lG, inv.QA, inv.lA)


def _buffers(params: list[torch.Tensor], state: MutableMapping) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The momentum buffers of ``params``, zeros created where there is none yet (μ·0 + s·v = s·v exactly)."""
    bufs, created = [], []
    for p in params:
        st = state[p]
        b = st.get("momentum_buffer")
        if b is None:
            b = st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            created.append(p)
        bufs.append(b)
    return bufs, created


def _undo(state: MutableMapping, created: list[torch.Tensor], result: str) -> str:
    """A skipped step leaves no state behind: the buffers created for it are removed."""
    for p in created:
        del state[p]["momentum_buffer"]
    return result
