"""The curvature estimator below ``kc.KFC``: per-layer factor state, and statistics → factors → inverses → F̂⁻¹∇h.

One :class:`~kfc_compile.curvature.layer_state.LayerState` per KFC layer holds everything the optimizer keeps for
it (its factor layout, the moving averages of Ω and Γ, the damped inverse, the frozen / stale flags). The
:class:`CurvatureEstimator` owns the list and drives the capture taps (``capture.CaptureState``, through its
driver methods only):

* statistics schedule (``schedule.py``): step k collects statistics when k ≤ warmup or (k−1) % stats_every == 0
  and some layer is not frozen; the
  taps are armed before that step's forward (statistics in the user's backward), or, with a subset
  (``stats_fraction < 1``, MC / type-2 Fisher, eager model), a separate forward of the batch's leading subset
  and its sampled-target backward(s) run at ``update_statistics()``;
* gradient accumulation: a step's batch is all its micro-batches (forwards since the last step or ``zero_grad``);
* moving averages: F ← εF + (1 − ε)F_batch, ε = min(1 − 1/k, stat_decay) (the subset pass averages Ω in the
  kernels' epilogue; in-pass Ω is summed over the micro-batches first and averaged in by ``update_statistics()``,
  so a step skipped after the user's backward leaves the averages untouched);
* inverses: recomputed at steps 1–max(3, warmup), every ``inverse_every`` steps and for new / replaced factors,
  rescaled when the damping or the curvature scale changes; non-finite factors are not inverted (the layer's
  averages restart at its next statistics step and it keeps its last inverse), failed decompositions are retried
  in fp64 and then leave the layer its previous inverse (``guard.py``);
* faults: a layer's batch statistics with non-finite entries are dropped, not averaged in, and so are all of a
  step's when the model output is not finite; ``discard()`` throws away a skipped step's statistics; everything
  is counted in the shared :class:`~kfc_compile.curvature.health.Health` record;
* a live registry (``torch.compile(m, backend="kfc")``): layers appear and disappear as dynamo compiles graphs, and
  each layer's state follows it.
"""
from __future__ import annotations

import warnings
import weakref

import torch
from torch import nn

from kfc_compile.curvature.distributed import Distributed
from kfc_compile.curvature.factors import Factors
from kfc_compile.curvature.guard import finite_flags, refresh_layer, restart_factors
from kfc_compile.curvature.health import Health
from kfc_compile.curvature.labels import LabelSource
from kfc_compile.curvature.layer_state import LayerState, fold_into
from kfc_compile.curvature.layouts import LayoutPlan, weak_blocks
from kfc_compile.curvature.losses import Loss, NonFiniteOutputError, output_gradients
from kfc_compile.curvature.precondition import apply_buckets, build_buckets, grad_matrix, split_matrix
from kfc_compile.curvature.schedule import inverses_due, statistics_due
from kfc_compile.curvature.sharding import LocalInverses
from kfc_compile.curvature.subset import forward_with_private_buffers, leading_subset
from kfc_compile.registry import KFCLayer
from kfc_compile.runtime.calls import RecordedCall
from kfc_compile.runtime.state import CaptureState

__all__ = ["CurvatureEstimator", "LayerState"]


