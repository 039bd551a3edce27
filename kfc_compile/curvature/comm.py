"""The collectives distributed KFC uses, over one ``torch.distributed`` process group, with their traffic counted.

:class:`Comm` wraps a process group (DDP's, or the default one): sums and weighted means (``all_reduce``),
gathers of flat tensors and of picklable objects (``all_gather``). Every call adds its bytes to
:attr:`Comm.traffic` under a name (``"factors"``, ``"inverses"``, ...), which ``bench/distributed_step.py`` reports:
an all-reduce counts its buffer, a gather the whole gathered result (what each rank receives, its own part
included).

Tensors travel on the backend's device (CUDA for NCCL, the CPU for gloo) and come back on their own.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Traffic:
    """Calls and bytes of one named collective."""

    calls: int = 0
    bytes: int = 0


@dataclass(eq=False)
class Comm:
    """One process group and the collectives KFC runs over it.

    Args:
        group: the process group (None: the default one).

    Raises:
        RuntimeError: ``torch.distributed`` is not available or its process group is not initialised.
    """

    group: object = None
    traffic: dict[str, Traffic] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("distributed KFC needs an initialised torch.distributed process group: call "
                               "torch.distributed.init_process_group(...) first (torchrun sets up its environment), "
                               "or construct KFC with distributed=False")
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        backend = str(dist.get_backend(self.group))
        cuda = "nccl" in backend and torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def _count(self, name: str, nbytes: int) -> None:
        t = self.traffic.setdefault(name, Traffic())
        t.calls += 1
        t.bytes += int(nbytes)

    def all_reduce_(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the ranks; the result is ``t`` itself when it lives on the backend's device."""
        work = t if t.device == self.device else t.to(self.device)
        self._count(name, work.numel() * work.element_size())
        dist.all_reduce(work, group=self.group)
        if work is not t:
            t.copy_(work)
        return t

    def mean(self, name: str, value: float | torch.Tensor, weight: float | None = None) -> float | torch.Tensor:
        """The mean over ranks of ``value`` (weighted by each rank's ``weight`` when given), in float64.

        A float comes back as a float, a tensor as a new tensor of its dtype and device.
        """
        t = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        w = 1.0 if weight is None else float(weight)
        buf = torch.cat([t * w, t.new_tensor([w])]).to(self.device)
        self.all_reduce_(name, buf)
        out = (buf[:-1] / buf[-1]).cpu()
        if isinstance(value, torch.Tensor):
            return out.reshape(value.shape).to(dtype=value.dtype, device=value.device)
        return float(out[0])

    def all_gather(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``(world_size, n)``: the 1-D tensor ``t`` (the same length on every rank) of every rank, by rank."""
        work = t.to(self.device).contiguous()
        out = work.new_empty(self.world_size * work.numel())
        self._count(name, out.numel() * out.element_size())
        dist.all_gather(list(out.view(self.world_size, -1).unbind(0)), work, group=self.group)
        return out.view(self.world_size, -1).to(t.device)

    def reduce_scatter(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """Row ``rank`` of the sum over ranks of the ``(world_size, n)`` tensor ``t`` (a reduce-scatter)."""
        work = t.to(self.device).contiguous()
        out = work.new_empty(work.shape[1])
        self._count(name, work.numel() * work.element_size())
        rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor  # the name torch now prefers
        rs(out, work.reshape(-1), group=self.group)
        return out.to(t.device)

    def all_to_all(self, name: str, t: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
        """The pieces of the 1-D ``t`` (``send_sizes[r]`` entries for rank r, in rank order) exchanged between ranks.

        Returns the concatenation of what every rank sent this one (``recv_sizes[r]`` entries from rank r).
        """
        work = t.to(self.device).contiguous()
        out = work.new_empty(sum(recv_sizes))
        self._count(name, out.numel() * out.element_size())
        dist.all_to_all_single(out, work, recv_sizes, send_sizes, group=self.group)
        return out.to(t.device)

    def all_gather_objects(self, name: str, obj: object) -> list:
        """Every rank's ``obj`` (picklable; tensors in it on the CPU), by rank: two gathers (sizes, then bytes)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self.all_gather(name, torch.tensor([data.numel()], dtype=torch.int64))[:, 0].tolist()
        padded = torch.zeros(max(sizes), dtype=torch.uint8)
        padded[: data.numel()] = data
        rows = self.all_gather(name, padded).cpu()
        return [pickle.loads(rows[r, :n].numpy().tobytes()) for r, n in enumerate(sizes)]


def total(t: torch.Tensor) -> float:
    """The value of a 0-d tensor; for a ``DTensor`` (a sum over sharded parameters) its value over all ranks.

    ``float()`` of a DTensor with a ``Partial`` placement reads this rank's share only.
    """
    full = getattr(t, "full_tensor", None)
    return float(full() if full is not None else t)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a ``DTensor``'s whole tensor (all-gathered) as a plain tensor."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def all_shards(flag: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-d bool ``flag`` computed on this rank's shard of the DTensor ``like``, AND-ed over all its shards."""
    work = flag.to(torch.int32).reshape(1)
    for d in range(like.device_mesh.ndim):
        dist.all_reduce(work, op=dist.ReduceOp.MIN, group=like.device_mesh.get_group(d))
    return work[0].bool()
