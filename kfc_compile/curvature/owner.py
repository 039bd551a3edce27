"""Owner preconditioning (option B of docs/algorithm.md §12): a layer's factors, inverse and product on one rank.

``KFC(distributed="owner")`` under DDP, and always under FSDP2 (``fully_shard``): each KFC layer has an owner rank
(``sharding.assign``, the d³ cost model). Only the owner keeps the layer's moving averages and inverse, so curvature
memory per rank falls as 1/W:

* **factors** (:meth:`OwnerCurvature.pool`): every rank computes its batch factors from its own shard (the taps
  see full activations: FSDP all-gathers the weight for the forward); one reduce-scatter per dtype sums the
  example-weighted upper triangles of every layer into its owner's chunk, and the owner folds the pooled batch
  factors Σ_r N_r F_r / Σ_r N_r (the concatenated batch's, §12.1) into its moving averages. The other ranks keep
  none (``LayerState.running`` stays None there);
* **inverses**: computed by the owner, which alone has factors (the estimator's refresh skips layers without);
  an exception is held and raised on every rank at the next exchange, so no rank waits in a collective;
* **preconditioning** (:meth:`OwnerCurvature.precondition`): the owner applies Γ⁻¹ · [∇W | ∇b] · Ω⁻¹ to the full
  gradient of its layers. Under DDP every rank has the full gradient and the owners' results travel in one
  all-gather; under FSDP2 a weight's gradient is a dim-0 sharded ``DTensor``: one all-to-all sends every shard to
  its layer's owner, which assembles the full gradient, preconditions it and sends each rank its rows back in a
  second all-to-all (bytes per rank ~ 2·|∇|/W; the alternative, Γ⁻¹'s columns on every shard and a
  reduce-scatter, would need Γ⁻¹ on every rank). The result is a ``DTensor`` with the parameter's placement.

A sharding this cannot precondition exactly (a DTensor that is not dim-0 sharded over the whole group on a 1-D
mesh, or shards other than ``torch.chunk``'s) is refused at construction (``check_sharding``).
"""
from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from kfc_compile.curvature.comm import Comm
from kfc_compile.curvature.decompositions import SILENT_MIN_DIM, SILENT_SHARE
from kfc_compile.curvature.factors import Factors
from kfc_compile.curvature.precondition import apply_buckets, grad_matrix, regularised_grad, split_matrix
from kfc_compile.curvature.sharding import LocalInverses, assign, inverse_cost


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - a torch without DTensor has none
        return False
    return isinstance(t, DTensor)


