"""Faults in the curvature, caught where they arise: non-finite statistics and failed decompositions.

* :func:`finite_flags`: which of several tensor groups are entirely finite, with one host sync for all of them
  (the statistics of every layer of a step are checked together before any is averaged in).
* :func:`refresh_layer`: one layer's inverse refresh. Non-finite moving averages are not inverted (they restart
  at the layer's next statistics step); a Cholesky / eigh that fails in the factors' dtype is retried in float64
  (``decompositions``); one that fails in float64 too leaves the layer its previous inverse (before its first:
  the damped identity's, ∇h / η) and is counted; ``max_failures`` consecutive failures of a layer raise a
  :class:`DecompositionError` that names the layer, the factors' traces and smallest eigenvalues, and the options
  to change. Without damping (η = 0) a singular factor is the user's error, not a fault: ``SingularFactorError``
  propagates as before, and so does a failed decomposition (there is no damped identity to fall back on).
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from kfc_compile.curvature.comm import all_shards
from kfc_compile.curvature.decompositions import DecompositionError, counting_retries, spectrum_summary
from kfc_compile.curvature.health import Health
from kfc_compile.curvature.inverses import compute_inverse, inverse_kind, rescale_inverse


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """A 0-d bool tensor: every entry of ``t`` is finite (no host sync).

    From ``aminmax`` (NaN propagates to both, ±inf shows in one): a read of ``t`` without the bool temporary of
    ``isfinite(t).all()``, which is an order of magnitude slower on CPU.
    """
    if hasattr(t, "to_local"):  # a DTensor (FSDP2): its shards' flags, combined over the ranks
        return all_shards(all_finite(t.to_local()), t)
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t.detach())
    return torch.isfinite(lo) & torch.isfinite(hi)


def finite_flags(groups: Sequence[Sequence[torch.Tensor]]) -> list[bool]:
    """For each (non-empty) group of tensors, whether all of its entries are finite.

    One host sync in all when the tensors share a device (one per device otherwise): first one check over every
    tensor of every group (the small ones concatenated, :func:`fused_finite_flags`); only when that fails, one
    flag per group.
    """
    groups = [list(ts) for ts in groups]
    if not groups:
        return []
    if len(groups) > 1 and not any(hasattr(t, "to_local") for ts in groups for t in ts):
        if _all_true(fused_finite_flags([t for ts in groups for t in ts])):
            return [True] * len(groups)
    flags = [_conjunction(fused_finite_flags(ts)) for ts in groups]
    if len({f.device for f in flags}) == 1:
        return [bool(f) for f in (torch.stack(flags).tolist() if len(flags) > 1 else [flags[0]])]
    return [bool(f) for f in flags]


def _conjunction(flags: list[torch.Tensor]) -> torch.Tensor:
    """The 0-d "all true" of 0-d bool flags (no host sync; flags on several devices meet on the first one's)."""
    if len(flags) == 1:
        return flags[0]
    device = flags[0].device
    return torch.stack([f.to(device) for f in flags]).all()


def _all_true(flags: list[torch.Tensor]) -> bool:
    """Whether every 0-d bool flag is true: one host sync (one per device when they lie on several)."""
    if len({f.device for f in flags}) > 1:
        return all(bool(f) for f in flags)
    return bool(_conjunction(flags))


#: tensors up to this many entries are checked for inf/NaN together (one copy into one buffer); larger ones alone
SMALL_NUMEL = 1 << 16


def fused_finite_flags(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """0-d bool tensors (no host sync) that together say whether every entry of ``tensors`` is finite.

    The small tensors of a device are read by one ``aminmax`` over their concatenation (a per-tensor check costs
    more in dispatch than in reading; ``cat`` upcasts mixed dtypes, which keeps inf/NaN and creates none); larger
    ones and ``DTensor`` shards are checked alone.
    """
    small: dict[torch.device, list[torch.Tensor]] = {}
    flags = []
    for t in tensors:
        if t.numel() > SMALL_NUMEL or hasattr(t, "to_local"):
            flags.append(all_finite(t))
        else:
            small.setdefault(t.device, []).append(t.detach().reshape(-1))
    flags += [all_finite(torch.cat(ts) if len(ts) > 1 else ts[0]) for ts in small.values()]
    return flags


def restart_factors(s, health: Health, stacklevel: int) -> None:
    """Discard a layer's non-finite moving averages (they restart at its next statistics step), with a warning."""
    s.running = None
    health.factors_restarted(s.layer.name)
    warnings.warn(f"KFC layer {s.layer.name!r}: its factors are not finite (inf/NaN in the statistics pass); "
                  "their moving averages restart at the next statistics step and the layer keeps its last inverse"
                  + ("" if s.inverse is not None else " (none yet: unpreconditioned)"), RuntimeWarning,
                  stacklevel=stacklevel)


def refresh_layer(s, recompute: bool, eta: float, scale: float, method: str, health: Health,
                  max_failures: int | None, inverses: object | None = None) -> bool:
    """Recompute (``recompute``) or rescale one layer's inverse for (η, scale); returns whether it changed.

    Args:
        s: the layer's ``LayerState`` (its ``running`` factors are not None); ``s.inverse`` and ``s.running`` are
            replaced here.
        recompute: a new decomposition is due (schedule, new or replaced factors); otherwise only a changed
            (η, scale) is followed.
        eta: damping + weight decay.
        scale: the curvature scale of the objective.
        method: the damping method.
        health: the run's health record (restarts, retries and failures are counted there).
        max_failures: consecutive failed refreshes of a layer that raise (None: never).
        inverses: what computes and rescales the inverse, with the signatures of ``compute_inverse`` and
            ``rescale_inverse`` as its ``compute`` / ``rescale`` (``sharding.py``: distributed KFC computes it on
            the layer's owner rank only); None: those two functions.

    Raises:
        DecompositionError: the layer's decomposition failed ``max_failures`` times in a row, or failed with η = 0.
        SingularFactorError: η = 0 and a factor is singular.
    """
    rf, inv, name = s.running, s.inverse, s.layer.name
    compute, rescale = (compute_inverse, rescale_inverse) if inverses is None else (inverses.compute,
                                                                                     inverses.rescale)
    if not recompute and inv is not None and inv.eta == eta and inv.scale == scale:
        return False
    if not finite_flags([(rf.A, rf.G)])[0]:
        restart_factors(s, health, stacklevel=6)
        return False
    with counting_retries() as retries:
        try:
            if recompute or inv is None:
                new = compute(method, rf.A, rf.G, eta, scale, name, s.layout)
            else:
                new = rescale(inv, eta, scale, rf.A, rf.G, name)
        except DecompositionError as e:
            if retries:
                health.decomposition_retried(name, list(retries))
            if eta <= 0:
                raise
            failures = health.decomposition_failed(name, str(e))
            if max_failures is not None and failures >= max_failures:
                raise DecompositionError(_failure_message(name, e, rf.A, rf.G, eta, failures, max_failures),
                                         e.what) from e
            if inv is None:
                s.inverse = inverse_kind(method).identity(s.layout, eta, scale, rf.A.dtype, rf.A.device)
                return True
            return False
    if retries:
        health.decomposition_retried(name, list(retries))
    health.decomposition_succeeded(name)
    s.inverse = new
    return True


def _failure_message(name: str, error: DecompositionError, A: torch.Tensor, G: torch.Tensor, eta: float,
                     failures: int, max_failures: int) -> str:
    return (f"KFC layer {name!r}: the decomposition of its {error.what.split(' of layer')[0]} failed "
            f"{failures} times in a row (max_failures={max_failures}), in float32 and in float64: {error}. "
            f"Factor Ω: {spectrum_summary(A)}; factor Γ: {spectrum_summary(G)}; identity weight "
            f"η = damping + weight_decay = {eta:g}. Raise damping so that the damped factors are well conditioned, "
            "look for exploding activations or gradients in this layer, or raise max_failures (None never raises)")
