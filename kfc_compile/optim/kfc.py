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
``ceil(stats_fraction·N)`` examples only: for ``mc``/``type-2`` the taps stay disarmed during the user's step and
``step()`` runs one forward of that subset (on private copies of the buffers, so BatchNorm running statistics are
untouched) and its sampled-target backward(s), which feed both Ω and Γ; the user's forward and backward then cost
exactly an SGD step's. (``empirical``, and models compiled with the kfc backend, keep the capture in the user's
pass and use the subset's rows.)

``step()`` then folds the batch factors into the moving averages (ε = min(1 − 1/k, stat_decay)), refreshes the
damped inverses / eigendecompositions (steps 1–3 and every ``inverse_every`` steps), preconditions every KFC layer
(``precondition.py``) and applies the update:

* ``mode="pre"`` (KFC-pre, the paper's experiments; kfc_spec.md §6.2, KFC-S Alg. 1):
  v = −lr·F̂⁻¹∇h; ν = vᵀFv + wd·vᵀv with exact Fisher-vector products (forward-mode JVPs) on the first
  ``clip_fraction`` of the batch (or, with ``clip_curvature="factored"``, ν = vᵀF̂v under the damped
  Kronecker-factored curvature itself, = lr²·⟨F̂⁻¹∇h, ∇h⟩: no extra pass, the kl-clip of kfac-pytorch; fallback
  parameters then add only wd·vᵀv); if ν > clip, v ← v·sqrt(clip/ν) (a non-finite ν skips the step, with a
  warning); p ← μp + v; θ ← θ + p; optional iterate
  averaging θ̄ ← ξθ̄ + (1−ξ)θ with ξ = exp(−1/averaging).
* ``mode="adaptive"`` (full K-FAC rescaling; kfc_spec.md §5.4–6.1): Δ = −F̂⁻¹∇h, δ = lr·(αΔ + μδ₀) with (α, μ)
  minimising the quadratic model M built from the exact mini-batch Fisher (2 JVPs) plus (damping + wd)·I;
  ``lr = 1`` is K-FAC proper, ``momentum = 0`` drops μ. Every ``lm_interval`` steps the damping λ follows the
  Levenberg–Marquardt rule with ρ = (h(θ) − h(θ+δ)) / (M(0) − M(δ)) (ρ = −∞ when the model predicts no decrease,
  e.g. lr > 2 overshooting its minimiser), which needs ``step(closure)``: λ ← ω₁λ if ρ > 3/4, λ/ω₁ if ρ < 1/4.

∇h is the gradient of the regularised objective: ``.grad + weight_decay·θ``. Parameters outside KFC
(norm layers, embeddings, anything ``kc.report`` lists as uncovered) are updated in the same ``step()`` by the
fallback: ``"sgd"`` joins the same update vector v (identity preconditioner, the same clipping and momentum),
``"adam"`` runs a separate Adam step (not clipped, not part of the α/μ solve).
"""
from __future__ import annotations

import contextlib
import math
import types
import warnings
from collections.abc import Iterator
from numbers import Real

import torch
from torch import nn

from kfc_compile.curvature.blocks import Layout
from kfc_compile.curvature.factors import Factors, RunningFactors, public_view
from kfc_compile.curvature.fisher import FISHER_TYPES, loss_spec, output_gradients
from kfc_compile.curvature.subset import batch_subset, forward_with_private_buffers
from kfc_compile.optim import fvp
from kfc_compile.optim.precondition import (DAMPING_METHODS, LayerInverse, apply_buckets, build_buckets,
                                            compute_inverse, grad_matrix, rescale_inverse, split_matrix)
from kfc_compile.registry import KFCInfo, KFCLayer
from kfc_compile.transform import check_approx, transform

MODES = ("pre", "adaptive")
CLIP_CURVATURES = ("exact", "factored")
FALLBACKS = ("sgd", "adam", None)
_STATE_VERSION = 1


# -- argument validation -----------------------------------------------------------------------------------------

def _real(name: str, value, *, low: float | None = None, high: float | None = None, low_open: bool = False,
          high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _as_float(loss) -> float:
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)


def _choice(name: str, value, options) -> str:
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}: expected one of {tuple(options)}")
    return value


# -- model resolution ---------------------------------------------------------------------------------------------

def _is_dynamo_module(model) -> bool:
    try:
        from torch._dynamo.eval_frame import OptimizedModule
    except Exception:  # pragma: no cover - dynamo unavailable
        return False
    return isinstance(model, OptimizedModule)


def _route(model: nn.Module, tm: nn.Module) -> None:
    """Send the plain module's forward through its transformed graph, in place.

    ``model.forward`` becomes ``tm.forward`` and ``model.kfc`` the registry; ``model.train()``/``model.eval()``
    also switch ``tm`` (whose black-box copies keep their own flags). Parameters are shared, so
    ``model.state_dict()``, ``model.load_state_dict()`` and ``model.to()`` keep working (move the model before
    building the optimizer: moved buffers of fx-inlined attributes are not re-shared).
    """
    model.__dict__["_kfc_transformed"] = tm  # not a registered submodule: model.state_dict() is unchanged
    model.forward = tm.forward
    model.kfc = tm.kfc
    model.train = types.MethodType(_routed_train, model)  # a bound method: copy.deepcopy(model) stays consistent


def _routed_train(self: nn.Module, mode: bool = True) -> nn.Module:
    type(self).train(self, mode)
    self.__dict__["_kfc_transformed"].train(mode)
    return self


def resolve_model(model, approx: str) -> tuple[nn.Module, nn.Module, bool]:
    """(transformed module, module whose parameters are trained, needs routing)."""
    if _is_dynamo_module(model):
        if isinstance(getattr(model._orig_mod, "kfc", None), KFCInfo):  # torch.compile(kc.transform(m))
            return resolve_model(model._orig_mod, approx)
        from kfc_compile.compile.backend import registry_for  # torch.compile(m, backend="kfc"): live registry

        registry_for(model, approx)
        return model, model._orig_mod, False
    if not isinstance(model, nn.Module):
        raise TypeError(f"KFC expects an nn.Module or a kc.transform()ed module, got {type(model).__name__}")
    info = getattr(model, "kfc", None)
    if isinstance(info, KFCInfo):
        if info.approx != approx:
            raise ValueError(f"approx={approx!r} but the model was transformed with approx={info.approx!r}")
        tm = model.__dict__.get("_kfc_transformed", model)
        if tm is not model and getattr(tm, "kfc", None) is not info:  # a deepcopy: GraphModule drops .kfc
            tm.kfc = info
        return tm, model, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = transform(model, approx)
    return tm, model, True


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
                 max_factor_dim: int | None = 8192):
        lr = _real("lr", lr, low=0.0)
        momentum = _real("momentum", momentum, low=0.0, high=1.0, high_open=True)
        damping = _real("damping", damping, low=0.0)
        weight_decay = _real("weight_decay", weight_decay, low=0.0)
        self.stats_every = _positive_int("stats_every", stats_every)
        self.inverse_every = _positive_int("inverse_every", inverse_every)
        self.stat_decay = _real("stat_decay", stat_decay, low=0.0, high=1.0)
        self.stats_fraction = _real("stats_fraction", stats_fraction, low=0.0, high=1.0, low_open=True)
        self.fisher = _choice("fisher", fisher, FISHER_TYPES)
        self.loss_spec = loss_spec(loss)
        self.approx = check_approx(approx)
        self.mode = _choice("mode", mode, MODES)
        self.clip = None if clip is None else _real("clip", clip, low=0.0, low_open=True)
        self.averaging = None if averaging is None else _real("averaging", averaging, low=0.0, low_open=True)
        self.damping_method = _choice("damping_method", damping_method, DAMPING_METHODS)
        self.fallback = _choice("fallback", fallback, FALLBACKS)
        self.mc_samples = _positive_int("mc_samples", mc_samples)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.clip_fraction = _real("clip_fraction", clip_fraction, low=0.0, high=1.0, low_open=True)
        self.clip_curvature = _choice("clip_curvature", clip_curvature, CLIP_CURVATURES)
        if fallback_lr is not None:
            fallback_lr = _real("fallback_lr", fallback_lr, low=0.0)
        if (not isinstance(fallback_betas, (tuple, list)) or len(fallback_betas) != 2
                or any(isinstance(b, bool) or not isinstance(b, Real) or not 0.0 <= b < 1.0 for b in fallback_betas)):
            raise ValueError(f"fallback_betas must be two numbers in [0, 1), got {fallback_betas!r}")
        fallback_eps = _real("fallback_eps", fallback_eps, low=0.0, low_open=True)
        self.lm_interval = _positive_int("lm_interval", lm_interval)
        self.lm_decay = _real("lm_decay", lm_decay, low=0.0, high=1.0, low_open=True, high_open=True)
        self.min_damping = _real("min_damping", min_damping, low=0.0)
        self.max_factor_dim = None if max_factor_dim is None else _positive_int("max_factor_dim", max_factor_dim)

        tm, owner, route = resolve_model(model, self.approx)
        info: KFCInfo = tm.kfc
        self.model = tm
        self.layers: list[KFCLayer] = list(info.layers)
        # a model compiled with the kfc backend: layers join info.layers when dynamo compiles (_sync_layers)
        self._layers_version = getattr(info, "version", None)
        pending = self._layers_version is not None and not info.graphs
        if not self.layers and not pending:
            if fallback is None:
                raise ValueError(f"{type(owner).__name__} has no layer KFC can precondition and fallback=None: "
                                 "nothing would be trained (use fallback='sgd' or 'adam')")
            warnings.warn(f"{type(owner).__name__} has no layer KFC can precondition: every parameter is trained "
                          f"by the {fallback!r} fallback", stacklevel=2)
        if route:
            _route(owner, tm)
        self._capture = info.state
        # statistics on a subset: a separate forward of the subset in step() where possible, else the subset's rows
        self._stats_in_step = (self.stats_fraction < 1.0 and self.fisher in ("mc", "type-2")
                               and not _is_dynamo_module(tm))
        self._capture.stats_fraction = None if self.stats_fraction == 1.0 or self._stats_in_step else self.stats_fraction
        self._stats_due = False

        kfc_params: list[torch.nn.Parameter] = []
        for layer in self.layers:
            kfc_params.append(layer.weight)
            if layer.bias is not None:
                kfc_params.append(layer.bias)
        covered = {id(p) for p in kfc_params}
        rest = [p for p in owner.parameters() if p.requires_grad and id(p) not in covered]
        names = {id(p): n for n, p in owner.named_parameters()}
        self.fallback_names = [names.get(id(p), "?") for p in rest] if fallback is not None else []
        if rest and fallback is None:
            warnings.warn(f"fallback=None: {len(rest)} parameter tensor(s) outside KFC are not trained: "
                          f"{[names.get(id(p), '?') for p in rest][:8]}", stacklevel=2)
        groups = []
        common = dict(lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay)
        if kfc_params or pending:
            groups.append({"params": kfc_params, "role": "kfc", **common})
        if rest and fallback is not None:
            flr = fallback_lr if fallback_lr is not None else (lr if fallback == "sgd" else 1e-3)
            groups.append({"params": rest, "role": "fallback", **common, "lr": flr,
                           "betas": tuple(float(b) for b in fallback_betas), "eps": fallback_eps})
        if not groups:
            raise ValueError("the model has no trainable parameter")
        self._init_done = False
        super().__init__(groups, common)
        self._init_done = True

        self._step_count = 0
        self._layouts = [self._layout_of(layer) for layer in self.layers]
        self._running: list[RunningFactors | None] = [None] * len(self.layers)
        self._frozen = [False] * len(self.layers)
        self._stale: set[int] = set()
        self._inverse: dict[int, LayerInverse] = {}
        self._buckets = None
        self._scale = 1.0
        self._armed = False
        self._warned: set[str] = set()
        self._owner_params = [p for p in owner.parameters()]
        self._fisher_products = fvp.FisherProducts(owner if _is_dynamo_module(tm) else tm, self.loss_spec)
        self.last_step: dict = {}
        if self.averaging is not None:
            for group in self.param_groups:
                for p in group["params"]:
                    self.state[p]["average"] = p.detach().clone()
        self._arm_for(1)

    # -- public helpers ------------------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_init_done", False):
            raise NotImplementedError("KFC manages its parameter groups itself (KFC layers and the fallback)")
        super().add_param_group(param_group)

    @property
    def steps(self) -> int:
        """Number of completed ``step()`` calls."""
        return self._step_count

    def _sync_layers(self) -> None:
        """Follow a live registry (kfc backend): layers found since the last call join the KFC group (their
        parameters leave the fallback), layers dropped leave it; per-layer state follows its layer."""
        info = self.model.kfc
        version = getattr(info, "version", None)
        if version is None or version == self._layers_version:
            return
        self._layers_version = version
        new = list(info.layers)
        old = {id(layer): i for i, layer in enumerate(self.layers)}
        moved = {old[id(layer)]: j for j, layer in enumerate(new) if id(layer) in old}
        running, frozen = [None] * len(new), [False] * len(new)
        for i, j in moved.items():
            running[j], frozen[j] = self._running[i], self._frozen[i]
        self._running, self._frozen = running, frozen
        self._inverse = {moved[i]: inv for i, inv in self._inverse.items() if i in moved}
        self._stale = {moved[i] for i in self._stale if i in moved}
        self._buckets = None
        self.layers = new
        self._layouts = [self._layout_of(layer) for layer in new]
        kfc_params = [p for layer in new for p in (layer.weight, layer.bias) if p is not None]
        covered = {id(p) for p in kfc_params}
        kg = self._kfc_group()
        if kg is None:
            kg = {**self.defaults, "params": [], "role": "kfc"}
            self.param_groups.insert(0, kg)
        kg["params"] = kfc_params
        fg = self._fallback_group()
        if fg is not None:
            fg["params"] = [p for p in self._owner_params if p.requires_grad and id(p) not in covered]
            names = {id(p): n for n, p in self.model._orig_mod.named_parameters()}
            self.fallback_names = [names.get(id(p), "?") for p in fg["params"]]

    def _layout_of(self, layer: KFCLayer) -> Layout:
        return Layout.of(layer.groups, layer.a_dim, layer.g_dim, self.max_factor_dim)

    def _layer_index(self, name: str) -> int:
        self._sync_layers()
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(f"no KFC layer named {name!r}; layers: {[l.name for l in self.layers]}")

    def factors(self, name: str) -> Factors | None:
        """Current moving averages (Ω, Γ) of a layer (2-D, or stacked per group; with ``max_factor_dim`` blocks, the
        dense block-diagonal matrices they stand for); None before any statistics."""
        i = self._layer_index(name)
        rf = self._running[i]
        if rf is None:
            return None
        A, G = self._layouts[i].to_dense(rf.A, rf.G) if self._layouts[i].blocked else (rf.A, rf.G)
        return Factors(public_view(A).clone(), public_view(G).clone())

    def set_factors(self, name: str, A: torch.Tensor, G: torch.Tensor, frozen: bool = False) -> None:
        """Replace a layer's factors (e.g. an estimate on the full data set before training, KFC-S Alg. 1).

        Later statistics keep averaging into them unless ``frozen``, which stops collecting for this layer.
        The inverses are recomputed at the next step. A layer with block-diagonal factors (``max_factor_dim``)
        keeps only the diagonal blocks of the given dense factors.
        """
        i = self._layer_index(name)
        layer = self.layers[i]
        dtype = torch.float64 if layer.weight.dtype == torch.float64 else torch.float32
        shapes = ((layer.groups, layer.a_dim, layer.a_dim), (layer.groups, layer.g_dim, layer.g_dim))
        out = []
        for t, shape, what in ((A, shapes[0], "A"), (G, shapes[1], "G")):
            t = torch.as_tensor(t)
            if t.dim() == 2:
                t = t.unsqueeze(0)
            if tuple(t.shape) != shape:
                raise ValueError(f"{what} for layer {name!r} must have shape {shape} (or 2-D when ungrouped), "
                                 f"got {tuple(t.shape)}")
            out.append(t.detach().to(dtype=dtype, device=layer.weight.device).clone())
        if self._layouts[i].blocked:
            out = list(self._layouts[i].to_blocks(*out))
        self._running[i] = RunningFactors(out[0], out[1], updates=1)
        self._frozen[i] = bool(frozen)
        self._stale.add(i)
        self._arm_for(self._step_count + 1)

    def precondition(self, grads: dict | None = None) -> dict[torch.Tensor, torch.Tensor]:
        """F̂⁻¹∇h for the KFC parameters with the current inverses (∇h = ``.grad`` + weight_decay·θ by default, or
        ``grads[param]``). Layers without factors yet are returned unpreconditioned."""
        self._sync_layers()
        group = self._kfc_group()
        if group is None:
            return {}
        self._refresh_inverses(None, group["damping"] + group["weight_decay"])
        mats = self._grad_matrices(group["weight_decay"], grads)
        return self._natural(mats)

    def averaged_parameters(self) -> list[torch.Tensor]:
        """The averaged iterates θ̄, in the order of ``[p for g in param_groups for p in g["params"]]``."""
        if self.averaging is None:
            raise RuntimeError("iterate averaging is off: construct KFC with averaging=tau")
        return [self.state[p]["average"] for g in self.param_groups for p in g["params"]]

    @contextlib.contextmanager
    def swap_averaged(self) -> Iterator[None]:
        """Inside the block the parameters hold the averaged iterates θ̄ (e.g. for evaluation)."""
        if self.averaging is None:
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
                for p, s in zip(params, saved):
                    p.copy_(s)

    # -- statistics -----------------------------------------------------------------------------------------------
    def _arm_for(self, k: int) -> None:
        """Arm the capture taps if step k is a statistics step, otherwise disarm them."""
        st = self._capture
        layers_pending = self._layers_version is not None and not self._frozen  # kfc backend, nothing compiled
        due = (k - 1) % self.stats_every == 0 and (any(not f for f in self._frozen) or layers_pending)
        self._stats_due = due and self._stats_in_step
        if not due or self._stats_in_step:
            if self._armed:
                st.disarm()
            self._armed = False
            return
        st.reset()
        st.ema, st.blocks = self._ema_targets(), self._block_targets()
        fisher_pass = self._fisher_pass if self.fisher in ("mc", "type-2") else None
        st.arm(inputs=True, grads=self.fisher == "empirical", batch_mean=self.loss_spec.reduction == "mean",
               fisher_pass=fisher_pass)
        self._armed = True

    def _fisher_pass(self, f: torch.Tensor) -> None:
        st = self._capture
        # retain_graph through a kfc-backend graph: it is compiled without AOT donated buffers, and AOT's runtime
        # check reads the same flag (compile/backend.py)
        with torch._functorch.config.patch(donated_buffer=False):
            for v in output_gradients(self.loss_spec, self.fisher, f, None, self.mc_samples, self.generator):
                with st.backward_pass(inputs=False, grads=True):
                    torch.autograd.grad(f, [st.slot], v, retain_graph=True, allow_unused=True)

    def _collect_statistics(self) -> int:
        """Fold the statistics recorded in the user's pass into the moving averages; returns how many layers were
        updated."""
        st = self._capture
        if not self._armed:
            return 0
        st.end_pass()
        n = st.n_examples
        batch = st.take(n) if n > 0 else {}
        st.reset()
        st.disarm()
        self._armed = False
        return self._fold(batch)

    def _statistics_pass(self) -> int:
        """Statistics from a separate forward of the batch's leading subset and its sampled-target backward(s):
        Ω in the first backward, Γ in all; no weight gradients (the backward targets only the taps' slot)."""
        st = self._capture
        saved = st.last_inputs
        inputs = batch_subset(saved, self.stats_fraction)
        st.reset()
        st.ema, st.blocks = self._ema_targets(), self._block_targets()
        try:
            with torch.enable_grad(), st.armed_forward():
                f = forward_with_private_buffers(self.model, inputs)
        finally:
            st.last_inputs = saved  # the output tap saw the subset
        st.n_examples = f.shape[0]
        vs = list(output_gradients(self.loss_spec, self.fisher, f, None, self.mc_samples, self.generator))
        for i, v in enumerate(vs):
            with st.backward_pass(inputs=i == 0, grads=True):
                torch.autograd.grad(f, [st.slot], v, retain_graph=i + 1 < len(vs), allow_unused=True)
        return self._fold(st.take())

    def _ema_targets(self) -> dict[int, tuple[torch.Tensor, float]]:
        """Running Ω and the next ε of every collecting layer: the statistics kernels average into them directly."""
        return {i: (rf.A, rf.next_eps(self.stat_decay)) for i, rf in enumerate(self._running)
                if rf is not None and not self._frozen[i]}

    def _block_targets(self) -> dict[int, tuple[int, int]]:
        """(Ω blocks, Γ blocks) of every layer with block-diagonal factors."""
        return {i: (lay.a_blocks, lay.g_blocks) for i, lay in enumerate(self._layouts) if lay.blocked}

    def _fold(self, batch: dict[int, Factors]) -> int:
        updated = 0
        for i, f in batch.items():
            if self._frozen[i]:
                continue
            rf = self._running[i]
            if rf is None:  # the first update has ε = 0: the batch factors become the average (no copy)
                self._running[i] = RunningFactors(f.A, f.G, updates=1)
            else:
                rf.update(f, self.stat_decay)
            updated += 1
        return updated

    # -- inverses -------------------------------------------------------------------------------------------------
    def _refresh_inverses(self, k: int | None, eta: float) -> None:
        """Recompute the inverses when due at step k (steps 1–3 and every inverse_every steps), for layers whose
        factors are new or were replaced, and rescale them when (η, scale) changed; k=None: only the latter.

        Factors with non-finite entries (an overflowing statistics pass: e.g. train-mode BatchNorm over a tiny
        statistics subset) are not inverted: their moving averages restart at the next statistics step, the layer
        keeps its last inverse, and a RuntimeWarning names it."""
        due = k is not None and (k <= 3 or k % self.inverse_every == 0)
        changed = False
        for i, rf in enumerate(self._running):
            if rf is None:
                continue
            name = self.layers[i].name
            inv = self._inverse.get(i)
            recompute = due or inv is None or i in self._stale
            if (recompute or inv.eta != eta or inv.scale != self._scale) and not (
                    bool(torch.isfinite(rf.A).all()) and bool(torch.isfinite(rf.G).all())):
                self._running[i] = None
                warnings.warn(f"KFC layer {name!r}: its factors are not finite (inf/NaN in the statistics pass); "
                              "their moving averages restart at the next statistics step and the layer keeps its "
                              "last inverse" + ("" if inv is not None else " (none yet: unpreconditioned)"),
                              RuntimeWarning, stacklevel=4)
                continue
            if recompute:
                self._inverse[i] = compute_inverse(self.damping_method, rf.A, rf.G, eta, self._scale, name,
                                                   self._layouts[i])
                changed = True
            elif inv.eta != eta or inv.scale != self._scale:
                self._inverse[i] = rescale_inverse(inv, eta, self._scale, rf.A, rf.G, name)
                changed = True
        self._stale.clear()
        if changed or self._buckets is None:
            self._buckets = build_buckets(self._inverse)

    # -- preconditioned gradients ---------------------------------------------------------------------------------
    def _kfc_group(self) -> dict | None:
        return next((g for g in self.param_groups if g["role"] == "kfc"), None)

    def _fallback_group(self) -> dict | None:
        return next((g for g in self.param_groups if g["role"] == "fallback"), None)

    def _grad_matrices(self, weight_decay: float, grads: dict | None = None) -> dict[int, torch.Tensor]:
        mats = {}
        for i, layer in enumerate(self.layers):
            override = None
            if grads is not None:
                override = (grads.get(layer.weight), grads.get(layer.bias) if layer.bias is not None else None)
            m = grad_matrix(layer, weight_decay, override)
            if m is not None:
                mats[i] = m
        return mats

    def _natural(self, mats: dict[int, torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        """Per parameter: F̂⁻¹ applied to the layer's gradient matrix (fp32/fp64, the parameter's shape)."""
        with_inv = {i: m for i, m in mats.items() if i in self._inverse}
        U = apply_buckets(self._buckets or [], with_inv)
        out: dict[torch.Tensor, torch.Tensor] = {}
        for i, m in mats.items():
            layer = self.layers[i]
            if i not in U:
                if "nofactors" not in self._warned:
                    self._warned.add("nofactors")
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

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One optimizer step (see the module docstring). ``closure`` (optional) re-evaluates the loss, calls
        ``backward()`` and returns the loss; adaptive mode calls it a second time after the update on
        Levenberg–Marquardt steps (the parameters' ``.grad`` then hold the gradient at the new point)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self._step_count + 1
        self._sync_layers()
        self._collect_statistics()
        if self._stats_due:
            self._statistics_pass()
            self._stats_due = False
        inputs = self._capture.last_inputs
        n = inputs[0].shape[0] if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() else 1
        self._scale = 1.0 if self.loss_spec.reduction == "mean" else float(n)

        kg, fg = self._kfc_group(), self._fallback_group()
        info: dict = {"step": k}
        if kg is not None:
            self._refresh_inverses(k, kg["damping"] + kg["weight_decay"])
            nat = self._natural(self._grad_matrices(kg["weight_decay"]))
        else:
            nat = {}
        sgd_fallback = fg is not None and self.fallback == "sgd"
        if self.mode == "pre":
            self._step_pre(kg, fg if sgd_fallback else None, nat, info)
        else:
            self._step_adaptive(kg, fg if sgd_fallback else None, nat, info, loss, closure, k)
        if fg is not None and self.fallback == "adam":
            self._step_adam(fg)
        if self.averaging is not None:
            xi = math.exp(-1.0 / self.averaging)
            for g in self.param_groups:
                for p in g["params"]:
                    self.state[p]["average"].mul_(xi).add_(p.detach(), alpha=1.0 - xi)
        self._step_count = k
        self.last_step = info
        self._arm_for(k + 1)
        return loss

    def _sgd_direction(self, group: dict) -> dict[torch.Tensor, torch.Tensor]:
        wd = group["weight_decay"]
        out = {}
        for p in group["params"]:
            if p.grad is not None:
                out[p] = p.grad + wd * p.detach() if wd else p.grad
        return out

    def _fisher_quadratic(self, directions: list[dict]) -> torch.Tensor:
        """Gram matrix (fp64) of the exact mini-batch Fisher of the objective among ``directions``."""
        st = self._capture
        inputs = batch_subset(st.last_inputs, self.clip_fraction)
        saved = st.last_inputs
        try:
            f, jv = self._fisher_products.outputs_and_jvps(inputs, directions)
        finally:
            st.last_inputs = saved
        return fvp.gram(self.loss_spec, f, jv, self._scale)

    def _step_pre(self, kg, fg, nat, info) -> None:
        v: dict[torch.Tensor, tuple[torch.Tensor, float]] = {}  # param -> (update direction, momentum)
        if kg is not None:
            lr = kg["lr"]
            for p, u in nat.items():
                v[p] = (u.mul(-lr), kg["momentum"])
        if fg is not None:
            for p, g in self._sgd_direction(fg).items():
                v[p] = (g.mul(-fg["lr"]), fg["momentum"])
        if not v:
            return
        scale = None
        if self.clip is not None:
            wd = kg["weight_decay"] if kg is not None else fg["weight_decay"]
            if self.clip_curvature == "exact":
                nu = float(self._fisher_quadratic([{p: t for p, (t, _) in v.items()}])[0, 0])
                if wd:
                    nu += wd * sum(float(t.double().pow(2).sum()) for t, _ in v.values())
            else:  # vᵀF̂v = lr²·uᵀ∇h with u = F̂⁻¹∇h (F̂ holds the damping and the weight decay)
                nu = 0.0
                if kg is not None:
                    kwd = kg["weight_decay"]
                    for p, u in nat.items():
                        g = p.grad if p.grad is not None else torch.zeros_like(p)
                        g = g + kwd * p.detach() if kwd else g
                        nu += kg["lr"] ** 2 * float((u.double() * g.double()).sum())
                if fg is not None and fg["weight_decay"]:
                    nu += fg["weight_decay"] * sum(float(v[p][0].double().pow(2).sum()) for p in fg["params"]
                                                   if p in v)
            info["nu"] = nu
            if not math.isfinite(nu):  # inf/NaN in the gradient or the model's output: no safe step size exists
                info["skipped"] = True
                warnings.warn(f"KFC step {info['step']} skipped: the clipping statistic ν is {nu} (the gradient "
                              "or the model output is not finite); parameters and momentum are unchanged",
                              RuntimeWarning, stacklevel=3)
                return
            if nu > self.clip:
                scale = math.sqrt(self.clip / nu)
            info["clip_scale"] = 1.0 if scale is None else scale
        # p ← p + (μ·buf + s·v): one foreach pass per momentum value (KFC group, fallback group)
        by_mu: dict[float, tuple[list, list, list]] = {}
        for p, (t, mu) in v.items():
            state = self.state[p]
            buf = state.get("momentum_buffer")
            t = t.to(p.dtype)
            if buf is None:
                state["momentum_buffer"] = t.mul(scale) if scale is not None else t.clone()
                p.add_(state["momentum_buffer"])
                continue
            params, bufs, ts = by_mu.setdefault(mu, ([], [], []))
            params.append(p), bufs.append(buf), ts.append(t)
        for mu, (params, bufs, ts) in by_mu.items():
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, ts, alpha=1.0 if scale is None else scale)
            torch._foreach_add_(params, bufs)

    def _step_adaptive(self, kg, fg, nat, info, loss, closure, k) -> None:
        delta: dict[torch.Tensor, torch.Tensor] = {}
        grad_h: dict[torch.Tensor, torch.Tensor] = {}
        groups = []
        if kg is not None:
            wd = kg["weight_decay"]
            for p, u in nat.items():
                delta[p] = -u
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                grad_h[p] = g + wd * p.detach() if wd else g
            groups.append(kg)
        if fg is not None:
            for p, g in self._sgd_direction(fg).items():
                delta[p] = -g
                grad_h[p] = g
            groups.append(fg)
        if not delta:
            return
        lead = groups[0]
        lam, wd, lr = lead["damping"], lead["weight_decay"], lead["lr"]
        prev = {p: self.state[p]["momentum_buffer"] for p in delta if "momentum_buffer" in self.state[p]}
        use_mu = lead["momentum"] > 0 and len(prev) > 0
        dirs = [delta, prev] if use_mu else [delta]

        def dot(a: dict, b: dict) -> float:
            return sum(float((a[p].double() * b[p].double()).sum()) for p in a if p in b and a[p] is not None)

        C = self._fisher_quadratic(dirs)
        tik = torch.tensor([[dot(x, y) for y in dirs] for x in dirs], dtype=torch.float64)
        C = C + (lam + wd) * tik
        d = torch.tensor([dot(grad_h, x) for x in dirs], dtype=torch.float64)
        alpha, mu = fvp.solve_alpha_mu(C, d)
        coef = torch.tensor([alpha, mu][:len(dirs)], dtype=torch.float64) * lr
        model_change = float(coef @ d + 0.5 * coef @ C @ coef)  # M(δ) − M(0)
        info.update(alpha=alpha, mu=mu, C=C, d=d, model_change=model_change, damping=lam)

        lm_due = k % self.lm_interval == 0
        h0 = None
        if lm_due:
            if closure is None or loss is None:
                if "lm" not in self._warned:
                    self._warned.add("lm")
                    warnings.warn("mode='adaptive' adapts the damping (Levenberg–Marquardt) only when step() gets a "
                                  "closure that re-evaluates the loss; the damping stays fixed", stacklevel=3)
                lm_due = False
            else:
                h0 = _as_float(loss) + self._l2(groups)
        for p, t in delta.items():
            upd = t.mul(lr * alpha)
            if use_mu and p in prev:
                upd = upd.add(prev[p], alpha=lr * mu)
            upd = upd.to(p.dtype)
            self.state[p]["momentum_buffer"] = upd
            p.add_(upd)
        if lm_due:
            with torch.enable_grad():
                h1 = _as_float(closure()) + self._l2(groups)
            rho = (h0 - h1) / -model_change if model_change < 0 else float("-inf")
            new = lam
            if rho > 0.75:
                new = lam * self.lm_decay
            elif rho < 0.25:
                new = lam / self.lm_decay
            new = max(new, self.min_damping) if lam > 0 or new > 0 else new
            for g in self.param_groups:
                g["damping"] = new
            info.update(rho=rho, damping=new)

    @staticmethod
    def _l2(groups) -> float:
        return sum(0.5 * g["weight_decay"] * float(p.detach().double().pow(2).sum())
                   for g in groups if g["weight_decay"] for p in g["params"])

    def _step_adam(self, group: dict) -> None:
        beta1, beta2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad + wd * p.detach() if wd else p.grad
            state = self.state[p]
            if "exp_avg" not in state:
                state["adam_step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["adam_step"] += 1
            t = state["adam_step"]
            m, s = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, 1 - beta1)
            s.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bc1 = 1 - beta1 ** t
            bc2 = 1 - beta2 ** t
            denom = (s.sqrt() / math.sqrt(bc2)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / bc1)

    # -- state -----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["kfc"] = {
            "version": _STATE_VERSION,
            "step": self._step_count,
            "mode": self.mode,
            "damping_method": self.damping_method,
            "scale": self._scale,
            "warned": sorted(self._warned),
            "layers": [{
                "name": layer.name,
                "factors": None if rf is None else {"A": rf.A.clone(), "G": rf.G.clone(), "updates": rf.updates},
                "frozen": self._frozen[i],
                "inverse": self._inverse[i].state() if i in self._inverse else None,
            } for i, (layer, rf) in enumerate(zip(self.layers, self._running))],
            "generator": None if self.generator is None else self.generator.get_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        kfc = state_dict.get("kfc")
        if kfc is None:
            raise ValueError("not a KFC state_dict (no 'kfc' entry)")
        if kfc.get("version") != _STATE_VERSION:
            raise ValueError(f"unsupported KFC state_dict version {kfc.get('version')!r}")
        saved_names = [entry["name"] for entry in kfc["layers"]]
        if saved_names != [layer.name for layer in self.layers]:
            raise ValueError(f"state_dict layers {saved_names} do not match this optimizer's "
                             f"{[layer.name for layer in self.layers]}")
        if kfc["damping_method"] != self.damping_method:
            raise ValueError(f"state_dict was saved with damping_method={kfc['damping_method']!r}, "
                             f"this optimizer uses {self.damping_method!r}")
        for layout, entry in zip(self._layouts, kfc["layers"]):
            fac = entry["factors"]
            if fac is not None and (tuple(fac["A"].shape), tuple(fac["G"].shape)) != layout.shapes():
                raise ValueError(f"state_dict factors of layer {entry['name']!r} have shapes "
                                 f"{(tuple(fac['A'].shape), tuple(fac['G'].shape))}, this optimizer stores "
                                 f"{layout.shapes()} (saved with another max_factor_dim?)")
        super().load_state_dict({k: v for k, v in state_dict.items() if k != "kfc"})
        self._step_count = int(kfc["step"])
        self._scale = float(kfc["scale"])
        self._warned = set(kfc.get("warned", ()))
        self._inverse = {}
        for i, (layer, entry) in enumerate(zip(self.layers, kfc["layers"])):
            dev = layer.weight.device
            fac = entry["factors"]
            self._running[i] = None if fac is None else RunningFactors(fac["A"].to(dev).clone(),
                                                                       fac["G"].to(dev).clone(), int(fac["updates"]))
            self._frozen[i] = bool(entry["frozen"])
            if entry["inverse"] is not None:
                self._inverse[i] = LayerInverse.from_state(entry["inverse"], dev)
        self._stale = set()
        self._buckets = build_buckets(self._inverse)
        if kfc["generator"] is not None:
            if self.generator is None:
                warnings.warn("the state_dict has an MC generator state but this optimizer has no generator: "
                              "it is ignored (sampling uses the global RNG)", stacklevel=2)
            else:
                self.generator.set_state(kfc["generator"])
        self._arm_for(self._step_count + 1)
