"""``kc.KFC``'s constructor arguments, validated once: the checks, their error messages, and the record they fill.

The validators raise ``ValueError`` naming the argument (``"lr must be >= 0.0, got -1"``); ``KFCOptions`` runs
them in the constructor's argument order, so the first invalid argument is the one reported.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Real

import torch
from torch import nn

from kfc_compile.curvature.distributed import check_setting
from kfc_compile.curvature.inverses import DAMPING_METHODS
from kfc_compile.curvature.losses import FISHER_TYPES, Loss, loss_spec
from kfc_compile.curvature.statistics import check_approx
from kfc_compile.frontend.select import check_frontend
from kfc_compile.optim.rules import CLIP_SCALINGS, CLIP_TARGETS
from kfc_compile.runtime import subsets

MODES = ("pre", "adaptive")
CLIP_CURVATURES = ("auto", "exact", "factored")
#: ``clip="auto"``: the trust-region constant per (curvature, clip_on), the bound ν ≤ clip·lr with the default
#: ``clip_scaling="lr"`` (docs/algorithm.md §6.2: the factored ν of the applied step measures the optimizer's own
#: damped F̂, which underestimates the curvature along the step: 6× on digits' first step; 0.2 was measured best)
CLIP_DEFAULTS = {("exact", "step"): 30.0, ("exact", "update"): 30.0, ("factored", "step"): 0.2,
                 ("factored", "update"): 30.0}
FALLBACKS = ("sgd", "adam", None)
STATS_FRACTION, CLIP_FRACTION = 0.125, 0.25  # the default subsets' shares (at least runtime/subsets.py's floors)


def real(name: str, value: object, *, low: float | None = None, high: float | None = None, low_open: bool = False,
         high_open: bool = False) -> float:
    """``value`` as a float, checked to be a finite real number in [low, high].

    ``low_open`` / ``high_open`` exclude the bound itself.
    """
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (low_open and v == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and (v > high or (high_open and v == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value!r}")
    return v


def fraction(name: str, value: object, default: float, floor: int) -> float:
    """A subset's share of the batch in (0, 1]; None: ``default`` with the defaults' ``floor`` (runtime/subsets.py)."""
    if value is None:
        return subsets.default_share(default, floor)
    return real(name, value, low=0.0, high=1.0, low_open=True)


def positive_int(name: str, value: object) -> int:
    """``value`` checked to be an int >= 1 (a bool is not one)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def choice(name: str, value: object, options: tuple) -> object:
    """``value`` checked to be one of ``options``."""
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}: expected one of {tuple(options)}")
    return value


def betas(name: str, value: object) -> tuple[float, float]:
    """Adam's (β₁, β₂): two real numbers in [0, 1)."""
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or any(isinstance(b, bool) or not isinstance(b, Real) or not 0.0 <= b < 1.0 for b in value)):
        raise ValueError(f"{name} must be two numbers in [0, 1), got {value!r}")
    return float(value[0]), float(value[1])


def exact_reason(options: KFCOptions) -> str:
    """Why ``clip_curvature="auto"`` resolves to the exact ν ("" where it is the factored ν of the applied step).

    The factored ν of the step is not meaningful for ``adapt_damping`` (True or "auto": its Levenberg–Marquardt
    model needs the model's δᵀFδ) and not available to distributed KFC (``distributed`` set; a DDP / FSDP2 model:
    :func:`model_curvature`), where a rank may not hold every inverse. ``mode="adaptive"`` has no trust region
    (its α/μ use the exact Fisher Gram whatever this says): "exact", its value before the factored default.
    """
    if options.mode == "adaptive":
        return "mode='adaptive'"
    if options.adapt_damping is True or options.adapt_damping == "auto":
        return f"adapt_damping={options.adapt_damping!r}"
    return distributed_reason(options.distributed)


def distributed_reason(setting: object) -> str:
    """"distributed=..." where ``setting`` turns distributed KFC on, else ""."""
    return "" if setting is None or setting is False else f"distributed={setting!r}"


