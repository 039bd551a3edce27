"""The ``"kfc"`` entry of ``KFC.state_dict()``: the optimizer's own state, its format version and its checks.

Format version 2 (version 1, without ``"options"``, per-layer ``"layout"`` and ``"health"``, still loads)::

    {"version": 2, "step": int, "mode": str, "scale": float, "warned": [str],
     "options": {"approx", "damping_method", "max_factor_dim", "memory_budget",   # the structural options
                 "clip", "clip_curvature", "clip_on", "clip_scaling"},          # the resolved trust region
     "layers": [{"name", "layout": (groups, a_dim, g_dim, a_blocks, g_blocks), "frozen": bool,
                 "factors": None | {"A", "G", "updates"}, "inverse": None | LayerInverse.state()}],
     "generator": None | uint8 tensor, "health": Health.state(),
     "distributed": None | {"seed", "world_size", "mode"}}   # Distributed.state(): the same on every rank

Distributed KFC saves the same entry on every rank (rank 0's is enough) and loads it at any world size, or into a
single process; a single-process state loads into a distributed run (its MC seed is then the run's own). With
owner preconditioning (``distributed="owner"``, FSDP2) ``state_dict()`` is a collective: the owners' layer entries
are gathered, and a load keeps each rank's own layers only.

Only tensors, numbers, strings, None, lists, tuples and dicts, so ``torch.load(..., weights_only=True)`` reads it.
Tensors are restored on each layer's device and in its factor dtype (fp32, fp64 for fp64 layers), so a state
saved on another device or in another precision (``map_location``, a ``.double()`` run) loads; the generator state
goes back to the CPU, where ``torch.Generator.set_state`` wants it.

A state saved with other structural options is refused with a ``ValueError`` that names the mismatch: another
layer set, ``approx``, ``damping_method``, or factor layouts (``max_factor_dim`` / ``memory_budget``). A state
saved with another resolved trust region (e.g. before the factored ν of the step became the default: clip 30 with
the exact ν) loads with a warning naming the saved values to pass for the same run; states without them load as
before (they carry no record of it).
"""
from __future__ import annotations

import warnings
from dataclasses import astuple

import torch

from kfc_compile.curvature.distributed import Distributed
from kfc_compile.curvature.estimator import CurvatureEstimator, LayerState
from kfc_compile.curvature.factors import RunningFactors
from kfc_compile.curvature.health import Health
from kfc_compile.curvature.inverses import LayerInverse
from kfc_compile.optim.options import KFCOptions

STATE_VERSION = 2
LOADABLE_VERSIONS = (1, 2)


def factor_dtype(s: LayerState) -> torch.dtype:
    """The dtype of a layer's factors and inverses: fp64 for an fp64 layer, else fp32."""
    return torch.float64 if s.layer.weight.dtype == torch.float64 else torch.float32


def layer_entry(s: LayerState) -> dict:
    """One layer's entry (copies of its tensors)."""
    rf = s.running
    return {"name": s.layer.name, "layout": astuple(s.layout), "frozen": s.frozen,
            "factors": None if rf is None else {"A": rf.A.clone(), "G": rf.G.clone(), "updates": rf.updates},
            "inverse": None if s.inverse is None else s.inverse.state()}


#: the resolved trust-region options a state records (its defaults changed: docs/algorithm.md §6.2)
TRUST_REGION = ("clip", "clip_curvature", "clip_on", "clip_scaling")


def kfc_state(est: CurvatureEstimator, options: KFCOptions, health: Health, step: int, warned: set[str],
              approx: str, dist: Distributed | None = None) -> dict:
    """The ``"kfc"`` entry of ``state_dict()`` (see the module docstring)."""
    entries = [layer_entry(s) for s in est.states]
    return {**run_entry(est, options, health, step, warned, approx, dist),
            "layers": entries if dist is None else dist.complete_layers(est.states, entries)}


def run_entry(est: CurvatureEstimator, options: KFCOptions, health: Health, step: int, warned: set[str],
              approx: str, dist: Distributed | None = None) -> dict:
    """The ``"kfc"`` entry without ``"layers"``: what does not depend on the layers (the same on every rank)."""
    return {
        "version": STATE_VERSION,
        "step": step,
        "mode": options.mode,
        "damping_method": options.damping_method,
        "options": {"approx": approx, "damping_method": options.damping_method,
                    "max_factor_dim": options.max_factor_dim, "memory_budget": options.memory_budget,
                    **{key: getattr(options, key) for key in TRUST_REGION}},
        "scale": est.scale,
        "warned": sorted(warned),
        "generator": None if options.generator is None else options.generator.get_state(),
        "health": health.state(),
        "distributed": None if dist is None else dist.state(),
    }


