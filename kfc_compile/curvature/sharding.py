"""The inverse refresh sharded over ranks: which rank inverts which layer, and how the others get the result.

**Cost model and assignment.** Inverting (Cholesky) or eigendecomposing a d×d matrix costs ~d³, so a layer costs
the sum of b³ over the stored blocks of its Ω and Γ (``groups·(a_dim³ + g_dim³)`` for dense factors), with Ω's
silent coordinates left out where the factors show them (:func:`live_cost`).
:func:`assign` gives each layer to one rank: the most expensive first, each to the rank with the least cost so far
(ties: the lower rank), the greedy LPT rule of KAISA's ``assignment.py``. It depends on the layer list and
the inverses only, so every rank computes the same owners without communicating.

**Refresh protocol** (:meth:`ShardedInverses.refresh`, option A: compute on the owner, share with everyone).
Every rank runs the estimator's refresh loop: the factors, η and the curvature scale are the same on every rank, so
every rank takes the same decisions (which layers to recompute, rescale or skip). The loop's ``compute`` and
``rescale`` calls come here: the owner computes; the other ranks keep the layer's current inverse for the moment
and note that the owner will send a new one. After the loop the owners' inverses of the touched layers (whatever
the loop left in ``state.inverse``, so a refresh failure the loop handles on the owner is shared as it was
handled) travel in one object gather (kind, η, scale, layout, tensor shapes, the small index tensors) and one flat
gather per float dtype (the matrices; a symmetric one, e.g. a Cholesky inverse, as its upper triangle, since the
owner's copy is exactly symmetric). Every rank, the owner included, then rebuilds the inverse from the gathered
bytes, so all hold the same values in the same memory layout (a Fortran-ordered eigenbasis and its contiguous copy
can round differently in a product), and the buckets are rebuilt. A refresh that touches no layer communicates
nothing. An exception that leaves the loop on any rank is shared in the same gather, and every rank raises (the
owner its own exception, the others a ``RuntimeError`` naming the rank and the error) rather than waiting in a
collective; the ranks' inverses may then differ: resume from a checkpoint.

Rescaling an eigen inverse for a new (η, scale) is free (the eigendecompositions do not change), so every rank
does it itself; a factored rescale is a new Cholesky, done by the owner and shared like a recompute.

Option B (the owner preconditions its layers' gradients and the results are all-gathered every step) would keep
each inverse on one rank only (memory ∝ 1/world size) at the price of a gather of every KFC gradient at every step;
option A gathers the inverses once per refresh (every ``inverse_every`` steps) and keeps every step free of
communication beyond DDP's own: docs/algorithm.md §12 has the trade-off. :class:`LocalInverses` is the
single-process (and ``distributed="replicate"``) behaviour: every rank computes every inverse.
"""
from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from kfc_compile.curvature.blocks import Layout
from kfc_compile.curvature.comm import Comm
from kfc_compile.curvature.inverses import EigenInverse, LayerInverse, compute_inverse, rescale_inverse


def inverse_cost(layout: Layout) -> float:
    """The d³ cost of one layer's inverse: b³ summed over the stored blocks of Ω and Γ."""
    (na, ba, _), (ng, bg, _) = layout.shapes()
    return float(na * ba ** 3 + ng * bg ** 3)


def live_cost(state) -> float:
    """:func:`inverse_cost` of a layer state, with Ω's silent coordinates left out where its inverse shows them.

    The inverse of a dense Ω with enough silent coordinates (``decompositions.live_coordinates``: zero diagonal,
    e.g. a 3×3 convolution with padding on a 1×1 or 2×2 feature map, whose border taps never see an input) is
    computed on the live block only, so it costs live³, not d³. Without an inverse yet: the stored blocks' d³.
    """
    (na, ba, _), (ng, bg, _) = state.layout.shapes()
    live = getattr(state.inverse, "live", None)
    if live is not None and not state.layout.blocked:
        ba = live.numel()
    return float(na * ba ** 3 + ng * bg ** 3)