def model_curvature(model: nn.Module, clip_curvature: object, clip_on: object, clip: object, mode: object) -> object:
    """``clip_curvature`` for ``KFC(model)``: "exact" for "auto" where the model is distributed (DDP or FSDP2).

    An explicit ``"factored"`` on the applied step (``clip_on`` "step" or "auto") of a distributed model is a
    ``ValueError`` naming the fix: the runtime would otherwise measure the exact ν against the factored constant.
    """
    if (clip_curvature not in ("auto", "factored") or clip is None or clip_on not in ("auto", "step") or mode != "pre"
            or not isinstance(model, nn.Module)):  # not a module: resolve_model names the problem
        return clip_curvature
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    why = ""
    if isinstance(getattr(model, "_orig_mod", model), DistributedDataParallel):
        why = "a DistributedDataParallel model"
    elif any(isinstance(p, DTensor) for p in model.parameters()):
        why = "DTensor (FSDP2) parameters"
    if not why:
        return clip_curvature
    if clip_curvature == "auto":
        return "exact"
    raise ValueError(_declined(f"distributed KFC ({why})"))


def _declined(why: str) -> str:
    return (f"clip_curvature='factored' with clip_on='step' is not available with {why}: a rank may not hold every "
            "inverse; pass clip_curvature='exact' (or leave it at 'auto'), or clip_on='update'")


