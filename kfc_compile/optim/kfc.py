"""``kc.KFC``: KFC-pre and adaptive K-FAC as a ``torch.optim.Optimizer`` for plain training loops.

A training step is the usual ``loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad()``. On statistics steps
(step k with (k−1) % stats_every == 0, so step 1 always is one) the optimizer arms the model's capture taps before
the forward; during the user's backward the taps record Ω from the layer inputs, and Γ from

* ``fisher="mc"``: one extra backward per MC sample with targets drawn from the model's predictive
  distribution, run at the start of the user's backward while the graph is alive. It back-propagates from the
  model output to the taps only: **no weight gradients**, no second forward. Extra cost per statistics step:
  ``mc_samples`` × (a backward through the network without the weight-gradient GEMMs); none on other steps;
* ``fisher="empirical"``: the user's own backward (free, but the empirical Fisher is a worse curvature model);
* ``fisher="type-2"``: one backward per output coordinate (exact GGN factors; small outputs only).

With ``stats_fraction < 1`` (default 1/8, K-FAC's τ₁) the statistics come from the first
``ceil(stats_fraction·N)`` examples: for ``mc``/``type-2`` in a separate forward of that subset (private buffer
copies: BatchNorm running statistics are untouched) and its sampled-target backward(s) inside ``step()``, so the
user's own forward and backward cost exactly an SGD step's (``empirical`` and kfc-backend models use the subset's
rows of the user's pass).

``step()`` then folds the batch factors into the moving averages, refreshes the damped inverses (steps 1–3 and
every ``inverse_every`` steps) and preconditions every KFC layer (all in ``curvature/estimator.py``), and applies
the update:

* ``mode="pre"`` (KFC-pre, the paper's experiments; docs/algorithm.md §6.2, KFC-S Alg. 1):
  v = −lr·F̂⁻¹∇h; ν = vᵀFv + wd·vᵀv with exact Fisher-vector products (forward-mode JVPs) on the first
  ``clip_fraction`` of the batch (or, with ``clip_curvature="factored"``, ν = vᵀF̂v under the damped
  Kronecker-factored curvature itself, = lr²·⟨F̂⁻¹∇h, ∇h⟩: no extra pass, the kl-clip of kfac-pytorch; fallback
  parameters then add only wd·vᵀv); if ν > clip, v ← v·sqrt(clip/ν) (a non-finite ν skips the step, with a
  warning); p ← μp + v; θ ← θ + p; optional iterate averaging θ̄ ← ξθ̄ + (1−ξ)θ with ξ = exp(−1/averaging).
* ``mode="adaptive"`` (full K-FAC rescaling; docs/algorithm.md §5.4–6.1): Δ = −F̂⁻¹∇h, δ = lr·(αΔ + μδ₀) with
  (α, μ) minimising the quadratic model M built from the exact mini-batch Fisher (2 JVPs) plus (damping + wd)·I;
  ``lr = 1`` is K-FAC proper, ``momentum = 0`` drops μ. Every ``lm_interval`` steps the damping λ follows the
  Levenberg–Marquardt rule with ρ = (h(θ) − h(θ+δ)) / (M(0) − M(δ)) (ρ = −∞ when the model predicts no decrease,
  e.g. lr > 2 overshooting its minimiser), which needs ``step(closure)``: λ ← ω₁λ if ρ > 3/4, λ/ω₁ if ρ < 1/4.

∇h is the gradient of the regularised objective: ``.grad + weight_decay·θ``. Parameters outside KFC
(norm layers, embeddings, anything ``kc.report`` lists as uncovered) are updated in the same ``step()`` by the
fallback: ``"sgd"`` joins the same update vector v (identity preconditioner, the same clipping and momentum),
``"adam"`` runs a separate Adam step (not clipped, not part of the α/μ solve). The rules themselves are
list-of-tensor functions in ``rules.py``; the arguments are validated in ``options.py``.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import torch
from torch import nn

from kfc_compile.curvature.distributed import Distributed
from kfc_compile.curvature.distributed import setup as setup_distributed
from kfc_compile.curvature.estimator import CurvatureEstimator, LayerState
from kfc_compile.curvature.factors import Factors
from kfc_compile.curvature.subset import batch_subset
from kfc_compile.optim import fvp
from kfc_compile.optim.checkpoint import STATE_VERSION, checked_entry
from kfc_compile.optim.groups import find_group, hyper_parameters, initial_groups, regroup
from kfc_compile.optim.model import is_compiled_module, resolve_model, route
from kfc_compile.optim.options import KFCOptions
from kfc_compile.optim.rules import average_iterates_, l2_term, levenberg_marquardt, reduction_ratio
from kfc_compile.optim.updates import GroupPart, adam_update, adaptive_update, group_parts, pre_update
from kfc_compile.registry import KFCInfo, KFCLayer


class KFC(torch.optim.Optimizer):
    """KFC / K-FAC natural-gradient optimizer (KFC-pre or adaptive) with a fallback for uncovered parameters.

    Args:
        model: a plain ``nn.Module`` (transformed here; its forward is routed through the instrumented graph in
            place, so ``model(x)`` keeps working and feeds the statistics) or a ``kc.transform``ed module; either
            inside ``DistributedDataParallel`` for distributed KFC.
        lr: learning rate (``mode="adaptive"``: a multiplier on the α/μ-rescaled update, 1 for K-FAC proper).
        momentum: μ of KFC-pre (``p ← μp + v``); in adaptive mode 0 disables the μ direction.
        damping: γ (the identity weight of the curvature, added to the weight decay): factored strength
            sqrt(damping + weight_decay) split by π, or added to the eigenvalue products with
            ``damping_method="eigen"``; 0 gives exact inverses (an error if a factor is singular). In adaptive
            mode this is the Levenberg–Marquardt λ and it is adapted (``param_groups[0]["damping"]``).
        weight_decay: ℓ2 coefficient: added to the gradient, folded into the damping and into ν.
        stats_every, inverse_every: statistics / inverse periods T_s, T_f (inverses also at steps 1–3).
        stat_decay: the moving-average cap: ε = min(1 − 1/k, stat_decay).
        stats_fraction: share of the batch (its first examples, at least 2) that feeds the factor statistics
            (K-FAC's τ₁); 1 uses the whole batch inside the user's own forward and backward.
        fisher: ``"mc"`` (sampled targets), ``"empirical"`` or ``"type-2"``.
        loss: ``"cross_entropy"``, ``"mse"``, ``"bce_with_logits"`` or the matching ``nn`` loss instance (its
            reduction says whether the objective is a batch mean or sum; a sum scales the curvature by N).
        approx: ``"expand"`` (KFC) or ``"reduce"``.
        mode: ``"pre"`` or ``"adaptive"``.
        clip: KFC-pre's ν threshold C (``None`` disables clipping and its JVP).
        averaging: iterate-averaging timescale τ in steps (``None``: off); see :meth:`swap_averaged`.
        damping_method: ``"factored"`` or ``"eigen"``.
        fallback: ``"sgd"``, ``"adam"`` or ``None`` (uncovered parameters are then not trained).
        mc_samples: sampled targets per example for ``fisher="mc"``.
        generator: ``torch.Generator`` for the MC targets (its state is part of ``state_dict``); default: the
            global RNG (save ``torch.get_rng_state()`` yourself for bit-identical resumes).
        clip_fraction: share of the batch (its first examples) used for the exact Fisher products.
        clip_curvature: ``"exact"`` (the paper: exact Fisher-vector products on ``clip_fraction`` of the batch) or
            ``"factored"`` (the optimizer's own damped F̂: free, no extra forward).
        fallback_lr: learning rate of the fallback group (default: ``lr`` for SGD, 1e-3 for Adam).
        fallback_betas, fallback_eps: Adam's hyper-parameters.
        lm_interval, lm_decay, min_damping: Levenberg–Marquardt period T1, factor ω₁ and floor for λ.
        max_factor_dim: a factor (Ω or Γ, per group) wider than this is kept as ceil(d / max_factor_dim)
            equal diagonal blocks (``curvature/blocks.py``: d·b memory, d·b² inversion instead of d², d³; e.g.
            VGG's 25089-wide Ω); ``None``: always dense.
        distributed: ``None`` (on for a DDP model), ``True`` / ``"broadcast"`` (each layer's inverse computed by one
            rank and gathered by all), ``"replicate"`` (every rank computes all) or ``False``; see
            ``curvature/distributed.py``. Every rank calls ``step()`` (and ``precondition()``) together.

    ``opt.options`` holds the validated arguments, ``opt.layer_state(name)`` / ``opt.layer_states()`` what is kept
    per KFC layer (factors, inverse, flags), ``opt.last_step`` the scalars of the last step (ν, clip scale, α, μ,
    ρ, damping ...).
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.9, damping: float = 1e-3,
                 weight_decay: float = 0.0, stats_every: int = 1, inverse_every: int = 20, stat_decay: float = 0.95,
                 stats_fraction: float = 0.125,
                 fisher: str = "mc", loss="cross_entropy", approx: str = "expand", mode: str = "pre",
                 clip: float | None = 0.3, averaging: float | None = None, damping_method: str = "factored",
                 fallback: str | None = "sgd", mc_samples: int = 1, generator: torch.Generator | None = None,
                 clip_fraction: float = 0.25, clip_curvature: str = "exact", fallback_lr: float | None = None,
                 fallback_betas: tuple[float, float] = (0.9, 0.999), fallback_eps: float = 1e-8,
                 lm_interval: int = 5, lm_decay: float = (19 / 20) ** 5, min_damping: float = 1e-8,
                 max_factor_dim: int | None = 8192, distributed: bool | str | None = None):
        self.options = o = KFCOptions(
            lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay, stats_every=stats_every,
            inverse_every=inverse_every, stat_decay=stat_decay, stats_fraction=stats_fraction, fisher=fisher,
            loss=loss, approx=approx, mode=mode, clip=clip, averaging=averaging, damping_method=damping_method,
            fallback=fallback, mc_samples=mc_samples, generator=generator, clip_fraction=clip_fraction,
            clip_curvature=clip_curvature, fallback_lr=fallback_lr, fallback_betas=fallback_betas,
            fallback_eps=fallback_eps, lm_interval=lm_interval, lm_decay=lm_decay, min_damping=min_damping,
            max_factor_dim=max_factor_dim, distributed=distributed)
        tm, owner, needs_route = resolve_model(model, o.approx)
        info: KFCInfo = tm.kfc
        self.model = tm
        self._dist = setup_distributed(model, o, info.layers, getattr(info, "version", None) is not None)
        # a model compiled with the kfc backend: layers join info.layers when dynamo compiles (_sync_layers)
        pending = getattr(info, "version", None) is not None and not info.graphs
        if not info.layers and not pending:
            if o.fallback is None:
                raise ValueError(f"{type(owner).__name__} has no layer KFC can precondition and fallback=None: "
                                 "nothing would be trained (use fallback='sgd' or 'adam')")
            warnings.warn(f"{type(owner).__name__} has no layer KFC can precondition: every parameter is trained "
                          f"by the {o.fallback!r} fallback", stacklevel=2)
        if needs_route:
            route(owner, tm)
        compiled = is_compiled_module(tm)
        self._warned: set[str] = set()  # once-only warnings given (shared with the estimator; saved in state_dict)
        self._estimator = CurvatureEstimator(
            tm, compiled=compiled, loss=o.loss, fisher=o.fisher, mc_samples=o.mc_samples, generator=o.generator,
            stats_every=o.stats_every, inverse_every=o.inverse_every, stat_decay=o.stat_decay,
            stats_fraction=o.stats_fraction, damping_method=o.damping_method, max_factor_dim=o.max_factor_dim,
            warned=self._warned, distributed=self._dist)
        self._fisher_products = fvp.FisherProducts(owner if compiled else tm, o.loss)

        groups, self.fallback_names = initial_groups(self.layers, owner, o, pending)
        self._init_done = False
        super().__init__(groups, hyper_parameters(o))
        self._init_done = True

        self._step_count = 0
        self._owner = owner
        self._owner_params = list(owner.parameters())
        self.last_step: dict = {}
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
        """
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

    @contextlib.contextmanager
    def swap_averaged(self) -> Iterator[None]:
        """Inside the block the parameters hold the averaged iterates θ̄ (e.g. for evaluation)."""
        if self.options.averaging is None:
            raise RuntimeError("iterate averaging is off: construct KFC with averaging=tau")
        params = [p for g in self.param_groups for p in g["params"]]
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p.copy_(self.state[p]["average"])
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)

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
        est.update_statistics()
        kg, fg = self._kfc_group(), self._fallback_group()
        info: dict = {"step": k}
        nat = {}
        if kg is not None:
            est.refresh_inverses(k, kg["damping"] + kg["weight_decay"])
            nat = est.precondition(kg["weight_decay"])
        parts = group_parts(kg, fg if o.fallback == "sgd" else None, nat)
        if any(part.params for part in parts):
            if o.mode == "pre":
                pre_update(parts, self.state, o, self._exact_gram, info)
            else:
                self._step_adaptive(parts, info, loss, closure, k)
        if fg is not None and o.fallback == "adam":
            adam_update(fg, self.state)
        if o.averaging is not None:
            params = [p for g in self.param_groups for p in g["params"]]
            average_iterates_([self.state[p]["average"] for p in params], params, o.averaging)
        self._step_count = k
        self.last_step = info
        est.schedule(k + 1)
        return loss

    def _exact_gram(self, directions: list[dict[torch.Tensor, torch.Tensor]], fraction: float) -> torch.Tensor:
        """Gram matrix (fp64) of the exact mini-batch Fisher of the objective among ``directions``.

        Directions map parameters to tensors (missing parameters: 0); one JVP each, on the recorded batch's leading
        ``fraction``.
        """
        capture = self._estimator.capture
        inputs = batch_subset(capture.recorded_inputs(), fraction)
        with capture.preserved_inputs():
            f, jv = self._fisher_products.outputs_and_jvps(inputs, directions)
        C = fvp.gram(self.options.loss, f, jv, self._estimator.scale)
        return C if self._dist is None else self._dist.mean("fisher", C)

    def _step_adaptive(self, parts: list[GroupPart], info: dict, loss, closure, k: int) -> None:
        """The adaptive update, and every ``lm_interval`` steps the Levenberg–Marquardt damping rule."""
        o = self.options
        l2_groups = [(part.group["params"], part.group["weight_decay"]) for part in parts]
        lm_due = k % o.lm_interval == 0
        h0 = None
        if lm_due:
            if closure is None or loss is None:
                if "lm" not in self._warned:
                    self._warned.add("lm")
                    warnings.warn("mode='adaptive' adapts the damping (Levenberg–Marquardt) only when step() gets a "
                                  "closure that re-evaluates the loss; the damping stays fixed", stacklevel=3)
                lm_due = False
            else:
                h0 = _as_float(loss, self._dist) + l2_term(l2_groups)
        lam = parts[0].group["damping"]
        model_change = adaptive_update(parts, self.state, o, self._exact_gram, info)
        if lm_due:
            with torch.enable_grad():
                h1 = _as_float(closure(), self._dist) + l2_term(l2_groups)
            rho = reduction_ratio(h0, h1, model_change)
            new = levenberg_marquardt(lam, rho, o.lm_decay, o.min_damping)
            for g in self.param_groups:
                g["damping"] = new
            info.update(rho=rho, damping=new)

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``torch.optim`` state plus ``"kfc"``: step, curvature scale, per-layer factors and inverses, RNG state."""
        sd = super().state_dict()
        est = self._estimator
        sd["kfc"] = {
            "version": STATE_VERSION,
            "step": self._step_count,
            "mode": self.options.mode,
            "damping_method": self.options.damping_method,
            "scale": est.scale,
            "warned": sorted(self._warned),
            "layers": [s.state() for s in est.states],
            "generator": None if self.options.generator is None else self.options.generator.get_state(),
            "distributed": None if self._dist is None else self._dist.state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict` of a KFC on the same layers with the same ``damping_method``."""
        est, o = self._estimator, self.options
        kfc = checked_entry(state_dict, est.states, o.damping_method)
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "kfc"})
        self._step_count = int(kfc["step"])
        est.scale = float(kfc["scale"])
        self._warned.clear()
        self._warned.update(kfc.get("warned", ()))
        for s, entry in zip(est.states, kfc["layers"], strict=True):
            s.load(entry)
        est.rebuild_buckets()
        if self._dist is not None:
            self._dist.load(kfc.get("distributed"))
        if kfc["generator"] is not None:
            if o.generator is None:
                warnings.warn("the state_dict has an MC generator state but this optimizer has no generator: "
                              "it is ignored (sampling uses the global RNG)", stacklevel=2)
            else:
                o.generator.set_state(kfc["generator"])
        est.schedule(self._step_count + 1)


def _as_float(loss, dist: Distributed | None = None) -> float:
    v = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    return v if dist is None else dist.mean("loss", v)  # distributed: the mean of the ranks' losses
