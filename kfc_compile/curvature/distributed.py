"""Distributed KFC over ``torch.distributed`` (``kc.KFC(DDP(model))``): what the ranks share so they stay identical.

Each rank runs the user's step on its own shard of the global batch; DDP averages the gradients. KFC adds
(docs/algorithm.md §12):

* **factors** (folded locally, averaged when an inverse needs them): the moving average is linear, so each rank
  folds its own batch factors with the weight W·n_r/N (N = Σ_r n_r, the examples behind the layer's Ω or Γ over
  the ranks: one all-reduce of the per-layer counts per statistics step, :meth:`Distributed.weigh`), and the mean of
  the ranks' running factors is the single-process average of the concatenated global batch: Ω = (1/N)Σ and
  Γ = 1/(N·T)Σ pool over N = Σ N_r (T, the positions per example, is the same on every rank whenever the shards
  could be concatenated), with the same ε = min(1 − 1/k, stat_decay) (every rank folds every layer some rank
  recorded: zeros where it recorded none). That mean is taken by :meth:`Distributed.settle` (one all-reduce per
  dtype of the upper triangles of the pending layers' Ω and Γ) right before an inverse refresh recomputes or
  rescales a pending layer, before ``KFC.state_dict()`` / ``KFC.factors()`` (so they are collectives), and
  before the factored Fisher Gram fallback reads the factors: at stats_every = 1, inverse_every = 20 the factor
  bytes fall 20×. Between those points a rank's ``LayerState.running`` is its own share, not the average;
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
from kfc_compile.curvature.factors import Factors, RunningFactors
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
        NotImplementedError: a live registry (kfc backend, dynamo capture) under FSDP2, or a KFC layer's parameter
            sharded in a way owner preconditioning cannot handle exactly (``owner.sharding_problem``).
    """
    setting = options.distributed
    if isinstance(getattr(model, "_orig_mod", None), DistributedDataParallel):  # torch.compile(DDP(model))
        model = model._orig_mod  # its layers are found in the graphs DDPOptimizer splits (frontend/dynamo/scan.py)
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
        self._pending: dict[str, RunningFactors] = {}  # layer name → running factors folded locally, not yet averaged
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
    def weigh(self, states: list, batch: dict[int, Factors], dropped: set[int], examples: int) -> dict[int, Factors]:
        """Before a statistics fold: this rank's share of the global batch factors, for every layer some rank recorded.

        The single process normalises a layer's Ω by the step's examples (those that did not reach the layer add
        zero) and its Γ by the examples whose gradients it saw. So one all-reduce sums, per layer, N_Ω = Σ n_r over
        the ranks that did not drop the layer's statistics and N_Γ = Σ n_r over those that recorded it; this rank's
        Ω is weighted W·n_r/N_Ω and its Γ W·n_r/N_Γ. A layer recorded on other ranks only gets zero factors (this
        rank still folds: its ε and ``updates`` stay those of every rank). The mean over ranks of the folded
        averages is then the single-process average of the global batch (:meth:`settle`).

        Args:
            states: the estimator's layer states (the same layers on every rank).
            batch: the finite batch factors this rank recorded (layer index → Factors), frozen layers left out.
            dropped: the layers whose batch factors this rank dropped (not finite).
            examples: the examples this rank's statistics used (0: none, e.g. a non-finite model output).
        """
        live = [i for i, s in enumerate(states) if not s.frozen]
        if not live:
            return {}
        counts = torch.tensor([[0.0 if i in dropped else float(examples), float(examples) if i in batch else 0.0]
                               for i in live], dtype=torch.float64)
        self.comm.all_reduce_("counts", counts)
        out, world = {}, self.comm.world_size
        for i, (n_a, n_g) in zip(live, counts.tolist(), strict=True):
            if n_g <= 0:  # no rank recorded it: no fold anywhere
                continue
            if i in batch:
                ca, cg, f = world * examples / n_a, world * examples / n_g, batch[i]
                out[i] = Factors(f.A if ca == 1.0 else f.A * ca, f.G if cg == 1.0 else f.G * cg)
            else:
                s = states[i]
                dtype, dev = _factor_dtype(s), s.layer.weight.device
                out[i] = Factors(*(torch.zeros(shape, dtype=dtype, device=dev) for shape in s.layout.shapes()))
        return out

    def folded(self, states: list, indices) -> None:
        """The layers at ``indices`` folded this rank's share in: their running factors wait for :meth:`settle`."""
        for i in indices:
            self._pending[states[i].layer.name] = states[i].running

    def settle_for(self, states: list, due: bool, eta: float, scale: float) -> None:
        """Before an inverse refresh: :meth:`settle` if a pending layer's inverse will be recomputed or rescaled.

        The same decision on every rank (the schedule, η, the scale and the inverses are).
        """
        if any(self._is_pending(s) and (due or s.stale or s.inverse is None or s.inverse.eta != eta
                                        or s.inverse.scale != scale) for s in states):
            self.settle(states)

    def settle(self, states: list) -> None:
        """The pending factor sync: every pending layer's running (Ω, Γ) becomes its mean over ranks.

        A collective: every rank calls it (``KFC.state_dict()``, ``KFC.factors()`` and the inverse refreshes do);
        a no-op, without communication, when nothing is pending. One all-reduce per dtype of the upper triangles.
        """
        pending = [s for s in states if self._is_pending(s)]
        self._pending.clear()
        groups: dict[tuple, list] = {}
        for s in pending:
            groups.setdefault((_factor_dtype(s), s.layer.weight.device), []).append(s)
        for (_, device), members in sorted(groups.items(), key=lambda kv: str(kv[0])):
            self._average_group(members, device)

    def _is_pending(self, s) -> bool:
        return s.running is not None and self._pending.get(s.layer.name) is s.running

    def _average_group(self, members: list, device: torch.device) -> None:
        """One all-reduce of [triu(Ω), triu(Γ) per layer...]; every rank then holds the mean."""
        parts, segments = [], []
        for s in members:
            for which, shape in zip(("A", "G"), s.layout.shapes(), strict=True):
                iu = _triu(shape[-1], device)
                parts.append(getattr(s.running, which)[:, iu[0], iu[1]].reshape(-1))
                segments.append((s, which, iu, parts[-1].numel()))
        buf = torch.cat(parts)
        self.comm.all_reduce_("factors", buf).div_(self.comm.world_size)
        offset = 0
        for s, which, iu, n in segments:
            vals = buf[offset:offset + n].view(-1, iu.shape[1])
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
