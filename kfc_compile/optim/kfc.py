"""``kc.KFC``: KFC-pre and adaptive K-FAC as a ``torch.optim.Optimizer`` for plain training loops.

A training step is the usual ``loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()``. On statistics steps
the optimizer arms the model's capture taps before the forward, and the taps record Ω and Γ during the backward
(``fisher=`` says which backward feeds Γ: docs/algorithm.md §3; ``stats_fraction`` the examples: §4.3).
``step()`` folds the batch factors into the moving averages, refreshes the damped inverses and preconditions every
KFC layer (``curvature/estimator.py``), then applies the update of ``mode="pre"`` (KFC-pre with a trust region on
the applied step, §6.2) or ``mode="adaptive"`` (α/μ rescaling and Levenberg–Marquardt damping, §5.4 and §6.1) through
``updates.py`` / ``rules.py``. ∇h is ``.grad + weight_decay·θ``; parameters outside KFC are updated by the
fallback (§6.3). Faults (``safety.py``, ``curvature/guard.py``, counted in ``opt.health``) skip a step before
anything of it is kept (§5.7).
"""
from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from kfc_compile.curvature.distributed import setup as setup_distributed
from kfc_compile.curvature.estimator import CurvatureEstimator, LayerState
from kfc_compile.curvature.factors import Factors
from kfc_compile.curvature.health import Health
from kfc_compile.frontend.dynamo.registry import CompiledKFCInfo
from kfc_compile.optim import checkpoint, dcp_state, fvp, resume
from kfc_compile.optim.checkpoint import check_kfc_state, kfc_state, restore_layer_state, restore_run_state
from kfc_compile.optim.fused_update import NATURAL_FAULT, FusedPre
from kfc_compile.optim.groups import find_group, hyper_parameters, initial_groups, regroup
from kfc_compile.optim.model import (
    check_coverage,
    resolve_model,
    restore_routing,
    route,
    routing_snapshot,
    warn_if_uncovered,
)
from kfc_compile.optim.options import KFCOptions, model_curvature
from kfc_compile.optim.pre_damping import pre_lm_update
from kfc_compile.optim.rules import average_iterates_, swapped_in
from kfc_compile.optim.safety import BufferSnapshot, StepGuard
from kfc_compile.optim.scalars import all_finite_
from kfc_compile.optim.updates import adam_update, adaptive_lm_update, group_parts
from kfc_compile.registry import KFCInfo, KFCLayer


