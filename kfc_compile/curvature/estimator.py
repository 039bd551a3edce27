"""The curvature estimator below ``kc.KFC``: per-layer factor state, and statistics → factors → inverses → F̂⁻¹∇h.

One :class:`LayerState` per KFC layer holds everything the optimizer keeps for it (its factor layout, the moving
averages of Ω and Γ, the damped inverse, the frozen / stale flags). The :class:`CurvatureEstimator` owns the list
and drives the capture taps (``capture.CaptureState``, through its driver methods only):

* statistics schedule: step k collects statistics when (k−1) % stats_every == 0 and some layer is not frozen; the
  taps are armed before that step's forward (statistics in the user's backward), or, with a subset
  (``stats_fraction < 1``, MC / type-2 Fisher, eager model), a separate forward of the batch's leading subset
  and its sampled-target backward(s) run at ``update_statistics()``;
* moving averages: F ← εF + (1 − ε)F_batch, ε = min(1 − 1/k, stat_decay) (Ω averaged in the kernels' epilogue);
* inverses: recomputed at steps 1–3, every ``inverse_every`` steps and for new / replaced factors, rescaled when
  the damping or the curvature scale changes; non-finite factors are not inverted (the layer's averages restart at
  its next statistics step and it keeps its last inverse);
* a live registry (``torch.compile(m, backend="kfc")``): layers appear and disappear as dynamo compiles graphs, and
  each layer's state follows it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from kfc_compile.curvature.blocks import Layout
from kfc_compile.curvature.distributed import Distributed
from kfc_compile.curvature.factors import Factors, RunningFactors, public_view
from kfc_compile.curvature.inverses import LayerInverse
from kfc_compile.curvature.losses import Loss, output_gradients
from kfc_compile.curvature.precondition import apply_buckets, build_buckets, grad_matrix, split_matrix
from kfc_compile.curvature.sharding import LocalInverses
from kfc_compile.curvature.subset import batch_subset, forward_with_private_buffers
from kfc_compile.registry import KFCLayer
from kfc_compile.runtime.state import CaptureState


@dataclass(eq=False)
class LayerState:
    """What the optimizer keeps for one KFC layer.

    Attributes:
        layer: the layer (its weight, bias, group and factor sizes).
        layout: how its factors are stored (dense, or diagonal blocks with ``max_factor_dim``).
        running: the moving averages of Ω and Γ; None before any statistics (or after a non-finite restart).
        inverse: the damped inverses / eigendecompositions; None before the first refresh.
        frozen: statistics are not collected (``KFC.set_factors(..., frozen=True)``).
        stale: the factors were replaced since the last refresh: the next one recomputes the inverse.
    """

    layer: KFCLayer
    layout: Layout
    running: RunningFactors | None = None
    inverse: LayerInverse | None = None
    frozen: bool = False
    stale: bool = False

    @property
    def name(self) -> str:
        """The layer's name."""
        return self.layer.name

    def nbytes(self) -> int:
        """Bytes of the tensors held for this layer: the moving averages plus the inverse."""
        tensors = [] if self.running is None else [self.running.A, self.running.G]
        if self.inverse is not None:
            tensors += self.inverse.tensors()
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())

    def dense_factors(self) -> Factors | None:
        """Copies of the moving averages (Ω, Γ) as dense matrices; None before any statistics.

        2-D for an ungrouped layer, else stacked per group; blocked factors as the block-diagonal matrices they
        stand for.
        """
        if self.running is None:
            return None
        A, G = self.running.A, self.running.G
        if self.layout.blocked:
            A, G = self.layout.to_dense(A, G)
        return Factors(public_view(A).clone(), public_view(G).clone())

    def replace_factors(self, A: torch.Tensor, G: torch.Tensor, frozen: bool) -> None:
        """Set the moving averages to dense (Ω, Γ); the inverse is recomputed at the next refresh.

        Args:
            A: Ω, ``(groups, a_dim, a_dim)`` or 2-D for an ungrouped layer (a blocked layout keeps its diagonal
                blocks).
            G: Γ, ``(groups, g_dim, g_dim)`` or 2-D.
            frozen: stop collecting statistics for this layer.

        Raises:
            ValueError: a factor has the wrong shape.
        """
        layer = self.layer
        dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        shapes = ((layer.groups, layer.a_dim, layer.a_dim), (layer.groups, layer.g_dim, layer.g_dim))
        out = []
        for t, shape, what in ((A, shapes[0], "A"), (G, shapes[1], "G")):
            t = torch.as_tensor(t)
            if t.dim() == 2:
                t = t.unsqueeze(0)
            if tuple(t.shape) != shape:
                raise ValueError(f"{what} for layer {layer.name!r} must have shape {shape} (or 2-D when ungrouped), "
                                 f"got {tuple(t.shape)}")
            out.append(t.detach().to(dtype=dtype, device=layer.weight.device).clone())
        if self.layout.blocked:
            out = list(self.layout.to_blocks(*out))
        self.running = RunningFactors(out[0], out[1], updates=1)
        self.frozen = bool(frozen)
        self.stale = True

    def state(self) -> dict:
        """This layer's entry of ``KFC.state_dict()`` (copies of its tensors)."""
        rf = self.running
        return {"name": self.layer.name,
                "factors": None if rf is None else {"A": rf.A.clone(), "G": rf.G.clone(), "updates": rf.updates},
                "frozen": self.frozen,
                "inverse": None if self.inverse is None else self.inverse.state()}

    def check(self, entry: dict) -> None:
        """Raise ``ValueError`` if the factors of an entry of :meth:`state` do not have this layout's shapes."""
        fac = entry["factors"]
        if fac is not None and (tuple(fac["A"].shape), tuple(fac["G"].shape)) != self.layout.shapes():
            raise ValueError(f"state_dict factors of layer {entry['name']!r} have shapes "
                             f"{(tuple(fac['A'].shape), tuple(fac['G'].shape))}, this optimizer stores "
                             f"{self.layout.shapes()} (saved with another max_factor_dim?)")

    def load(self, entry: dict) -> None:
        """Restore the factors, frozen flag and inverse from an entry of :meth:`state` (on the layer's device)."""
        dev = self.layer.weight.device
        fac = entry["factors"]
        self.running = None if fac is None else RunningFactors(fac["A"].to(dev).clone(), fac["G"].to(dev).clone(),
                                                               int(fac["updates"]))
        self.frozen = bool(entry["frozen"])
        self.inverse = None if entry["inverse"] is None else LayerInverse.from_state(entry["inverse"], dev)
        self.stale = False


