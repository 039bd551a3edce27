"""Distributed KFC over ``torch.distributed`` (``kc.KFC(DDP(model))``): what the ranks share so they stay identical.

Each rank runs the user's step on its own shard of the global batch; DDP averages the gradients. KFC adds
(docs/algorithm.md §12):

* **factors**: after the statistics of a step are folded into the moving averages, every layer's running Ω and Γ
  become their mean over ranks, weighted by the examples each rank's statistics used (its batch, or the leading
  subset of its own shard with ``stats_fraction < 1``). The running averages are the same on every rank before the
  fold, so this equals folding the factors of the concatenated global batch: Ω = (1/N)Σ and Γ = 1/(N·T)Σ pool over
  N = Σ N_r (T, the positions per example, is the same on every rank whenever the shards could be concatenated).
  One all-reduce per dtype carries the upper triangles of all layers' Ω and Γ and the per-layer weights;
* **inverses**: each layer's inverse is computed by one rank and gathered by the others (``sharding.py``), or by
  every rank with ``distributed="replicate"``;
* **objective terms** (the curvature scale of a sum loss, the exact Fisher Gram matrix behind the clipping ν and
  the adaptive α/μ, the loss values of the Levenberg–Marquardt ratio) are plain means over ranks: they belong to
  the objective DDP differentiates, the mean of the ranks' losses (with equal local batches, the global batch's);
* **MC targets**: rank r samples step k's targets from a generator seeded from (seed, k, r): the streams differ
  between ranks, depend on the seed only, and need no state beyond the seed and the step count (so a checkpoint
  saved on rank 0 resumes every rank's stream). The seed is rank 0's: its ``generator``'s initial seed, or
  ``torch.initial_seed()``.

Everything else (the update rules, momentum, averaging, the fallback) sees identical inputs on every rank and
gives identical parameters without communication.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kfc_compile.curvature.comm import Comm
from kfc_compile.curvature.factors import RunningFactors
from kfc_compile.curvature.owner import OwnerCurvature, sharding_problem
from kfc_compile.curvature.sharding import LocalInverses, ShardedInverses

#: values of ``KFC(distributed=...)``: None (on for a DDP or FSDP2 model), False, True (= "broadcast"), or how the
#: curvature is shared: "broadcast" (each inverse computed by one rank, gathered by all), "replicate" (every rank
#: computes every one) or "owner" (each layer's factors, inverse and preconditioning on its owner only: owner.py;
#: the only one under FSDP2)
SETTINGS = (None, False, True, "broadcast", "replicate", "owner")
#: options that must agree on every rank (the layout of what the ranks exchange, and their common schedule)
_SHARED_OPTIONS = ("approx", "fisher", "stats_every", "inverse_every", "stats_fraction", "stat_decay",
                   "damping_method", "max_factor_dim", "mode", "clip", "clip_fraction", "clip_curvature",
                   "mc_samples", "lm_interval", "clip_scaling", "clip_on", "warmup", "adapt_damping")
_MASK64 = (1 << 64) - 1


def check_setting(value: object) -> object:
    """``value`` if it is one of :data:`SETTINGS`, else a ValueError listing them."""
    if not any(value is s or (isinstance(value, str) and value == s) for s in SETTINGS):
        raise ValueError(f"unknown distributed {value!r}: expected one of {SETTINGS}")
    return value


def setup(model: nn.Module, options, layers: list, live: bool) -> Distributed | None:
    """The distributed state for ``KFC(model, distributed=options.distributed)``, or None for a single-process run.

    Args:
        model: what was passed to ``KFC`` (a ``DistributedDataParallel`` wrapper turns distributed KFC on).
        options: the optimizer's ``KFCOptions``.
        layers: the KFC layers (the same on every rank: checked).
        live: the layers come from a live registry (``torch.compile(..., backend="kfc")``).

    Raises:
        RuntimeError: distributed KFC without an initialised process group.
        ValueError: ``distributed=False`` for a DDP model, or ranks with different layers or options.
        NotImplementedError: a kfc-backend model under distributed KFC, or a KFC layer's parameter sharded in a
            way owner preconditioning cannot handle exactly (``owner.sharding_problem``).
    """
    setting = options.distributed
    if isinstance(getattr(model, "_orig_mod", None), DistributedDataParallel):  # torch.compile(DDP(model))
        raise NotImplementedError("torch.compile(DDP(model), backend='kfc') is not supported: dynamo breaks the "
                                  "graph in DDP's forward and runs the layers uncompiled, so the kfc backend finds "
                                  "none; compile inside DDP instead: DDP(torch.compile(model, backend='kfc'))")
    ddp = isinstance(model, DistributedDataParallel)
    sharded = _has_dtensors(model)
    if sharded:
        if ddp or setting is False or setting in ("broadcast", "replicate"):
            raise ValueError(f"distributed={setting!r} with sharded DTensor parameters (FSDP2): a sharded model "
                             "takes owner preconditioning; leave distributed at None (or 'owner')")
        setting = "owner"
    if setting is None and not ddp:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            warnings.warn(f"torch.distributed runs {dist.get_world_size()} ranks but KFC got a plain module: every "
                          "rank keeps its own curvature and the ranks' parameters drift apart; pass KFC(DDP(model)) "
                          "or distributed=True (distributed=False silences this)", stacklevel=3)
        return None
    if setting is False:
        if ddp:
            raise ValueError("distributed=False with a DistributedDataParallel model: the ranks' curvature would "
                             "differ and their parameters drift apart; leave distributed at None (or True)")
        return None
    if live and sharded:
        raise NotImplementedError("FSDP2 with torch.compile(..., backend='kfc') or dynamo capture (frontend="
                                  "'dynamo', or a model the fx pass cannot trace) is not supported yet: use an "
                                  "fx-traceable model, kc.KFC(fsdp_model, frontend='fx')")
    mode = "broadcast" if setting is True or setting is None else setting
    return Distributed(Comm(model.process_group if ddp else None), mode, layers, options, sharded)


def _has_dtensors(model: nn.Module) -> bool:
    if not (dist.is_available() and dist.is_initialized()):  # a DTensor needs a process group
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without DTensor cannot have any
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


@dataclass(eq=False)
class Distributed:
    """What distributed KFC shares between ranks (see the module docstring); built by :func:`setup`.

    Attributes:
        comm: the process group and its collectives (with their traffic counted).
        mode: ``"broadcast"`` or ``"replicate"``.
        inverses: what computes the inverses (sharded over ranks for ``"broadcast"``).
        seed: the MC seed (rank 0's).
    """

    comm: Comm
    mode: str
    layers: list = field(repr=False)
    options: object = field(repr=False)
    sharded: bool = False

    def __post_init__(self) -> None:
        self.owner = OwnerCurvature(self.comm, self.sharded) if self.mode == "owner" else None
        self.inverses = (ShardedInverses(self.comm) if self.mode == "broadcast" else
                         self.owner.inverses if self.owner is not None else LocalInverses())
        device = self.layers[0].weight.device if self.layers else torch.device("cpu")
        self._generator = torch.Generator(device)
        o = self.options
        seed = o.generator.initial_seed() if o.generator is not None else torch.initial_seed()
        signature = _signature(self.layers)
        shared = {k: getattr(o, k) for k in _SHARED_OPTIONS}
        shared["loss"] = (type(o.loss).__name__, o.loss.reduction)
        problems = [] if not self.sharded else [
            why for layer in self.layers for p, n in ((layer.weight, "weight"), (layer.bias, "bias"))
            if p is not None and (why := sharding_problem(f"the {n} of KFC layer {layer.name!r}", p, self.comm))]
        gathered = self.comm.all_gather_objects("setup", (signature, shared, seed, self.mode, problems))
        for r, (*_, bad) in enumerate(gathered):
            if bad:
                raise NotImplementedError(f"parameters are sharded DTensors in a way KFC cannot precondition "
                                          f"exactly: rank {r}: {bad[0]}. Shard such a module with fully_shard on a "
                                          "1-D mesh, or keep it out of KFC")
        for r, (sig, opts, _, mode, _) in enumerate(gathered):
            if sig != signature:
                raise ValueError(f"rank {r} has other KFC layers than rank {self.comm.rank}: "
                                 f"{[s[0] for s in sig][:6]}... vs {[s[0] for s in signature][:6]}... (every rank "
                                 "must build the same model)")
            diff = sorted(k for k in shared if opts[k] != shared[k]) + (["distributed"] if mode != self.mode else [])
            if diff:
                raise ValueError(f"KFC options differ between rank {r} and rank {self.comm.rank}: {diff} (every rank "
                                 "must construct KFC with the same arguments)")
        self.seed = int(gathered[0][2])

    def check_layers(self, layers: list) -> None:
        """A live registry's new layer list (kfc backend under DDP): the same on every rank, else a ValueError.

        A collective: every rank's registry changes at the same step when they compile the same graphs.
        """
        signature = _signature(layers)
        for r, sig in enumerate(self.comm.all_gather_objects("layers", signature)):
            if sig != signature:
                raise ValueError(f"rank {r} compiled other KFC layers than rank {self.comm.rank}: "
                                 f"{[s[0] for s in sig][:6]}... vs {[s[0] for s in signature][:6]}... (every rank "
                                 "must compile the same model on inputs of the same shapes)")
        self.layers = list(layers)
        if layers and layers[0].weight.device != self._generator.device:
            self._generator = torch.Generator(layers[0].weight.device)

    # -- factors -------------------------------------------------------------------------------------------------
    def average_factors(self, states: list, batch: dict, examples: int) -> None:
        """After a statistics fold: every collecting layer's running (Ω, Γ) becomes its example-weighted mean.

        Args:
            states: the estimator's layer states (the same layers on every rank).
            batch: the layers this rank recorded statistics for (layer index → batch factors).
            examples: the examples this rank's statistics used (its weight).
        """
        groups: dict[tuple, list] = {}
        for i, s in enumerate(states):
            if not s.frozen:
                recorded = i in batch and s.running is not None
                groups.setdefault((_factor_dtype(s), s.layer.weight.device), []).append((s, recorded))
        for (dtype, device), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
            self._average_group(members, float(examples), dtype, device)

    def _average_group(self, members: list, weight: float, dtype: torch.dtype, device: torch.device) -> None:
        """One all-reduce of [w·triu(Ω), w·triu(Γ) per layer..., w per layer] (w = 0 for a layer not recorded)."""
        parts, segments = [], []
        for s, recorded in members:
            for which, shape in zip(("A", "G"), s.layout.shapes(), strict=True):
                iu = _triu(shape[-1], device)
                n = shape[0] * iu.shape[1]
                parts.append(getattr(s.running, which)[:, iu[0], iu[1]].reshape(-1) if recorded
                             else torch.zeros(n, dtype=dtype, device=device))
                segments.append((which, shape, iu, n))
        parts.append(torch.tensor([float(recorded) for _, recorded in members], dtype=dtype, device=device))
        buf = torch.cat(parts).mul_(weight)
        self.comm.all_reduce_("factors", buf)
        totals = buf[-len(members):].tolist()
        offset = 0
        for j, ((s, recorded), total) in enumerate(zip(members, totals, strict=True)):
            if total > 0 and s.running is None:  # the layer's first statistics, recorded by other ranks only
                zeros = [torch.zeros(shape, dtype=dtype, device=device) for shape in s.layout.shapes()]
                s.running = RunningFactors(*zeros, updates=1)
            elif total > 0 and not recorded:  # the other ranks folded a step in: so does this one
                s.running.updates += 1
            for which, _, iu, n in segments[2 * j: 2 * j + 2]:
                if total > 0:
                    vals = buf[offset:offset + n].view(-1, iu.shape[1]).div_(total)
                    M = getattr(s.running, which)
                    M[:, iu[0], iu[1]] = vals
                    M[:, iu[1], iu[0]] = vals
                offset += n

    # -- objective terms -----------------------------------------------------------------------------------------
    def mean(self, name: str, value: float | torch.Tensor) -> float | torch.Tensor:
        """The plain mean over ranks of an objective term (a loss value, the Fisher Gram matrix)."""
        return self.comm.mean(name, value)

    def curvature_scale(self, scale: float, reduction: str) -> float:
        """The objective's curvature scale: 1 for a mean loss; for a sum, the mean over ranks of their batch sizes."""
        return scale if reduction == "mean" else float(self.comm.mean("scale", scale))

    # -- MC sampling ---------------------------------------------------------------------------------------------
    def mc_generator(self, k: int) -> torch.Generator:
        """This rank's generator for the MC targets of step k, seeded from (seed, k, rank).

        The seeds of different (step, rank) pairs differ in their low 32 bits (all that the CPU generator uses) for
        k·world_size < 2³².
        """
        base = _splitmix64(self.seed)
        self._generator.manual_seed((base + k * self.comm.world_size + self.comm.rank) & _MASK64)
        return self._generator

    # -- checkpoints ---------------------------------------------------------------------------------------------
    def state(self) -> dict:
        """The ``"distributed"`` entry of ``KFC.state_dict()`` (the same on every rank)."""
        return {"seed": self.seed, "world_size": self.comm.world_size, "mode": self.mode}

    def complete_layers(self, states: list, entries: list[dict]) -> list[dict]:
        """Owner mode: every layer's checkpoint entry as its owner has it (one object gather); else ``entries``."""
        if self.owner is None:
            return entries
        owners = self.owner.owners(states)
        mine = {j: e for j, e in enumerate(entries) if owners[j] == self.comm.rank}
        for theirs in self.comm.all_gather_objects("checkpoint", mine):
            for j, e in theirs.items():
                entries[j] = e
        return entries

    def load(self, entry: dict | None) -> None:
        """Restore :meth:`state` (None, a single-process checkpoint: the seed stays this run's)."""
        if entry is not None:
            self.seed = int(entry["seed"])


def _signature(layers: list) -> list[tuple]:
    """What every rank's KFC layers must agree on: names, groups, factor sizes, bias, dtype."""
    return [(la.name, la.groups, la.a_dim, la.g_dim, la.bias is not None, str(la.weight.dtype)) for la in layers]


def _factor_dtype(s) -> torch.dtype:
    return torch.float64 if s.layer.weight.dtype == torch.float64 else torch.float32


_TRIU: dict[tuple[int, str], torch.Tensor] = {}


def _triu(d: int, device: torch.device) -> torch.Tensor:
    key = (d, str(device))
    if key not in _TRIU:
        _TRIU[key] = torch.triu_indices(d, d, device=device)
    return _TRIU[key]


def _splitmix64(x: int) -> int:
    """A 64-bit mix of the seed (nearby seeds give unrelated stream families)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)