def chunk_rows(n: int, world: int) -> list[int]:
    """Rows of each rank's dim-0 shard of an n-row tensor: ``torch.chunk``'s split (what FSDP2 uses), 0-padded."""
    size = -(-n // world) if n else 0
    return [max(0, min(size, n - r * size)) for r in range(world)]


def sharding_problem(name: str, p: torch.Tensor, comm: Comm) -> str | None:
    """Why the KFC parameter ``p`` cannot be preconditioned under owner preconditioning, or None if it can."""
    if not is_dtensor(p):
        return (f"{name} is a plain tensor in a model whose other parameters are DTensors (FSDP2): its gradient is "
                "not synchronised across ranks")
    from torch.distributed.tensor import Shard

    mesh = p.device_mesh
    if mesh.ndim != 1 or mesh.size() != comm.world_size or tuple(p.placements) != (Shard(0),):
        return (f"{name} is a DTensor with placements {tuple(p.placements)} on a mesh of shape {tuple(mesh.shape)}: "
                f"KFC preconditions dim-0 shards over all {comm.world_size} ranks only (FSDP2's fully_shard on a 1-D "
                "mesh; no tensor parallelism)")
    if p.to_local().shape[0] != chunk_rows(p.shape[0], comm.world_size)[comm.rank]:
        return f"{name}'s local shard has {p.to_local().shape[0]} rows, not torch.chunk's split of {p.shape[0]}"
    return None


@contextlib.contextmanager
def without_fsdp_hooks(module: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[None]:
    """FSDP2's forward hooks of the modules in ``module`` off (a functional pass on whole parameters).

    Its pre-forward hook would all-gather and install the unsharded parameters, over those the pass passes in.
    ``modules``: ``list(module.modules())`` where the caller keeps it (saves the walk).
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without FSDP2
        yield
        return
    units = [m for m in (module.modules() if modules is None else modules) if isinstance(m, FSDPModule)]
    saved = [(m._forward_pre_hooks, m._forward_hooks) for m in units]
    for m in units:
        m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for m, (pre, post) in zip(units, saved, strict=True):
            m._forward_pre_hooks, m._forward_hooks = pre, post


class OwnerInverses(LocalInverses):
    """The estimator's refresh, with an exception held until the next exchange (every rank then raises)."""

    def __init__(self) -> None:
        self.refreshing = False
        self.error: BaseException | None = None

    def takes_over_refresh(self) -> bool:
        """True outside :meth:`refresh`: the estimator's refresh then runs inside it."""
        return not self.refreshing

    def refresh(self, estimator, k: int | None, eta: float) -> None:
        """``estimator.refresh_inverses(k, eta)`` (owners only have factors, so only they compute)."""
        self.refreshing = True
        try:
            estimator.refresh_inverses(k, eta)
        except Exception as e:  # raised at the exchange, on every rank together
            self.error = self.error or e
        finally:
            self.refreshing = False


class OwnerCurvature:
    """Factor pooling and preconditioning on the layers' owners (see the module docstring)."""

    def __init__(self, comm: Comm, sharded: bool):
        self.comm = comm
        self.sharded = sharded  # FSDP2: gradients are dim-0 sharded DTensors
        self.inverses = OwnerInverses()
        self._key: tuple | None = None
        self._owners: list[int] = []
        self._fixed = False  # owners taken from the first batch's live coordinates, or a checkpoint's factors held

    def owners(self, states: Sequence, diagonals: list[torch.Tensor | None] | None = None) -> list[int]:
        """The owner rank of each layer state (greedy d³ balancing; recomputed when the layouts change).

        ``diagonals`` (the ranks' summed diagonals of each layer's first batch Ω, from :meth:`pool`): the costs
        leave out Ω's silent coordinates (``sharding.live_cost``); taken once, before any rank holds factors.
        """
        key = tuple((s.layer.name, s.layout) for s in states)
        if key != self._key or (diagonals is not None and not self._fixed):
            costs = [inverse_cost(s.layout) if diagonals is None else _diag_cost(s.layout, d)
                     for s, d in zip(states, diagonals or [None] * len(states), strict=True)]
            self._owners = assign(costs, self.comm.world_size)
            self._key = key
            self._fixed = self._fixed or diagonals is not None
        return self._owners

    def trim(self, states: Sequence) -> None:
        """Drop the factors and inverses of the layers this rank does not own (after a checkpoint load)."""
        for s, r in zip(states, self.owners(states), strict=True):
            if r != self.comm.rank:
                s.running, s.inverse = None, None
        self._fixed = True  # the owners now hold the factors: no reassignment from the first batch

    def _first_diagonals(self, states: Sequence, batch: dict[int, Factors]) -> list[torch.Tensor | None]:
        """The diagonals of every layer's batch Ω summed over ranks (one all-reduce, at the first statistics)."""
        parts, shapes = [], []
        for i, s in enumerate(states):
            (na, ba, _), _ = s.layout.shapes()
            f = batch.get(i)
            parts.append(torch.diagonal(f.A, dim1=-2, dim2=-1).reshape(-1).double().cpu() if f is not None
                         else torch.zeros(na * ba, dtype=torch.float64))
            shapes.append((na, ba))
        flat = self.comm.all_reduce_("live", torch.cat(parts)) if parts else torch.zeros(0)
        return [d.view(shape) for d, shape in zip(flat.split([a * b for a, b in shapes]), shapes, strict=True)]

    # -- factors -------------------------------------------------------------------------------------------------
    def pool(self, states: Sequence, batch: dict[int, Factors], examples: int) -> dict[int, Factors]:
        """The example-weighted mean over ranks of the batch factors, on each layer's owner (index → Factors).

        Every rank calls it at every statistics fold (with an empty ``batch`` when it has none); the result holds
        the layers this rank owns that some rank recorded.
        """
        if not self._fixed:  # the first statistics: assign the layers by their live cost, then keep the owners
            self.owners(states, self._first_diagonals(states, batch))
        owners = self.owners(states)
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(states):
            if not s.frozen:
                dtype = torch.float64 if s.layer.weight.dtype == torch.float64 else torch.float32
                groups.setdefault((str(dtype), str(s.layer.weight.device)), []).append(i)
        out: dict[int, Factors] = {}
        for (dt, _), members in sorted(groups.items()):
            out.update(self._pool_group(states, owners, members, batch, float(examples),
                                        getattr(torch, dt.removeprefix("torch."))))
        return out

    def _pool_group(self, states, owners, members, batch, weight, dtype) -> dict[int, Factors]:
        W, rank = self.comm.world_size, self.comm.rank
        device = states[members[0]].layer.weight.device
        chunks: list[list[torch.Tensor]] = [[] for _ in range(W)]
        mine = []  # (index, [(shape, iu, n)] for A and G)
        for i in members:
            s, r = states[i], owners[i]
            segs = []
            for which, shape in zip(("A", "G"), s.layout.shapes(), strict=True):
                iu = torch.triu_indices(shape[-1], shape[-1], device=device)
                n = shape[0] * iu.shape[1]
                f = batch.get(i)
                chunks[r].append(getattr(f, which)[:, iu[0], iu[1]].reshape(-1).to(dtype) * weight if f is not None
                                 else torch.zeros(n, dtype=dtype, device=device))
                segs.append((shape, iu, n))
            chunks[r].append(torch.tensor([weight if i in batch else 0.0], dtype=dtype, device=device))
            if r == rank:
                mine.append((i, segs))
        lengths = [sum(t.numel() for t in c) for c in chunks]
        size = max(lengths)
        buf = torch.zeros(W, size, dtype=dtype, device=device)
        for r, c in enumerate(chunks):
            if c:
                buf[r, :lengths[r]] = torch.cat(c)
        got = self.comm.reduce_scatter("factors", buf)
        out, offset = {}, 0
        for i, segs in mine:
            n_all = sum(n for _, _, n in segs)
            total = float(got[offset + n_all])
            mats = []
            for shape, iu, n in segs:
                vals = got[offset:offset + n].view(shape[0], -1)
                M = torch.empty(shape, dtype=dtype, device=device)
                M[:, iu[0], iu[1]] = vals
                M[:, iu[1], iu[0]] = vals
                mats.append(M.div_(total) if total > 0 else M)
                offset += n
            offset += 1
            if total > 0:
                out[i] = Factors(*mats)
        return out

    # -- preconditioning -----------------------------------------------------------------------------------------
    def precondition(self, est, weight_decay: float, grads: dict | None,
                     warned: set[str]) -> dict[torch.Tensor, torch.Tensor]:
        """F̂⁻¹∇h per KFC parameter, each layer's computed by its owner (``CurvatureEstimator.precondition``)."""
        states = est.states
        owners = self.owners(states)
        entries = []  # (index, [param], [∇h]) for the layers with a gradient (the same on every rank)
        for i, s in enumerate(states):
            layer = s.layer
            params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
            gs = [p.grad for p in params] if grads is None else [grads.get(p) for p in params]
            if all(g is None for g in gs):
                continue
            gs = [regularised_grad(p, torch.zeros_like(p) if g is None else g, weight_decay)
                  for p, g in zip(params, gs, strict=True)]
            entries.append((i, params, gs))
        dtype = torch.float64 if any(p.dtype == torch.float64 for _, ps, _ in entries for p in ps) else torch.float32
        error, self.inverses.error = self.inverses.error, None
        if self.sharded:
            full = self._gather_to_owners(entries, owners, dtype, error)
        else:
            self._share_status(error)
            full = {i: gs for i, _, gs in entries if owners[i] == self.comm.rank}
        results = self._apply(est, full, warned)
        if self.sharded:
            return self._scatter_from_owners(entries, owners, results, dtype)
        return self._all_gather_results(entries, owners, results, dtype)

    def _apply(self, est, full: dict[int, list[torch.Tensor]], warned: set[str]) -> dict[int, list[torch.Tensor]]:
        """The owner's products for its layers (index → [update of W, update of b]) from their full ∇h."""
        mats = {}
        for i, gs in full.items():
            layer = est.states[i].layer
            mats[i] = grad_matrix(layer, 0.0, (gs[0], gs[1] if len(gs) > 1 else None))
        U = apply_buckets(est.buckets, {i: m for i, m in mats.items() if est.states[i].inverse is not None})
        out = {}
        for i, m in mats.items():
            layer = est.states[i].layer
            if i not in U and "nofactors" not in warned:
                warned.add("nofactors")
                warnings.warn(f"KFC layer {layer.name!r} has no factors yet (no statistics were recorded for it): "
                              "its gradient is used unpreconditioned", stacklevel=4)
            dW, db = split_matrix(layer, U.get(i, m))
            out[i] = [dW] + ([db] if db is not None else [])
        return out

    def _raise_if_failed(self, flags: list[float], error: BaseException | None) -> None:
        failed = [r for r, f in enumerate(flags) if f != 0]
        if failed:
            if error is not None:
                raise error
            raise RuntimeError(f"the KFC inverse refresh failed on rank {failed[0]}; the ranks' curvature may now "
                               "differ: resume from a checkpoint")

    def _share_status(self, error: BaseException | None) -> None:
        flags = self.comm.all_gather("status", torch.tensor([float(error is not None)], dtype=torch.float64))
        self._raise_if_failed(flags[:, 0].tolist(), error)

    def _all_gather_results(self, entries, owners, results, dtype) -> dict[torch.Tensor, torch.Tensor]:
        """DDP: every rank gets every owner's products in one all-gather (offsets known from the shapes)."""
        W = self.comm.world_size
        lengths = [sum(p.numel() for i, ps, _ in entries if owners[i] == r for p in ps) for r in range(W)]
        buf = torch.zeros(max(lengths), dtype=dtype, device=entries[0][1][0].device if entries else None)
        own = [t.reshape(-1).to(dtype) for i, _, _ in entries if i in results for t in results[i]]
        if own:
            flat = torch.cat(own)
            buf[:flat.numel()] = flat
        rows = self.comm.all_gather("preconditioned", buf)
        out, offsets = {}, [0] * W
        for i, ps, _ in entries:
            r = owners[i]
            for p in ps:
                out[p] = rows[r, offsets[r]:offsets[r] + p.numel()].view(p.shape).to(self._out_dtype(p))
                offsets[r] += p.numel()
        return out

    @staticmethod
    def _out_dtype(p: torch.Tensor) -> torch.dtype:
        return torch.float64 if p.dtype == torch.float64 else torch.float32

    def _gather_to_owners(self, entries, owners, dtype, error) -> dict[int, list[torch.Tensor]]:
        """FSDP2: one all-to-all sends every local ∇h shard to its layer's owner, which assembles the full ones."""
        W, rank = self.comm.world_size, self.comm.rank
        send: list[list[torch.Tensor]] = [[] for _ in range(W)]
        for i, _, gs in entries:
            send[owners[i]] += [g.to_local().reshape(-1).to(dtype) for g in gs]
        status = torch.tensor([float(error is not None)], dtype=dtype)
        send_sizes = [sum(t.numel() for t in c) + 1 for c in send]
        recv_sizes = [sum(chunk_rows(p.shape[0], W)[src] * _row(p) for i, ps, _ in entries if owners[i] == rank
                          for p in ps) + 1 for src in range(W)]
        got = self.comm.all_to_all("gradients", torch.cat([t for c in send for t in c + [status]]),
                                   send_sizes, recv_sizes)
        parts = list(torch.split(got, recv_sizes))
        self._raise_if_failed([float(part[-1]) for part in parts], error)
        full, offsets = {}, [0] * W
        for i, ps, _ in entries:
            if owners[i] != rank:
                continue
            gs = []
            for p in ps:
                pieces = []
                for src in range(W):
                    n = chunk_rows(p.shape[0], W)[src] * _row(p)
                    pieces.append(parts[src][offsets[src]:offsets[src] + n])
                    offsets[src] += n
                gs.append(torch.cat(pieces).view(p.shape))
            full[i] = gs
        return full

    def _scatter_from_owners(self, entries, owners, results, dtype) -> dict[torch.Tensor, torch.Tensor]:
        """FSDP2: the owners send each rank its rows of their products (all-to-all); DTensors like the parameters."""
        from torch.distributed.tensor import DTensor

        W, rank = self.comm.world_size, self.comm.rank
        send: list[list[torch.Tensor]] = [[] for _ in range(W)]
        for i, ps, _ in entries:
            if owners[i] != rank:
                continue
            for p, u in zip(ps, results[i], strict=True):
                rows = chunk_rows(p.shape[0], W)
                for dst, piece in enumerate(torch.split(u, rows)):
                    send[dst].append(piece.reshape(-1).to(dtype))
        send_sizes = [sum(t.numel() for t in c) for c in send]
        recv_sizes = [sum(chunk_rows(p.shape[0], W)[rank] * _row(p) for i, ps, _ in entries if owners[i] == src
                          for p in ps) for src in range(W)]
        flat = [t for c in send for t in c]
        got = self.comm.all_to_all("preconditioned", torch.cat(flat) if flat else torch.zeros(0, dtype=dtype),
                                   send_sizes, recv_sizes)
        parts = list(torch.split(got, recv_sizes))
        out, offsets = {}, [0] * W
        for i, ps, _ in entries:
            src = owners[i]
            for p in ps:
                local_shape = (chunk_rows(p.shape[0], W)[rank], *p.shape[1:])
                n = local_shape[0] * _row(p)
                local = parts[src][offsets[src]:offsets[src] + n].view(local_shape).to(self._out_dtype(p))
                offsets[src] += n
                out[p] = DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                            stride=p.stride())
        return out


def _diag_cost(layout, diagonal: torch.Tensor) -> float:
    """``sharding.live_cost`` from Ω's diagonal (groups, width): a dense Ω's silent coordinates left out."""
    (na, ba, _), (ng, bg, _) = layout.shapes()
    if not layout.blocked and ba >= SILENT_MIN_DIM:
        n = int((diagonal > 0).any(0).sum())
        if 0 < n <= (1.0 - SILENT_SHARE) * ba:
            ba = n
    return float(na * ba ** 3 + ng * bg ** 3)


def _row(p: torch.Tensor) -> int:
    """Entries per dim-0 row of ``p``."""
    n = 1
    for d in p.shape[1:]:
        n *= d
    return n