class CurvatureEstimator:
    """The Kronecker-factored curvature F̂ of a transformed model's KFC layers (see the module docstring).

    Args:
        model: the module that runs the forward (transformed, or compiled with the kfc backend); ``model.kfc`` is
            its registry, whose ``state`` is the capture state.
        compiled: ``model`` is compiled with the kfc backend (statistics stay in the user's pass).
        loss: the loss's Fisher model.
        fisher: ``"mc"``, ``"empirical"`` or ``"type-2"``.
        mc_samples, generator: sampled targets per example and their RNG (``fisher="mc"``).
        stats_every, inverse_every, stat_decay, stats_fraction: the statistics and inverse schedule.
        damping_method: ``"factored"`` or ``"eigen"``.
        max_factor_dim: factors wider than this are stored as diagonal blocks (None: dense).
        warned: once-only warnings already given (shared with the optimizer, part of its state).
        distributed: what the ranks of a distributed run share (``curvature/distributed.py``); None: one process.
    """

    def __init__(self, model: nn.Module, *, compiled: bool, loss: Loss, fisher: str,
                 mc_samples: int, generator: torch.Generator | None, stats_every: int, inverse_every: int,
                 stat_decay: float, stats_fraction: float, damping_method: str, max_factor_dim: int | None,
                 warned: set[str], distributed: Distributed | None = None):
        self.model = model
        self.loss = loss
        self.fisher = fisher
        self.mc_samples = mc_samples
        self.generator = generator
        self.stats_every = stats_every
        self.inverse_every = inverse_every
        self.stat_decay = stat_decay
        self.stats_fraction = stats_fraction
        self.damping_method = damping_method
        self.max_factor_dim = max_factor_dim
        self.warned = warned
        self.distributed = distributed  # distributed KFC: hooks in _fold, refresh_inverses, schedule, scale
        self._inverses = LocalInverses() if distributed is None else distributed.inverses
        info = model.kfc
        self.capture: CaptureState = info.state
        self._version = getattr(info, "version", None)  # a live registry (kfc backend): see sync()
        self.states = [LayerState(layer, self._layout_of(layer)) for layer in info.layers]
        # statistics on a subset: a separate forward of the subset where possible, else the subset's rows
        self._separate_pass = stats_fraction < 1.0 and fisher in ("mc", "type-2") and not compiled
        self.capture.set_stats_fraction(None if stats_fraction == 1.0 or self._separate_pass else stats_fraction)
        self._stats_due = False
        self._armed = False
        self._buckets = None
        self.scale = 1.0  # curvature of the objective = scale · F̂ (N for a sum over the batch, 1 for a mean)

    # -- layers --------------------------------------------------------------------------------------------------
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
        states = []
        for layer in info.layers:
            s = old.get(id(layer))
            if s is None:
                s = LayerState(layer, self._layout_of(layer))
            else:
                s.layout = self._layout_of(layer)
            states.append(s)
        self.states = states
        self._buckets = None
        return True

    def _layout_of(self, layer: KFCLayer) -> Layout:
        return Layout.of(layer.groups, layer.a_dim, layer.g_dim, self.max_factor_dim)

    # -- statistics ----------------------------------------------------------------------------------------------
    def schedule(self, k: int) -> None:
        """Arm the capture taps for the forward of step k if it is a statistics step, else disarm them."""
        st = self.capture
        if self.distributed is not None:  # this rank's MC stream for step k
            self.generator = self.distributed.mc_generator(k)
        layers_pending = self.live and not self.states  # kfc backend, nothing compiled yet
        due = (k - 1) % self.stats_every == 0 and (any(not s.frozen for s in self.states) or layers_pending)
        self._stats_due = due and self._separate_pass
        if not due or self._separate_pass:
            if self._armed:
                st.disarm()
            self._armed = False
            return
        st.prepare_pass(self._ema_targets(), self._block_targets())
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
        inputs = self.capture.recorded_inputs()
        n = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
        self.scale = 1.0 if self.loss.reduction == "mean" else float(n)
        if self.distributed is not None:
            self.scale = self.distributed.curvature_scale(self.scale, self.loss.reduction)

    def _fisher_pass(self, f: torch.Tensor) -> None:
        """Γ from sampled-target (or type-2) backwards, run at the start of the user's backward."""
        # retain_graph through a kfc-backend graph: it is compiled without AOT donated buffers, and AOT's runtime
        # check reads the same flag (frontend/dynamo/backend.py)
        with torch._functorch.config.patch(donated_buffer=False):
            for v in output_gradients(self.loss, self.fisher, f, None, self.mc_samples, self.generator):
                self.capture.record_backward(f, v, inputs=False)

    def _collect(self) -> None:
        """Fold the statistics recorded in the user's pass into the moving averages."""
        if not self._armed:
            return
        batch = self.capture.finish_armed_step()
        self._armed = False
        self._fold(batch)

    def _statistics_pass(self) -> None:
        """Statistics from a separate forward of the batch's leading subset.

        Ω comes from the first of its sampled-target backward(s), Γ from all; no weight gradients (the backwards
        target only the taps' slot).
        """
        st = self.capture
        inputs = batch_subset(st.recorded_inputs(), self.stats_fraction)
        st.prepare_pass(self._ema_targets(), self._block_targets())
        with st.preserved_inputs(), torch.enable_grad(), st.armed_forward():  # the output tap sees the subset
            f = forward_with_private_buffers(self.model, inputs)
        st.set_examples(f.shape[0])
        vs = list(output_gradients(self.loss, self.fisher, f, None, self.mc_samples, self.generator))
        for i, v in enumerate(vs):
            st.record_backward(f, v, inputs=i == 0, retain_graph=i + 1 < len(vs))
        self._fold(st.take())

    def _ema_targets(self) -> dict[int, tuple[torch.Tensor, float]]:
        """Running Ω and the next ε of every collecting layer: the statistics kernels average into them directly."""
        return {i: (s.running.A, s.running.next_eps(self.stat_decay)) for i, s in enumerate(self.states)
                if s.running is not None and not s.frozen}

    def _block_targets(self) -> dict[int, tuple[int, int]]:
        """(Ω blocks, Γ blocks) of every layer with block-diagonal factors."""
        return {i: (s.layout.a_blocks, s.layout.g_blocks) for i, s in enumerate(self.states) if s.layout.blocked}

    def _fold(self, batch: dict[int, Factors]) -> None:
        """Fold batch factors (layer index → Factors) into the moving averages of the layers that collect."""
        for i, f in batch.items():
            s = self.states[i]
            if s.frozen:
                continue
            if s.running is None:  # the first update has ε = 0: the batch factors become the average (no copy)
                s.running = RunningFactors(f.A, f.G, updates=1)
            else:
                s.running.update(f, self.stat_decay)
        if self.distributed is not None:  # the running factors become their mean over ranks
            self.distributed.average_factors(self.states, batch, self.capture.examples_used())

    # -- inverses ------------------------------------------------------------------------------------------------
    def refresh_inverses(self, k: int | None, eta: float) -> None:
        """Recompute or rescale the damped inverses for the identity weight η = damping + weight decay.

        Recomputed when due at step k (steps 1–3 and every inverse_every steps) and for layers whose factors are
        new or were replaced; rescaled when (η, scale) changed; k=None: only the latter.

        Factors with non-finite entries (an overflowing statistics pass: e.g. train-mode BatchNorm over a tiny
        statistics subset) are not inverted: their moving averages restart at the next statistics step, the layer
        keeps its last inverse, and a RuntimeWarning names it.
        """
        if self._inverses.takes_over_refresh():  # distributed: owners compute, then the inverses are shared
            return self._inverses.refresh(self, k, eta)
        due = k is not None and (k <= 3 or k % self.inverse_every == 0)
        changed = False
        for s in self.states:
            rf, inv, name = s.running, s.inverse, s.layer.name
            if rf is None:
                continue
            recompute = due or inv is None or s.stale
            if (recompute or inv.eta != eta or inv.scale != self.scale) and not (
                    bool(torch.isfinite(rf.A).all()) and bool(torch.isfinite(rf.G).all())):
                s.running = None
                warnings.warn(f"KFC layer {name!r}: its factors are not finite (inf/NaN in the statistics pass); "
                              "their moving averages restart at the next statistics step and the layer keeps its "
                              "last inverse" + ("" if inv is not None else " (none yet: unpreconditioned)"),
                              RuntimeWarning, stacklevel=4)
                continue
            if recompute:
                s.inverse = self._inverses.compute(self.damping_method, rf.A, rf.G, eta, self.scale, name, s.layout)
                changed = True
            elif inv.eta != eta or inv.scale != self.scale:
                s.inverse = self._inverses.rescale(inv, eta, self.scale, rf.A, rf.G, name)
                changed = True
        for s in self.states:
            s.stale = False
        if changed or self._buckets is None:
            self.rebuild_buckets()

    def rebuild_buckets(self) -> None:
        """Re-stack the inverses into same-shape buckets (after they changed, e.g. loaded from a state_dict)."""
        self._buckets = build_buckets({i: s.inverse for i, s in enumerate(self.states) if s.inverse is not None})

    # -- preconditioning -----------------------------------------------------------------------------------------
    def precondition(self, weight_decay: float, grads: dict | None = None) -> dict[torch.Tensor, torch.Tensor]:
        """F̂⁻¹∇h per KFC parameter with the current inverses (fp32/fp64, the parameter's shape).

        ∇h is ``.grad`` + weight_decay·θ, or ``grads[param]`` (+ weight_decay·θ) where given. Layers without a
        gradient are left out; layers without an inverse yet get ∇h itself (with a once-only warning).
        """
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