class KFC(torch.optim.Optimizer):
    """KFC / K-FAC natural-gradient optimizer (KFC-pre or adaptive) with a fallback for uncovered parameters.

    Args:
        model: a plain ``nn.Module`` (transformed here; its forward is routed through the instrumented graph in
            place, so ``model(x)`` keeps working and feeds the statistics) or a ``kc.transform``ed module.
        lr: learning rate (``mode="adaptive"``: a multiplier on the α/μ-rescaled update, 1 for K-FAC proper).
        momentum: μ of KFC-pre (``p ← μp + v``); in adaptive mode 0 disables the μ direction.
        damping: γ (the identity weight of the curvature, added to the weight decay): factored strength
            sqrt(damping + weight_decay) split by π, or added to the eigenvalue products with
            ``damping_method="eigen"``; 0 gives exact inverses (an error if a factor is singular). In adaptive
            mode this is the Levenberg–Marquardt λ and it is adapted (``param_groups[0]["damping"]``).
        weight_decay: ℓ2 coefficient: added to the gradient, folded into the damping and into ν.
        stats_every, inverse_every: statistics / inverse periods T_s, T_f (inverses also at steps 1–3).
        warmup: the first ``warmup`` steps all collect statistics and recompute inverses (a warm start, §4.3).
        adapt_damping: Levenberg–Marquardt on ``damping`` (KFC-pre, exact ν) when ``step()`` gets a closure
            (``"auto"``; ``True``: warn without one; ``False``, default: fixed), docs/algorithm.md §5.5.
        stat_decay: the moving-average cap: ε = min(1 − 1/k, stat_decay).
        stats_fraction: share of the batch (its first ⌈fraction·N⌉ examples, at least 2) that feeds the factor
            statistics (K-FAC's τ₁); None: 1/8, at least 16 examples (§4.3); 1: the whole batch, in the user's pass.
        fisher: ``"mc"`` (sampled targets), ``"empirical"`` or ``"type-2"``.
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"`` or the matching ``nn`` loss instance (its
            reduction says whether the objective is a batch mean or sum; a sum scales the curvature by N).
        approx, mode: ``"expand"`` (KFC) or ``"reduce"``; ``"pre"`` or ``"adaptive"``.
        clip: KFC-pre's trust-region constant: ``"auto"`` (default) 0.2 for the factored ν of the step, 30 for the
            exact ν (``options.CLIP_DEFAULTS``); a float: that; ``None``: no clipping. The paper's is 0.3 fixed.
        clip_scaling, clip_on: the bound ν ≤ clip·lr (``"lr"``) or ν ≤ clip (``"fixed"``), and what ν measures:
            ``"step"`` (``"auto"``) the applied μp + v, ``"update"`` v alone (the paper), docs/algorithm.md §6.2.
        compile_update: KFC-pre's update (preconditioning, ν, clipping, momentum) under ``torch.compile`` (inductor;
            2–8 s of compilation per configuration on CPU, ``optim/fused_update.py``); False: the same, fused eager.
        averaging: iterate-averaging timescale τ in steps (``None``: off); see :meth:`swap_averaged`.
        damping_method: ``"factored"`` or ``"eigen"``.
        fallback: ``"sgd"``, ``"adam"`` or ``None`` (uncovered parameters are then not trained).
        mc_samples: sampled targets per example for ``fisher="mc"``.
        generator: ``torch.Generator`` for the MC targets (its state is part of ``state_dict``); default: the
            global RNG (save ``torch.get_rng_state()`` yourself for bit-identical resumes).
        clip_fraction: share of the batch (its first examples) for the exact Fisher products; None: 1/4, at least 32.
        clip_curvature: ``"factored"`` (the damped F̂ itself: no extra pass), ``"exact"`` (the paper: Fisher-vector
            products on ``clip_fraction`` of the batch) or ``"auto"``: factored, exact with ``adapt_damping``,
            distributed KFC (DDP, FSDP2) or ``mode="adaptive"``.
        fallback_lr: learning rate of the fallback group (default: ``lr`` for SGD, 1e-3 for Adam).
        fallback_betas, fallback_eps: Adam's hyper-parameters.
        lm_interval, lm_decay, min_damping: Levenberg–Marquardt period T1, factor ω₁ and floor for λ.
        max_factor_dim: a factor (Ω or Γ, per group) wider than this is kept as ceil(d / max_factor_dim)
            equal diagonal blocks (``curvature/blocks.py``: d·b memory, d·b² inversion instead of d², d³; e.g.
            VGG's 25089-wide Ω); ``None``: always dense.
        max_failures: consecutive failed decompositions (fp32 and fp64) of one layer that raise a
            ``DecompositionError`` (``None``: never); until then the layer keeps its previous inverse.
        max_skipped_steps: consecutive skipped steps (non-finite loss, gradient or update) that raise
            ``TrainingDivergedError`` (``None``: never).
        memory_budget: bytes the curvature may take at its peak (``kc.report`` lists each layer's share): layers
            then get smaller diagonal blocks until it fits, with a warning naming them, or construction fails with
            ``MemoryBudgetError`` (``None``: no limit).
        grad_scaler: the ``torch.amp.GradScaler`` whose ``scaler.step(opt)`` calls ``step()``; needed only when
            ``scaler.unscale_(opt)`` runs before it with ``fisher="empirical"`` (``scaler.step`` hands KFC the
            scale and the inf flag itself).
        frontend: how a plain module is instrumented: ``"auto"`` (the torch.fx pass where it traces the whole
            forward the same way in train and eval mode, dynamo capture otherwise), ``"fx"`` or ``"dynamo"``
            (see ``kc.transform``).
        output: which tensor of the model's output feeds the Fisher (``lambda out: out.logits``); default: the
            output itself, its ``.logits`` / ``["logits"]``, or the first tensor of a tuple with a batch dim.
        distributed: ``None`` (on for a DDP model), ``True`` / ``"broadcast"`` (each layer's inverse computed by one
            rank and gathered by all), ``"replicate"`` (every rank computes all) or ``False``; see
            ``curvature/distributed.py``. Every rank calls ``step()`` (and ``precondition()``) together.

    ``opt.options`` holds the validated arguments, ``opt.layer_state(name)`` / ``opt.layer_states()`` what is kept
    per KFC layer (factors, inverse, flags), ``opt.last_step`` the scalars of the last step (ν, clip scale, α, μ,
    ρ, damping ...; ``skipped`` and ``cause`` on a skipped step), ``opt.health`` the fault record
    (``curvature/health.py``).
    """

    _step_supports_amp_scaling = True  # scaler.step(opt) always calls step() with grad_scale and found_inf

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9, damping: float = 1e-3,
                 weight_decay: float = 0.0, stats_every: int = 1, inverse_every: int = 20, stat_decay: float = 0.95,
                 stats_fraction: float | None = None,
                 fisher: str = "mc", loss="cross_entropy", approx: str = "expand", mode: str = "pre",
                 clip: float | str | None = "auto", averaging: float | None = None, damping_method: str = "factored",
                 fallback: str | None = "sgd", mc_samples: int = 1, generator: torch.Generator | None = None,
                 clip_fraction: float | None = None, clip_curvature: str = "auto", fallback_lr: float | None = None,
                 fallback_betas: tuple[float, float] = (0.9, 0.999), fallback_eps: float = 1e-8,
                 lm_interval: int = 5, lm_decay: float = (19 / 20) ** 5, min_damping: float = 1e-8,
                 max_factor_dim: int | None = 8192, max_failures: int | None = 3, max_skipped_steps: int | None = 5,
                 memory_budget: int | None = None, grad_scaler: torch.amp.GradScaler | None = None,
                 frontend: str = "auto", output=None, distributed: bool | str | None = None,
                 clip_scaling: str = "lr", clip_on: str = "auto", compile_update: bool = False, warmup: int = 0,
                 adapt_damping: bool | str = False):
        self.options = KFCOptions(
            lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay, stats_every=stats_every,
            inverse_every=inverse_every, stat_decay=stat_decay, stats_fraction=stats_fraction, fisher=fisher,
            loss=loss, approx=approx, mode=mode, clip=clip, averaging=averaging, damping_method=damping_method,
            fallback=fallback, mc_samples=mc_samples, generator=generator, clip_fraction=clip_fraction,
            clip_curvature=model_curvature(model, clip_curvature, clip_on, clip, mode), fallback_lr=fallback_lr,
            fallback_betas=fallback_betas, fallback_eps=fallback_eps, lm_interval=lm_interval, lm_decay=lm_decay,
            min_damping=min_damping, max_factor_dim=max_factor_dim, max_failures=max_failures,
            max_skipped_steps=max_skipped_steps, memory_budget=memory_budget, grad_scaler=grad_scaler,
            frontend=frontend, output=output, distributed=distributed, clip_scaling=clip_scaling, clip_on=clip_on,
            compile_update=compile_update, warmup=warmup, adapt_damping=adapt_damping)
        saved = routing_snapshot(model)
        try:
            self._setup(model)
        except BaseException:  # never leave the user's model half-instrumented
            restore_routing(model, saved)
            raise

    def _setup(self, model: nn.Module) -> None:
        o = self.options
        tm, owner, needs_route = resolve_model(model, o.approx, o.frontend)
        info: KFCInfo = tm.kfc
        self.model = tm
        self._dist = setup_distributed(model, o, info.layers, getattr(info, "version", None) is not None)
        pending = check_coverage(owner, info, o.fallback)
        if needs_route:
            route(owner, tm)
        compiled = isinstance(info, CompiledKFCInfo)  # torch.compile(backend="kfc"), or dynamo capture
        info.state.output_fn = o.output
        self._warned: set[str] = set()  # once-only warnings given (shared with the estimator; saved in state_dict)
        self.health = Health()
        self._guard = StepGuard(o, self.health, self._warned)
        self._estimator = CurvatureEstimator(
            tm, compiled=compiled, loss=o.loss, fisher=o.fisher, mc_samples=o.mc_samples, generator=o.generator,
            stats_every=o.stats_every, inverse_every=o.inverse_every, stat_decay=o.stat_decay,
            stats_fraction=o.stats_fraction, damping_method=o.damping_method, max_factor_dim=o.max_factor_dim,
            warned=self._warned, health=self.health, max_failures=o.max_failures, memory_budget=o.memory_budget,
            distributed=self._dist, warmup=o.warmup)
        # the exact Fisher products' Gram matrix on the step's recorded calls (updates.GramFn)
        self._exact_gram = fvp.ExactGram(fvp.FisherProducts((info.eager or owner) if compiled else tm, o.loss,
                                                            o.output), self._estimator, self._warned,
                                       self._dist)
        self._fused = FusedPre(o, self._dist is not None)  # KFC-pre's common path as one function (fused_update.py)

        groups, self.fallback_names = initial_groups(self.layers, owner, o, pending)
        self._init_done = False
        super().__init__(groups, hyper_parameters(o))
        self._init_done = True

        self._step_count = 0
        self._owner = owner
        self._buffers = BufferSnapshot(owner)
        self._owner_params = list(owner.parameters())
        self.last_step: dict = {}
        self._pending_state: dict | None = None  # a state_dict loaded before the kfc backend compiled any layer
        if o.averaging is not None:
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["average"] = p.detach().clone()
        self._estimator.schedule(1)

    # -- public helpers ------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """Refused after construction: KFC builds its groups itself (KFC layers and the fallback)."""
        if getattr(self, "_init_done", False):
            raise NotImplementedError("KFC manages its parameter groups itself (KFC layers and the fallback)")
        super().add_param_group(param_group)

    @property
    def steps(self) -> int:
        """Number of completed ``step()`` calls."""
        return self._step_count

    @property
    def layers(self) -> list[KFCLayer]:
        """The KFC layers, in the order of :meth:`layer_states`."""
        return [s.layer for s in self._estimator.states]

    def layer_state(self, name: str) -> LayerState:
        """What is kept for the KFC layer ``name`` (read-only use: its layout, moving averages, inverse, flags).

        Raises:
            KeyError: no KFC layer has that name.
        """
        self._sync_layers()
        return self._estimator.layer_state(name)

    def layer_states(self) -> list[LayerState]:
        """What is kept for every KFC layer, in the order of :attr:`layers` (read-only use)."""
        self._sync_layers()
        return list(self._estimator.states)

    def curvature_nbytes(self) -> int:
        """Bytes of the curvature held for all KFC layers: moving averages (Ω, Γ) plus damped inverses."""
        return sum(s.nbytes() for s in self.layer_states())

    def factors(self, name: str) -> Factors | None:
        """Current moving averages (Ω, Γ) of a layer; None before any statistics.

        2-D, or stacked per group; with ``max_factor_dim`` blocks, the dense block-diagonal matrices they stand for.
        Under DDP (``distributed`` broadcast / replicate) a collective: every rank calls it (``Distributed.settle``).
        """
        if self._dist is not None:  # the ranks' locally folded factors become their mean first
            self._dist.settle(self._estimator.states)
        return self.layer_state(name).dense_factors()

    def set_factors(self, name: str, A: torch.Tensor, G: torch.Tensor, frozen: bool = False) -> None:
        """Replace a layer's factors (e.g. an estimate on the full data set before training, KFC-S Alg. 1).

        Later statistics keep averaging into them unless ``frozen``, which stops collecting for this layer.
        The inverses are recomputed at the next step. A layer with block-diagonal factors (``max_factor_dim``)
        keeps only the diagonal blocks of the given dense factors.
        """
        self.layer_state(name).replace_factors(A, G, frozen)
        self._estimator.schedule(self._step_count + 1)

    def precondition(self, grads: dict | None = None) -> dict[torch.Tensor, torch.Tensor]:
        """F̂⁻¹∇h for the KFC parameters with the current inverses.

        ∇h is ``.grad`` + weight_decay·θ by default, or from ``grads[param]``. Layers without factors yet are
        returned unpreconditioned.
        """
        self._sync_layers()
        group = self._kfc_group()
        if group is None:
            return {}
        self._estimator.refresh_inverses(None, group["damping"] + group["weight_decay"])
        return self._estimator.precondition(group["weight_decay"], grads)

    def averaged_parameters(self) -> list[torch.Tensor]:
        """The averaged iterates θ̄, in the order of ``[p for g in param_groups for p in g["params"]]``."""
        if self.options.averaging is None:
            raise RuntimeError("iterate averaging is off: construct KFC with averaging=tau")
        return [self.state[p]["average"] for g in self.param_groups for p in g["params"]]

    def swap_averaged(self) -> contextlib.AbstractContextManager[None]:
        """Inside the ``with`` block the parameters hold the averaged iterates θ̄ (e.g. for evaluation)."""
        params = [p for g in self.param_groups for p in g["params"]]
        return swapped_in(params, self.averaged_parameters())

    # -- parameter groups ----------------------------------------------------------------------------------------
    def _kfc_group(self) -> dict | None:
        return find_group(self.param_groups, "kfc")

    def _fallback_group(self) -> dict | None:
        return find_group(self.param_groups, "fallback")

    def _sync_layers(self) -> None:
        """Follow a live registry (kfc backend): new layers join the KFC group, dropped ones leave it.

        Their parameters move between the KFC and fallback groups; per-layer state follows its layer.
        """
        if self._estimator.sync():
            names = regroup(self.param_groups, self.defaults, self.layers, self._owner_params, self._owner)
            if names is not None:
                self.fallback_names = names
        warn_if_uncovered(self._owner, self.model.kfc, self.layers, self.options.fallback, self._warned)
        if self._pending_state is not None and self._estimator.states:
            self._load_layers(self._pending_state)  # a mismatch raises, and the state keeps waiting
            self._pending_state = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim``'s ``zero_grad``; the forwards since the last step stop being micro-batches of the next."""
        super().zero_grad(set_to_none)
        self._estimator.discard_micro_batches()

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (see the module docstring).

        ``closure`` (optional) re-evaluates the loss, calls ``backward()`` and returns the loss; adaptive mode calls
        it a second time after the update on Levenberg–Marquardt steps (``.grad`` then holds the gradient at the
        new point).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self._step_count + 1
        est, o = self._estimator, self.options
        self._sync_layers()
        resume.require_applied(self._pending_state)
        kg, fg = self._kfc_group(), self._fallback_group()
        est.loss_scale = self._guard.loss_scale(self, o.fisher == "empirical" and est.capturing_in_pass)
        fault = self._guard.check(self, loss, est.loss_scale)
        if fault is not None:
            return self._skip(k, *fault, loss)
        est.update_statistics()
        info: dict = {"step": k}
        if kg is not None:
            est.refresh_inverses(k, kg["damping"] + kg["weight_decay"])
        fused = self._fused.step(est, kg, fg, self.state, self._exact_gram, info)  # None: not taken
        nat = est.precondition(kg["weight_decay"]) if kg is not None and fused is None else {}
        if fused == NATURAL_FAULT or nat and not all_finite_(list(nat.values())):
            return self._skip(k, "update", NATURAL_FAULT, loss)
        parts = group_parts(kg, fg if o.fallback == "sgd" else None, nat) if fused is None else []
        if any(part.params for part in parts):
            if o.mode == "pre":
                pre_lm_update(parts, self.state, o, self._exact_gram, info, loss, closure, k, self._warned,
                              self.param_groups, self._dist)
            else:
                adaptive_lm_update(parts, self.state, o, self._exact_gram, info, loss, closure, k,
                                   self._warned, self.param_groups, self._dist)
        if info.get("skipped"):
            what = f"the clipping statistic ν is {info.get('nu')}" if o.mode == "pre" else "the α/μ model is not finite"
            return self._skip(k, "update", what, loss, info)
        if fg is not None and o.fallback == "adam":
            adam_update(fg, self.state)
        if o.averaging is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            average_iterates_([self.state[p]["average"] for p in params], params, o.averaging)
        self._step_count = k
        self.last_step = info
        self.health.step_applied((kg or fg or {}).get("damping", o.damping))
        self._buffers.take()
        est.end_step(k)
        return loss

    def _skip(self, k: int, cause: str, detail: str, loss, info: dict | None = None):
        """Leave step k unapplied (see ``safety.py``): its statistics are dropped and the taps re-armed for step k."""
        info = {**(info or {}), "step": k, "skipped": True, "cause": cause}
        if self.options.clip is not None and self.options.mode == "pre":
            info.setdefault("nu", math.nan)  # no ν was computed: undefined
        self.last_step = info
        self._estimator.discard()
        self._estimator.discard_micro_batches()  # the skipped step's forwards are not micro-batches of the next
        self._estimator.schedule(k)
        for name in self._buffers.restore_non_finite():
            self.health.buffer_restored(name)
        self._guard.skipped(k, cause, detail, self._kfc_group() or self._fallback_group())
        return loss

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``torch.optim`` state plus ``"kfc"``: the curvature, the health record, the RNG (``checkpoint.py``).

        Distributed: a collective, like ``ZeroRedundancyOptimizer.consolidate_state_dict``: every rank calls it
        (the pending factor average, ``Distributed.settle``; the owners' layers, FSDP2's DTensors gathered), and
        rank 0 writes the result.
        """
        if self._pending_state is not None:  # loaded, not applied yet: nothing changed since
            return copy.deepcopy(self._pending_state)
        if self._dist is not None:  # the checkpoint holds the ranks' mean factors: a resume is exact
            self._dist.settle(self._estimator.states)
        sd = checkpoint.whole_state(super().state_dict())  # FSDP2: DTensors gathered (a collective)
        sd["kfc"] = kfc_state(self._estimator, self.options, self.health, self._step_count, self._warned,
                              self.options.approx, self._dist)
        return sd

    def distributed_state_dict(self) -> dict:
        """The state as ``torch.distributed.checkpoint`` saves it and, from a fresh optimizer, its load template.

        Flat keys; this rank's own layers and DTensor shards only (``dcp_state.py``). Every rank calls it.
        """
        return dcp_state.distributed_state(self)

    def load_distributed_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`distributed_state_dict` template filled by ``dcp.load`` (checked as ``load_state_dict``)."""
        dcp_state.load_distributed_state(self, state_dict)

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` of a KFC with the same layers and structural options.

        Into a kfc-compiled model with no layer yet, the per-layer part waits for them (applied at the next layer
        sync, before the step uses them; ``resume.py``); the step count, RNG and health record are restored at once.

        Raises:
            ValueError: another layer set, ``approx``, ``damping_method`` or factor layout (nothing is loaded).
        """
        kfc = state_dict.get("kfc")
        est = self._estimator
        waits = bool(kfc is not None and est.live and not est.states and kfc.get("layers"))
        check_kfc_state(kfc, est, self.options, self.options.approx, layers=not waits)
        if waits:
            self._pending_state = state_dict
        else:
            self._load_layers(state_dict)
        self._step_count = restore_run_state(kfc, self.options, self.health, self._warned, self._dist)
        est.schedule(self._step_count + 1)

    def _load_layers(self, state_dict: dict) -> None:
        check_kfc_state(state_dict["kfc"], self._estimator, self.options, self.options.approx)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "kfc"})
        checkpoint.reshard_state(self.state)
        restore_layer_state(state_dict["kfc"], self._estimator)