@dataclass(frozen=True)
class KFCOptions:
    """Every argument of ``kc.KFC`` but the model, validated and normalised (see ``KFC`` for their meaning).

    ``loss`` becomes its ``Loss``. ``lr``, ``momentum``, ``damping``, ``weight_decay`` and the ``fallback_*``
    values only seed ``param_groups``: ``step()`` reads the groups, so a scheduler may change them.
    """

    lr: float
    momentum: float
    damping: float
    weight_decay: float
    stats_every: int
    inverse_every: int
    stat_decay: float
    stats_fraction: float | None
    fisher: str
    loss: Loss | str | nn.Module
    approx: str
    mode: str
    clip: float | str | None
    averaging: float | None
    damping_method: str
    fallback: str | None
    mc_samples: int
    generator: torch.Generator | None
    clip_fraction: float | None
    clip_curvature: str
    fallback_lr: float | None
    fallback_betas: tuple[float, float]
    fallback_eps: float
    lm_interval: int
    lm_decay: float
    min_damping: float
    max_factor_dim: int | None
    max_failures: int | None = 3
    max_skipped_steps: int | None = 5
    memory_budget: int | None = None
    grad_scaler: torch.amp.GradScaler | None = None
    frontend: str = "auto"
    output: Callable[[object], torch.Tensor] | None = None
    distributed: bool | str | None = None
    clip_scaling: str = "fixed"
    clip_on: str = "auto"
    compile_update: bool = False
    warmup: int = 0
    adapt_damping: bool | str = False

    def __post_init__(self) -> None:
        def put(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        put("_clip_auto", self.clip == "auto")

        put("lr", real("lr", self.lr, low=0.0))
        put("momentum", real("momentum", self.momentum, low=0.0, high=1.0, high_open=True))
        put("damping", real("damping", self.damping, low=0.0))
        put("weight_decay", real("weight_decay", self.weight_decay, low=0.0))
        put("stats_every", positive_int("stats_every", self.stats_every))
        put("inverse_every", positive_int("inverse_every", self.inverse_every))
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"warmup must be a non-negative integer (steps with statistics and inverses every "
                             f"step; 0: none), got {self.warmup!r}")
        put("stat_decay", real("stat_decay", self.stat_decay, low=0.0, high=1.0))
        put("stats_fraction", fraction("stats_fraction", self.stats_fraction, STATS_FRACTION, subsets.MIN_STATS_SUBSET))
        choice("fisher", self.fisher, FISHER_TYPES)
        if not isinstance(self.loss, Loss):
            put("loss", loss_spec(self.loss))
        check_approx(self.approx)
        choice("mode", self.mode, MODES)
        if self.clip is not None and self.clip != "auto":
            put("clip", real("clip", self.clip, low=0.0, low_open=True))
        if self.averaging is not None:
            put("averaging", real("averaging", self.averaging, low=0.0, low_open=True))
        choice("damping_method", self.damping_method, DAMPING_METHODS)
        choice("fallback", self.fallback, FALLBACKS)
        put("mc_samples", positive_int("mc_samples", self.mc_samples))
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(self.generator).__name__}")
        put("clip_fraction", fraction("clip_fraction", self.clip_fraction, CLIP_FRACTION, subsets.MIN_CLIP_SUBSET))
        choice("clip_curvature", self.clip_curvature, CLIP_CURVATURES)
        choice("clip_scaling", self.clip_scaling, CLIP_SCALINGS)
        choice("clip_on", self.clip_on, CLIP_TARGETS)
        if not isinstance(self.adapt_damping, bool) and self.adapt_damping != "auto":
            raise ValueError(f"adapt_damping must be True, False or 'auto', got {self.adapt_damping!r}")
        if self.clip_on == "auto":  # the applied step for both curvatures (docs/algorithm.md §6.2)
            put("clip_on", "step")
        if self.clip_curvature == "auto":
            put("clip_curvature", "exact" if exact_reason(self) else "factored")
        elif (self.clip_curvature == "factored" and self.clip_on == "step" and self.clip is not None
              and self.mode == "pre" and distributed_reason(self.distributed)):
            raise ValueError(_declined(distributed_reason(self.distributed)))
        if self.clip == "auto":
            put("clip", CLIP_DEFAULTS[self.clip_curvature, self.clip_on])
        step_region = self.clip is not None and self.clip_on == "step" and self.clip_curvature == "exact"
        if self.adapt_damping is True and self.mode == "pre" and not step_region:
            raise ValueError("adapt_damping=True needs KFC-pre's trust region on the applied step with the exact "
                             "Fisher (clip set, clip_on='step' or 'auto', clip_curvature='exact' or 'auto'): its "
                             "ν is the model's δᵀFδ")
        if self.adapt_damping == "auto":  # adapt when step() gets a closure, where the trust region allows it
            put("adapt_damping", "auto" if step_region else False)
        if self.fallback_lr is not None:
            put("fallback_lr", real("fallback_lr", self.fallback_lr, low=0.0))
        put("fallback_betas", betas("fallback_betas", self.fallback_betas))
        put("fallback_eps", real("fallback_eps", self.fallback_eps, low=0.0, low_open=True))
        put("lm_interval", positive_int("lm_interval", self.lm_interval))
        put("lm_decay", real("lm_decay", self.lm_decay, low=0.0, high=1.0, low_open=True, high_open=True))
        put("min_damping", real("min_damping", self.min_damping, low=0.0))
        if self.max_factor_dim is not None:
            put("max_factor_dim", positive_int("max_factor_dim", self.max_factor_dim))
        for name in ("max_failures", "max_skipped_steps", "memory_budget"):
            if getattr(self, name) is not None:
                put(name, positive_int(name, getattr(self, name)))
        if self.grad_scaler is not None and not isinstance(self.grad_scaler, torch.amp.GradScaler):
            raise ValueError(f"grad_scaler must be a torch.amp.GradScaler or None, got "
                             f"{type(self.grad_scaler).__name__}")
        check_frontend(self.frontend)
        if self.output is not None and not callable(self.output):
            raise ValueError(f"output must be a callable (model output -> logits tensor) or None, got "
                             f"{type(self.output).__name__}")
        check_setting(self.distributed)
        if not isinstance(self.compile_update, bool):
            raise ValueError(f"compile_update must be True or False, got {self.compile_update!r}")

    @property
    def clip_auto(self) -> bool:
        """Whether ``clip`` is :data:`CLIP_DEFAULTS`' constant for the resolved curvature (``clip="auto"``)."""
        return self._clip_auto

    @property
    def fallback_learning_rate(self) -> float:
        """The fallback group's initial lr: ``fallback_lr``, else ``lr`` for SGD and 1e-3 for Adam."""
        if self.fallback_lr is not None:
            return self.fallback_lr
        return self.lr if self.fallback == "sgd" else 1e-3