def assign(costs: Sequence[float], world_size: int) -> list[int]:
    """The owner rank of each item: greedy LPT (most expensive first, to the least-loaded rank, ties to the lower).

    Items of equal cost keep their order, so the result depends on the costs and the world size only.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    loads = [(0.0, r) for r in range(world_size)]
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, r = heapq.heappop(loads)
        owners[i] = r
        heapq.heappush(loads, (load + costs[i], r))
    return owners


class LocalInverses:
    """Every inverse computed on this rank (single process, or ``distributed="replicate"``)."""

    compute = staticmethod(compute_inverse)
    rescale = staticmethod(rescale_inverse)

    def takes_over_refresh(self) -> bool:
        """Whether the estimator's refresh must run inside :meth:`ShardedInverses.refresh` (never here)."""
        return False


class ShardedInverses(LocalInverses):
    """Option A of the module docstring: each layer's inverse computed by its owner rank and gathered by all.

    ``computed[name]`` counts the inverses this rank computed for the layer (recomputes and factored rescales).
    """

    def __init__(self, comm: Comm):
        self.comm = comm
        self.computed: dict[str, int] = {}
        self.refreshing = False
        self._key: tuple | None = None
        self._owners: dict[str, int] = {}
        self._informed = False  # the owners were assigned by the inverses' live costs
        self._states: dict[str, object] = {}
        self._touched: list[str] = []

    def owners(self, states: Sequence) -> dict[str, int]:
        """Layer name → owner rank for these layer states (recomputed when the layers or their layouts change).

        The costs are :func:`live_cost`, read from the inverses (the same on every rank: every rank rebuilds them
        from the gathered bytes). The first refresh assigns by d³; once every layer with factors has an inverse
        the layers are assigned once more by their live cost, and the owners then stay until the layers change.
        """
        key = tuple((s.layer.name, s.layout) for s in states)
        informed = any(s.inverse is not None for s in states) and all(
            s.inverse is not None for s in states if s.running is not None)
        if key != self._key or (informed and not self._informed):
            ranks = assign([live_cost(s) for s in states], self.comm.world_size)
            self._owners = {s.layer.name: r for s, r in zip(states, ranks, strict=True)}
            self._key, self._informed = key, informed
        return self._owners

    def takes_over_refresh(self) -> bool:
        """True outside :meth:`refresh`: the estimator's refresh then hands itself to :meth:`refresh`."""
        return not self.refreshing

    def refresh(self, estimator, k: int | None, eta: float) -> None:
        """Run ``estimator.refresh_inverses(k, eta)`` with owner-only computes, then share the owners' inverses."""
        states = list(estimator.states)
        self.owners(states)
        self._states = {s.layer.name: s for s in states}
        self._touched = []
        self.refreshing = True
        error = None
        try:
            estimator.refresh_inverses(k, eta)
        except Exception as e:  # shared below, so that no rank waits in the exchange for a rank that gave up
            error = e
        finally:
            self.refreshing = False
        if self._touched or error is not None:
            self._exchange(error)
            estimator.rebuild_buckets()

    def _device(self) -> torch.device:
        """Where the layers' inverses live (the device of the first layer's weight)."""
        return next(iter(self._states.values())).layer.weight.device

    def _mine(self, name: str) -> bool:
        self._touched.append(name)
        mine = self._owners.get(name, self.comm.rank) == self.comm.rank
        if mine:
            self.computed[name] = self.computed.get(name, 0) + 1
        return mine

    def compute(self, method: str, A: torch.Tensor, G: torch.Tensor, eta: float, scale: float, name: str,
                layout: Layout | None = None) -> LayerInverse | None:
        """The owner's new inverse; elsewhere the layer's current one, until the owner's arrives."""
        if not self.refreshing or self._mine(name):
            return compute_inverse(method, A, G, eta, scale, name, layout)
        return self._states[name].inverse

    def rescale(self, inv: LayerInverse, eta: float, scale: float, A: torch.Tensor, G: torch.Tensor,
                name: str) -> LayerInverse:
        """An eigen rescale on every rank (free); a factored one on the owner, shared like a recompute."""
        if not self.refreshing or isinstance(inv, EigenInverse) or self._mine(name):
            return rescale_inverse(inv, eta, scale, A, G, name)
        return inv

    # -- the exchange ------------------------------------------------------------------------------------------
    def _exchange(self, error: Exception | None) -> None:
        rank = self.comm.rank
        own = [n for n in dict.fromkeys(self._touched) if self._owners.get(n) == rank]
        metas, floats = [], []
        for name in own:
            meta, ts = _describe(self._states[name].inverse)
            metas.append((name, meta))
            floats += ts
        failure = None if error is None else f"{type(error).__name__}: {error}"
        gathered = self.comm.all_gather_objects("inverse metadata", (failure, metas))
        failed = [(r, f) for r, (f, _) in enumerate(gathered) if f is not None]
        if failed:
            if error is not None:
                raise error
            r, f = failed[0]
            raise RuntimeError(f"the KFC inverse refresh failed on rank {r} ({f}); the ranks' inverses may now "
                               "differ: resume from a checkpoint")
        dtypes = sorted({spec[2] for _, ms in gathered for _, m in ms if m is not None for spec in m["floats"]})
        rows = {}
        for dt in dtypes:
            lengths = [sum(_packed_numel(spec[1], spec[3]) for _, m in ms if m is not None for spec in m["floats"]
                           if spec[2] == dt) for _, ms in gathered]
            mine = [t for t in floats if str(t.dtype) == dt]
            dtype = getattr(torch, dt.removeprefix("torch."))
            buf = torch.zeros(max(lengths), dtype=dtype, device=self._device())
            if mine:
                flat = torch.cat(mine)
                buf[: flat.numel()] = flat
            rows[dt] = self.comm.all_gather("inverses", buf)
        for r, (_, ms) in enumerate(gathered):  # the owner too: every rank then holds the same bytes in one layout
            offsets = dict.fromkeys(dtypes, 0)
            for name, meta in ms:
                s = self._states[name]
                s.inverse = None if meta is None else _rebuild(meta, rows, r, offsets, s.layer.weight.device)


