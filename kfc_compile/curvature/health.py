"""The health record of a KFC run (``opt.health``): which faults happened, how often, and what was done.

Counted, and each kind logged (``logging``, logger ``kfc_compile.curvature.health``, level WARNING) the first time
it happens in a run:

* ``skipped_steps[cause]``: ``step()`` calls whose update was not applied, by the first cause found:
  ``"scaler"`` (a ``torch.amp.GradScaler`` found inf/NaN in its scaled gradients), ``"loss"`` (the closure's loss
  is not finite), ``"gradient"`` (a ``.grad`` of a KFC or fallback parameter is not finite: what a non-finite
  model output produces), ``"update"`` (the clipping statistic ν or the preconditioned update is not finite with
  finite gradients). ``consecutive_skips`` is the current run of skipped calls.
* ``dropped_statistics[layer]``: statistics steps whose batch factors of that layer had non-finite entries (or
  whose model output was not finite, so no Fisher targets could be drawn): dropped, not averaged in.
* ``restarted_factors[layer]``: moving averages found non-finite before an inverse refresh (e.g. replaced by
  ``set_factors``): they restart at the layer's next statistics step.
* ``retried_decompositions[layer]``: fp32 Cholesky / eigh failures redone in float64 (successfully or not).
* ``failed_decompositions[layer]``: refreshes whose decomposition failed in float64 too (the layer kept its
  previous inverse, or got the damped identity's before its first); ``consecutive_failures[layer]`` the current
  run (the optimizer raises after ``max_failures``).
* ``restored_buffers[buffer]``: skipped steps after which a floating-point buffer of the model (a BatchNorm
  running statistic updated by the non-finite forward) was not finite and was restored to its value after the
  last applied step.
* ``last_damping``: the damping of the last applied step (adaptive mode changes it).

The record holds only ints, floats and strings, so it is part of ``state_dict`` and loads with
``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)
# a library's loggers stay silent unless the application configures logging (no "last resort" stderr output)
logging.getLogger("kfc_compile").addHandler(logging.NullHandler())

SKIP_CAUSES = ("scaler", "loss", "gradient", "update")
_PER_LAYER = ("dropped_statistics", "restarted_factors", "retried_decompositions", "failed_decompositions",
              "restored_buffers", "consecutive_failures")


@dataclass
class Health:
    """Counts of the faults of one run and what was done about them (see the module docstring)."""

    skipped_steps: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_CAUSES, 0))
    consecutive_skips: int = 0
    dropped_statistics: dict[str, int] = field(default_factory=dict)
    restarted_factors: dict[str, int] = field(default_factory=dict)
    retried_decompositions: dict[str, int] = field(default_factory=dict)
    failed_decompositions: dict[str, int] = field(default_factory=dict)
    restored_buffers: dict[str, int] = field(default_factory=dict)
    consecutive_failures: dict[str, int] = field(default_factory=dict)
    last_damping: float | None = None
    streak_causes: dict[str, int] = field(default_factory=dict)  # causes of the current run of skipped steps

    @property
    def total_skipped(self) -> int:
        """All skipped ``step()`` calls."""
        return sum(self.skipped_steps.values())

    @property
    def healthy(self) -> bool:
        """No fault was ever counted."""
        return not (self.total_skipped or any(getattr(self, k) for k in _PER_LAYER[:-1]))

    # -- steps -----------------------------------------------------------------------------------------------------
    def step_skipped(self, cause: str, step: int, detail: str, *, counts_toward_divergence: bool = True) -> int:
        """Count a skipped step; returns the length of the current run of skipped steps that count toward divergence.

        Args:
            cause: one of :data:`SKIP_CAUSES`.
            step: the step that was not applied (for the log).
            detail: what was found (for the log).
            counts_toward_divergence: False for skips that are not a sign of divergence (a GradScaler's).
        """
        if cause not in SKIP_CAUSES:
            raise ValueError(f"unknown skip cause {cause!r}: expected one of {SKIP_CAUSES}")
        if not self.skipped_steps.get(cause):
            log.warning("KFC step %d skipped (%s: %s); parameters, momentum, factors and inverses are unchanged. "
                        "Later skips of this kind are only counted in opt.health.", step, cause, detail)
        self.skipped_steps[cause] = self.skipped_steps.get(cause, 0) + 1
        if counts_toward_divergence:
            self.consecutive_skips += 1
            self.streak_causes[cause] = self.streak_causes.get(cause, 0) + 1
        return self.consecutive_skips

    def step_applied(self, damping: float) -> None:
        """A step's update was applied: the run of skipped steps ends."""
        self.consecutive_skips = 0
        self.streak_causes = {}
        self.last_damping = float(damping)

    # -- statistics and decompositions -----------------------------------------------------------------------------
    def statistics_dropped(self, layer: str, why: str) -> None:
        """A layer's batch statistics were dropped (``why``: what was not finite)."""
        self._bump("dropped_statistics", layer, f"KFC layer {layer!r}: statistics dropped for this step ({why}); "
                                                 "its moving averages are unchanged")

    def factors_restarted(self, layer: str) -> None:
        """A layer's non-finite moving averages were discarded (they restart at its next statistics step)."""
        self._bump("restarted_factors", layer, f"KFC layer {layer!r}: non-finite moving averages discarded; they "
                                                f"restart at its next statistics step")

    def decomposition_retried(self, layer: str, methods: list[str]) -> None:
        """fp32 decompositions (``methods``) of a layer failed and were redone in float64."""
        for method in methods:
            self._bump("retried_decompositions", layer, f"KFC layer {layer!r}: fp32 {method} failed, retried in "
                                                         "float64")

    def decomposition_failed(self, layer: str, error: str) -> int:
        """A layer's decomposition failed in float64 too; returns its number of consecutive failures."""
        self._bump("failed_decompositions", layer, f"KFC layer {layer!r}: {error}; the layer keeps its previous "
                                                    "inverse (the damped identity's before its first)")
        self.consecutive_failures[layer] = self.consecutive_failures.get(layer, 0) + 1
        return self.consecutive_failures[layer]

    def decomposition_succeeded(self, layer: str) -> None:
        """A layer's inverse was recomputed: its run of failures ends."""
        self.consecutive_failures.pop(layer, None)

    def buffer_restored(self, name: str) -> None:
        """A non-finite buffer of the model was restored after a skipped step."""
        self._bump("restored_buffers", name, f"model buffer {name!r} was not finite after a skipped step (its "
                                              "forward saw inf/NaN); restored to its value after the last applied "
                                              "step")

    def _bump(self, kind: str, layer: str, message: str) -> None:
        counts = getattr(self, kind)
        if not counts:
            log.warning("%s. Later faults of this kind are only counted in opt.health.", message)
        counts[layer] = counts.get(layer, 0) + 1

    # -- state -------------------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """The record as plain ints, floats and strings (a ``state_dict`` entry)."""
        return {"skipped_steps": dict(self.skipped_steps), "consecutive_skips": self.consecutive_skips,
                "streak_causes": dict(self.streak_causes), "last_damping": self.last_damping,
                **{k: dict(getattr(self, k)) for k in _PER_LAYER}}

    def load(self, state: dict) -> None:
        """Restore a record saved by :meth:`state`."""
        self.skipped_steps = {**dict.fromkeys(SKIP_CAUSES, 0), **{str(k): int(v) for k, v in
                                                                    state["skipped_steps"].items()}}
        self.consecutive_skips = int(state["consecutive_skips"])
        self.streak_causes = {str(k): int(v) for k, v in state.get("streak_causes", {}).items()}
        damping = state.get("last_damping")
        self.last_damping = None if damping is None else float(damping)
        for k in _PER_LAYER:
            setattr(self, k, {str(n): int(v) for n, v in state.get(k, {}).items()})

    def __str__(self) -> str:
        skipped = ", ".join(f"{c} {n}" for c, n in self.skipped_steps.items() if n) or "none"
        parts = [f"skipped steps: {skipped}"]
        for k in _PER_LAYER[:-1]:
            counts = getattr(self, k)
            if counts:
                parts.append(f"{k.replace('_', ' ')}: {sum(counts.values())} ({', '.join(sorted(counts))})")
        if self.last_damping is not None:
            parts.append(f"last damping {self.last_damping:g}")
        return "; ".join(parts)