class CurvatureEstimator:
    """The Kronecker-factored curvature F̂ of a transformed model's KFC layers (see the module docstring).

    Args:
        model: the module that runs the forward (transformed, or compiled with the kfc backend); ``model.kfc`` is
            its registry, whose ``state`` is the capture state.
        compiled: ``model`` is compiled with the kfc backend (statistics stay in the user's pass).
        loss: the loss's Fisher model.
        fisher: ``"mc"``, ``"empirical"`` or ``"type-2"``.
        mc_samples, generator: sampled targets per example and their RNG (``fisher="mc"``).
        stats_every, inverse_every, warmup, stat_decay, stats_fraction: the statistics and inverse schedule.
        damping_method: ``"factored"`` or ``"eigen"``.
        max_factor_dim: factors wider than this are stored as diagonal blocks (None: dense).
        warned: once-only warnings already given (shared with the optimizer, part of its state).
        health: the fault record (shared with the optimizer, part of its state).
        max_failures: consecutive failed decompositions of a layer that raise (None: never).
        memory_budget: bytes the curvature may take (``memory.plan_layouts``: smaller blocks for the widest
            layers when it would not fit); None: no limit.
        distributed: what the ranks of a distributed run share (``curvature/distributed.py``); None: one process.
    """

    def __init__(self, model: nn.Module, *, compiled: bool, loss: Loss, fisher: str,
                 mc_samples: int, generator: torch.Generator | None, stats_every: int, inverse_every: int,
                 stat_decay: float, stats_fraction: float, damping_method: str, max_factor_dim: int | None,
                 warned: set[str], health: Health | None = None, max_failures: int | None = None,
                 memory_budget: int | None = None, distributed: Distributed | None = None, warmup: int = 0):
        self.model = model
        self.loss = loss
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.generator = generator
        self.stats_every = stats_every
        self.inverse_every = inverse_every
        self.warmup = warmup
        self.stat_decay = stat_decay
        self.stats_fraction = stats_fraction
        self.damping_method = damping_method
        self.max_factor_dim = max_factor_dim
        self.warned = warned
        self.health = health if health is not None else Health()
        self.max_failures = max_failures
        self.memory_budget = memory_budget
        self.loss_scale = 1.0  # the user's backward was of loss·loss_scale (a GradScaler): in-pass Γ is unscaled
        self._output_failed = False  # the Fisher pass of the user's backward found a non-finite output
        self.distributed = distributed  # distributed KFC: hooks: _fold, refresh_inverses, schedule, scale, _ema_targets
        self._inverses = LocalInverses() if distributed is None else distributed.inverses
        self._owner = None if distributed is None else distributed.owner  # owner preconditioning (owner.py)
        info = model.kfc
        self.capture: CaptureState = info.state
        self.labels = LabelSource.of(model, loss)  # visible labels → term masks (ignore_index positions)
        self.capture.mask_fn = self.labels.mask
        self._version = getattr(info, "version", None)  # a live registry (kfc backend): see sync()
        self.layouts = LayoutPlan(info.layers, max_factor_dim, memory_budget, damping_method, warned)
        self._block_layout = weak_blocks(weakref.ref(self), max_factor_dim)  # asked by the capture state
        self.states = [LayerState(layer, self.layouts.layout_of(layer)) for layer in info.layers]
        # statistics on a subset: a separate forward of the subset where possible, else the subset's rows
        self._separate_pass = stats_fraction < 1.0 and fisher in ("mc", "type-2") and not compiled
        self.capture.set_stats_fraction(None if stats_fraction == 1.0 or self._separate_pass else stats_fraction)
        self._stats_due = False
        self._armed = False
        self._buckets = None
        self.scale = 1.0  # curvature of the objective = scale · F̂ (N for a sum over the batch, 1 for a mean)

    # -- layers --------------------------------------------------------------------------------------------------
    @property
    def capturing_in_pass(self) -> bool:
        """The taps are armed: the user's forward and backward of this step record statistics."""
        return self._armed

    @property
    def live(self) -> bool:
        """The layers come from a live registry (kfc backend) that changes as dynamo compiles graphs."""
        return self._version is not None

    def layer_state(self, name: str) -> LayerState:
        """The state of the layer called ``name`` (``KeyError`` listing the layers if there is none)."""
        for s in self.states:
            if s.layer.name == name:
                return s
        raise KeyError(f"no KFC layer named {name!r}; layers: {[s.layer.name for s in self.states]}")

    def sync(self) -> bool:
        """Follow a live registry; returns whether the layer list changed.

        Layers found since the last call get a fresh state, layers dropped lose theirs, the others keep theirs.
        """
        info = self.model.kfc
        version = getattr(info, "version", None)
        if version is None or version == self._version:
            return False
        self._version = version
        old = {id(s.layer): s for s in self.states}
        kept = {s.layer.name: s.layout for s in self.states if id(s.layer) in {id(la) for la in info.layers}}
        self.layouts.replan(info.layers, kept)
        states = []
        for layer in info.layers:
            s = old.get(id(layer))
            if s is None:
                s = LayerState(layer, self.layouts.layout_of(layer))
            else:
                s.layout = self.layouts.layout_of(layer)
            states.append(s)
        self.states = states
        self._buckets = None
        if self.distributed is not None:  # DDP of a kfc-compiled module: every rank compiled the same layers
            self.distributed.check_layers(info.layers)
        return True

    def blocks_of(self, layer: KFCLayer) -> tuple[int, int]:
        """(Ω blocks, Γ blocks) a layer's statistics are recorded in (``LayoutPlan.blocks_of``).

        A layer of a live registry may have joined since the pass was prepared; :meth:`sync` (in ``step()``, which
        also updates the parameter groups) then keeps the layout its statistics got.
        """
        return self.layouts.blocks_of(layer, self.model.kfc.layers, ((s.layer.name, s.layout) for s in self.states))

    # -- statistics ----------------------------------------------------------------------------------------------
    def schedule(self, k: int) -> None:
        """Arm the capture taps for the forward of step k if it is a statistics step, else disarm them."""
        st = self.capture
        if self.distributed is not None:  # this rank's MC stream for step k
            self.generator = self.distributed.mc_generator(k)
        layers_pending = self.live and not self.states  # kfc backend, nothing compiled yet
        due = statistics_due(k, self.stats_every, self.warmup) and (any(not s.frozen for s in self.states)
                                                                    or layers_pending)
        self._stats_due = due and self._separate_pass
        if not due or self._separate_pass:
            if self._armed:
                st.disarm()
            self._armed = False
            return
        # no moving average in the kernel epilogue: the step may still be skipped after the user's backward
        st.prepare_pass({}, self._block_layout)
        self._output_failed = False
        fisher_pass = self._fisher_pass if self.fisher in ("mc", "type-2") else None
        st.arm(inputs=True, grads=self.fisher == "empirical", batch_mean=self.loss.reduction == "mean",
               fisher_pass=fisher_pass)
        self._armed = True

    def update_statistics(self) -> None:
        """Fold this step's statistics into the moving averages and set the curvature scale.

        Called after the step's forward and backward: the statistics are those recorded in them or, when due, those
        of a separate pass over the batch's leading subset; the scale comes from the recorded batch.
        """
        self._collect()
        if self._stats_due:
            self._statistics_pass()
            self._stats_due = False
        n = sum(c.batch_size() or 0 for c in self.capture.recorded_calls())
        self.scale = 1.0 if self.loss.reduction == "mean" else float(max(n, 1))
        if self.distributed is not None:
            self.scale = self.distributed.curvature_scale(self.scale, self.loss.reduction)

    def end_step(self, k: int) -> None:
        """Step k is done: forget its recorded calls and arm the taps for step k + 1 if due."""
        self.capture.clear_calls()
        self.schedule(k + 1)

    def discard_micro_batches(self) -> None:
        """Forget the forwards recorded since the last step (``zero_grad``: their gradients are gone too)."""
        self.capture.clear_calls()
        self.capture.discard_statistics()

    def _fisher_pass(self, f: torch.Tensor) -> None:
        """Γ from sampled-target (or type-2) backwards, run at the start of the user's backward."""
        # retain_graph through a kfc-backend graph: it is compiled without AOT donated buffers, and AOT's runtime
        # check reads the same flag (frontend/dynamo/backend.py)
        with torch._functorch.config.patch(donated_buffer=False):
            try:
                for v in output_gradients(self.loss, self.fisher, f, None, self.mc_samples, self.generator,
                                          self.capture.term_mask):
                    self.capture.record_backward(f, v, inputs=False)
            except NonFiniteOutputError:  # never out of the user's backward: this step's statistics are dropped
                self._output_failed = True

    def _collect(self) -> None:
        """Fold the statistics recorded in the user's pass into the moving averages."""
        if not self._armed:
            return
        batch = self.capture.finish_armed_step()
        self._armed = False
        if self._output_failed:
            self._dropped_all("the model output is not finite")
            self._fold({})  # distributed: this rank still joins the factor exchange
            return
        if self.fisher == "empirical" and self.loss_scale != 1.0:  # Γ of a GradScaler's scaled backward
            for f in batch.values():
                f.G.div_(self.loss_scale ** 2)
        self._fold(batch)

    def discard(self) -> None:
        """Throw away the statistics recorded for a step that is skipped (nothing of it is averaged in)."""
        if self._armed:
            self.capture.finish_armed_step()
            self._armed = False
        self._stats_due = False

    def _dropped_all(self, why: str) -> None:
        for s in self.states:
            if not s.frozen:
                self.health.statistics_dropped(s.layer.name, why)

    def _statistics_pass(self) -> None:
        """Statistics from a separate forward of the batch's leading subset, over all micro-batches of the step.

        One forward per micro-batch the subset reaches, all before the first backward (so the total is known to
        the epilogue average); then per micro-batch its sampled-target backward(s): Ω from the first, Γ from all;
        no weight gradients (the backwards target only the taps' slot).
        """
        st = self.capture
        parts = leading_subset(st.recorded_calls(), self.stats_fraction)
        with st.preserved_calls(), torch.enable_grad(), st.armed_forward():  # the output tap sees the subset
            outputs = [forward_with_private_buffers(self.model, part, st.output_fn) for part in parts]
        masks = [self.term_mask(part, f) for part, f in zip(parts, outputs, strict=True)]
        weights = [self.term_weight(call, f) for call, f in zip(st.recorded_calls(), outputs, strict=False)]
        # Ω averaged in the kernel epilogue has no rows left to drop: none with masked positions
        ema = self._ema_targets() if all(m is None for m in masks) else {}
        st.prepare_pass(ema, self._block_layout, examples=sum(f.shape[0] for f in outputs))
        for f, mask, c in zip(outputs, masks, weights, strict=True):
            st.begin_micro_batch(f.shape[0])
            st.term_mask = mask
            try:
                vs = list(output_gradients(self.loss, self.fisher, f, None, self.mc_samples, self.generator, mask,
                                           c))
            except NonFiniteOutputError:
                st.reset()
                self._dropped_all("the model output on the statistics subset is not finite")
                self._fold({})
                return
            for i, v in enumerate(vs):
                st.record_backward(f, v, inputs=i == 0, retain_graph=i + 1 < len(vs))
        for i, stats in st.stats.items():  # inputs that could not be averaged into the running Ω in the epilogue
            if stats.poisoned:
                self.health.statistics_dropped(self.states[i].layer.name, "non-finite layer input")
        self._fold(st.take())

    def term_mask(self, call: RecordedCall, f: torch.Tensor) -> torch.Tensor | None:
        """The term mask of the logits ``f`` of a recorded call, from its visible labels (None: all terms count)."""
        return self.labels.mask(call, f)

    def term_weight(self, call: RecordedCall, f: torch.Tensor) -> float | None:
        """The term weight c = N/M of a whole recorded call with visible labels (None: the loss's default).

        ``f``: the logits of a leading part of it (statistics subset, Fisher products).
        """
        return self.labels.term_weight(call, f)

    def _ema_targets(self) -> dict[int, tuple[torch.Tensor, float]]:
        """Running Ω and the next ε of every collecting layer: the statistics kernels average into them directly.

        Only for layers with one call site: an input of a later site that cannot be added safely could no longer
        leave the running Ω as it was.
        """
        if self.distributed is not None:  # the fold weighs this rank's Ω (weigh) / the owner folds the pooled Ω
            return {}
        return {i: (s.running.A, s.running.next_eps(self.stat_decay)) for i, s in enumerate(self.states)
                if s.running is not None and not s.frozen and len(s.layer.sites) == 1}

    def _fold(self, batch: dict[int, Factors]) -> None:
        """Fold batch factors (layer index → Factors) into the moving averages of the layers that collect.

        A layer's batch factors with non-finite entries are dropped (counted in the health record). Ω already
        averaged in the kernel epilogue stays (its inputs were checked there); if it is not finite, the layer's
        averages restart.
        """
        if self._owner is not None:  # owner preconditioning: the ranks' batch factors pooled on each owner
            batch = self._owner.pool(self.states, batch, self.capture.last_examples if batch else 0)
        finite = dict(zip(batch, finite_flags([(f.A, f.G) for f in batch.values()]), strict=True))
        good = {}
        for i, f in batch.items():
            s = self.states[i]
            if s.frozen:
                continue
            if not finite[i]:
                if s.running is not None and f.A is s.running.A and not finite_flags([(f.A,)])[0]:
                    restart_factors(s, self.health, stacklevel=6)  # the running Ω itself was not finite
                else:
                    self.health.statistics_dropped(s.layer.name, "non-finite batch factors")
                continue
            good[i] = f
        if self.distributed is not None and self._owner is None:  # this rank's share W·n_r/N of the global batch
            dropped = {i for i in batch if not finite[i]}
            good = self.distributed.weigh(self.states, good, dropped, self.capture.last_examples if batch else 0)
        fold_into(self.states, good, self.stat_decay)
        if self.distributed is not None and self._owner is None:  # averaged over ranks when an inverse needs it
            self.distributed.folded(self.states, good)

    # -- inverses ------------------------------------------------------------------------------------------------
    def refresh_inverses(self, k: int | None, eta: float) -> None:
        """Recompute or rescale the damped inverses for the identity weight η = damping + weight decay.

        Recomputed when due at step k (``schedule.inverses_due``) and for layers whose factors are
        new or were replaced; rescaled when (η, scale) changed; k=None: only the latter.

        Factors with non-finite entries (e.g. replaced by ``set_factors``) are not inverted: their moving averages
        restart at the next statistics step, the layer keeps its last inverse, and a RuntimeWarning names it.
        A decomposition that fails in fp32 and fp64 leaves the layer its previous inverse (``guard.refresh_layer``).
        """
        due = k is not None and inverses_due(k, self.inverse_every, self.warmup)
        if self.distributed is not None:  # the ranks' locally folded factors averaged first if this refresh reads them
            self.distributed.settle_for(self.states, due, eta, self.scale)
        if self._inverses.takes_over_refresh():  # distributed: owners compute, then the inverses are shared
            return self._inverses.refresh(self, k, eta)
        changed = False
        for s in self.states:
            if s.running is None:
                continue
            recompute = due or s.inverse is None or s.stale
            changed |= refresh_layer(s, recompute, eta, self.scale, self.damping_method, self.health,
                                     self.max_failures, self._inverses)
        for s in self.states:
            s.stale = False
        if changed or self._buckets is None:
            self.rebuild_buckets()

    @property
    def buckets(self) -> list:
        """The same-shape buckets of the current inverses (``precondition.build_buckets``)."""
        return self._buckets or []

    def rebuild_buckets(self) -> None:
        """Re-stack the inverses into same-shape buckets (after they changed, e.g. loaded from a state_dict)."""
        self._buckets = build_buckets({i: s.inverse for i, s in enumerate(self.states) if s.inverse is not None})

    # -- preconditioning -----------------------------------------------------------------------------------------
    def precondition(self, weight_decay: float, grads: dict | None = None) -> dict[torch.Tensor, torch.Tensor]:
        """F̂⁻¹∇h per KFC parameter with the current inverses (fp32/fp64, the parameter's shape).

        ∇h is ``.grad`` + weight_decay·θ, or ``grads[param]`` (+ weight_decay·θ) where given. Layers without a
        gradient are left out; layers without an inverse yet get ∇h itself (with a once-only warning).
        """
        if self._owner is not None:
            return self._owner.precondition(self, weight_decay, grads, self.warned)
        mats = {}
        for i, s in enumerate(self.states):
            layer = s.layer
            override = None
            if grads is not None:
                override = (grads.get(layer.weight), grads.get(layer.bias) if layer.bias is not None else None)
            m = grad_matrix(layer, weight_decay, override)
            if m is not None:
                mats[i] = m
        U = apply_buckets(self._buckets or [], {i: m for i, m in mats.items() if self.states[i].inverse is not None})
        out: dict[torch.Tensor, torch.Tensor] = {}
        for i, m in mats.items():
            layer = self.states[i].layer
            if i not in U:
                if "nofactors" not in self.warned:
                    self.warned.add("nofactors")
                    warnings.warn(f"KFC layer {layer.name!r} has no factors yet (no statistics were recorded for "
                                  "it): its gradient is used unpreconditioned", stacklevel=3)
                u = m
            else:
                u = U[i]
            dW, db = split_matrix(layer, u)
            out[layer.weight] = dW
            if db is not None:
                out[layer.bias] = db
        return out