def check_kfc_state(kfc: dict | None, est: CurvatureEstimator, options: KFCOptions, approx: str,
                    layers: bool = True) -> None:
    """Raise ``ValueError`` naming the first mismatch between a saved ``"kfc"`` entry and this optimizer.

    ``layers=False``: only what does not depend on the layers (a compiled model's layers may not exist yet).
    """
    if kfc is None:
        raise ValueError("not a KFC state_dict (no 'kfc' entry)")
    version = kfc.get("version")
    if version not in LOADABLE_VERSIONS:
        raise ValueError(f"unsupported KFC state_dict version {version!r} (this kfc_compile reads versions "
                         f"{LOADABLE_VERSIONS})")
    saved = kfc.get("options", {"damping_method": kfc["damping_method"]})
    for key, now in (("approx", approx), ("damping_method", options.damping_method)):
        if key in saved and saved[key] != now:
            raise ValueError(f"state_dict was saved with {key}={saved[key]!r}, this optimizer uses {key}={now!r}")
    differ = {key: saved[key] for key in TRUST_REGION if key in saved and saved[key] != getattr(options, key)}
    if differ and options.mode == "pre":
        now = {key: getattr(options, key) for key in differ}
        warnings.warn(f"state_dict was saved with the trust region {differ}, this optimizer resolved {now}: the "
                      f"resumed run clips differently; pass {', '.join(f'{k}={v!r}' for k, v in differ.items())} "
                      "to continue the saved run", stacklevel=4)
    if not layers:
        return
    saved_names = [entry["name"] for entry in kfc["layers"]]
    names = [s.layer.name for s in est.states]
    if saved_names != names:
        missing = [n for n in names if n not in saved_names]
        extra = [n for n in saved_names if n not in names]
        raise ValueError(f"state_dict layers {saved_names} do not match this optimizer's {names} (not in the "
                         f"state: {missing}; only in the state: {extra}; same names in another order if both "
                         "are empty): it was saved for another model or layer set")
    for s, entry in zip(est.states, kfc["layers"], strict=True):
        fac = entry["factors"]
        shapes = None if fac is None else (tuple(fac["A"].shape), tuple(fac["G"].shape))
        layout = entry.get("layout")
        if (layout is not None and tuple(layout) != astuple(s.layout)) or (
                shapes is not None and shapes != s.layout.shapes()):
            why = (f"saved with max_factor_dim={saved['max_factor_dim']!r}, memory_budget={saved['memory_budget']!r}"
                   if "max_factor_dim" in saved else "saved with another max_factor_dim?")
            raise ValueError(f"state_dict factors of layer {entry['name']!r} have layout {layout} / shapes "
                             f"{shapes}, this optimizer stores {astuple(s.layout)} / {s.layout.shapes()} ({why}; "
                             f"this optimizer: max_factor_dim={options.max_factor_dim!r}, "
                             f"memory_budget={options.memory_budget!r})")


def restore_layer_state(kfc: dict, est: CurvatureEstimator) -> None:
    """Restore the per-layer part of a checked ``"kfc"`` entry: curvature scale, factors, inverses, flags."""
    est.scale = float(kfc["scale"])
    for s, entry in zip(est.states, kfc["layers"], strict=True):
        dev, dt = s.layer.weight.device, factor_dtype(s)
        fac = entry["factors"]
        s.running = None if fac is None else RunningFactors(fac["A"].to(dev, dt).clone(), fac["G"].to(dev, dt).clone(),
                                                            int(fac["updates"]))
        s.frozen = bool(entry["frozen"])
        s.inverse = None if entry["inverse"] is None else LayerInverse.from_state(entry["inverse"], dev, dt)
        s.stale = False
    if est.distributed is not None and est.distributed.owner is not None:  # owner mode: keep this rank's layers
        est.distributed.owner.trim(est.states)
    est.rebuild_buckets()


def whole_state(sd: dict) -> dict:
    """``sd`` with every ``DTensor`` of the per-parameter state (FSDP2 momentum / Adam buffers) as a whole tensor.

    A collective under FSDP2 (every rank calls ``state_dict()``); the result is the same on every rank, so rank 0
    saves it and it loads at any world size or into a single process, like DDP's.
    """
    if "state" in sd:  # new dicts: torch.optim's state_dict shares its per-parameter dicts with the live state
        sd["state"] = {i: {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in entry.items()}
                       for i, entry in sd["state"].items()}
    return sd


def reshard_state(state: dict) -> None:
    """After ``load_state_dict``: a whole tensor loaded for a ``DTensor`` parameter becomes its shard, as a DTensor."""
    for p, entry in state.items():
        if not hasattr(p, "device_mesh"):
            continue
        from torch.distributed.tensor import distribute_tensor

        for k, v in entry.items():
            if isinstance(v, torch.Tensor) and not hasattr(v, "device_mesh") and tuple(v.shape) == tuple(p.shape):
                entry[k] = distribute_tensor(v.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)


def restore_run_state(kfc: dict, options: KFCOptions, health: Health, warned: set[str],
                      dist: Distributed | None = None) -> int:
    """Restore what does not depend on the layers (health, once-only warnings, MC RNG / seed); returns the step."""
    warned.clear()
    warned.update(kfc.get("warned", ()))
    if "health" in kfc:
        health.load(kfc["health"])
    if kfc["generator"] is not None:
        if options.generator is None:
            warnings.warn("the state_dict has an MC generator state but this optimizer has no generator: "
                          "it is ignored (sampling uses the global RNG)", stacklevel=3)
        else:
            options.generator.set_state(kfc["generator"].to("cpu", torch.uint8))
    if dist is not None:
        dist.load(kfc.get("distributed"))
    return int(kfc["step"])