def _packed_numel(shape: tuple[int, ...], sym: bool) -> int:
    """Entries sent for a tensor of this shape: its upper triangles when it is symmetric."""
    n = 1
    for d in shape[:-2] if sym else shape:
        n *= d
    return n * shape[-1] * (shape[-1] + 1) // 2 if sym else n


def _triu_values(t: torch.Tensor) -> torch.Tensor:
    """The upper triangles of a stack of symmetric matrices, flat (the lower ones are their mirror)."""
    iu = torch.triu_indices(t.shape[-1], t.shape[-1], device=t.device)
    return t[..., iu[0], iu[1]].reshape(-1)


def _from_triu(vals: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The stack of symmetric matrices of ``shape`` whose upper triangles are ``vals``."""
    d = shape[-1]
    iu = torch.triu_indices(d, d, device=vals.device)
    out = vals.new_empty(shape)
    v = vals.reshape(*shape[:-2], -1)
    out[..., iu[0], iu[1]] = v
    out[..., iu[1], iu[0]] = v
    return out


def _describe(inv: LayerInverse | None) -> tuple[dict | None, list[torch.Tensor]]:
    """An inverse as (picklable metadata, its float tensors in order); None stays None."""
    if inv is None:
        return None, []
    state = inv.state()
    meta = {**{k: v for k, v in state.items() if k != "tensors"}, "floats": [], "others": {}}
    floats = []
    for attr, t in state["tensors"].items():
        if t.is_floating_point():
            sym = t.dim() >= 2 and t.shape[-1] == t.shape[-2] and torch.equal(t, t.mT)
            meta["floats"].append((attr, tuple(t.shape), str(t.dtype), sym))
            floats.append(_triu_values(t) if sym else t.reshape(-1))
        else:  # index tensors (the live / silent coordinates): small, they travel in the metadata
            meta["others"][attr] = t.cpu()
    return meta, floats


def _rebuild(meta: dict, rows: dict[str, torch.Tensor], rank: int, offsets: dict[str, int],
             device: torch.device) -> LayerInverse:
    """The inverse described by ``meta``, its float tensors read from ``rank``'s gathered rows at ``offsets``."""
    tensors = dict(meta["others"])
    for attr, shape, dt, sym in meta["floats"]:
        n = _packed_numel(shape, sym)
        vals = rows[dt][rank, offsets[dt]: offsets[dt] + n]
        tensors[attr] = _from_triu(vals, shape) if sym else vals.reshape(shape).clone()
        offsets[dt] += n
    state = {k: v for k, v in meta.items() if k not in ("floats", "others")}
    return LayerInverse.from_state({**state, "tensors": tensors}, device)
