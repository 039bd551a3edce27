"""What the ranks of tests/test_distributed.py run (importable by spawned processes), and its single-process twin.

One small float64 model (two convs, two linears, a LayerNorm whose parameters go to the fallback), one global
batch; rank r trains ``DDP(model)`` on its shard (``sizes`` examples each, in rank order) with ``kc.KFC``, and
:func:`train` returns what the tests compare: parameters after every step, the factors after step 1, the inverse
computations per layer (counted at ``LayerInverse.compute`` itself), the MC targets drawn.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature import inverses, losses


class Mask(nn.Module):
    """Multiplies by a fixed 0/1 mask (a buffer): the inputs it zeroes are silent coordinates of the next Ω."""

    def __init__(self, n: int, silent: int):
        super().__init__()
        self.register_buffer("mask", (torch.arange(n) >= silent).double())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask


def make_model(silent: bool = False) -> nn.Module:
    """The test model, float64, the same initial parameters in every process.

    ``silent``: the 101-wide Ω of the first linear layer has 20 silent coordinates (inverted on its live block).
    """
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Tanh(),
        nn.Flatten(), Mask(100, 20 if silent else 0), nn.Linear(4 * 5 * 5, 6), nn.LayerNorm(6), nn.ReLU(),
        nn.Linear(6, 3),
    ).double()


def global_batch(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (the same in every process)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def shard(x: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous shard of a global tensor split as ``sizes``."""
    start = sum(sizes[:rank])
    return x[start:start + sizes[rank]]


@contextlib.contextmanager
def counting_inverses(counts: dict[str, int]):
    """Count ``LayerInverse.compute`` calls per layer name (every inverse / eigendecomposition goes through one)."""
    saved = {cls: cls.__dict__["compute"] for cls in inverses.INVERSES.values()}

    def wrap(cls, orig):
        def compute(klass, A, G, eta, scale, name, layout=None):
            counts[name] = counts.get(name, 0) + 1
            return orig.__func__(klass, A, G, eta, scale, name, layout)
        return classmethod(compute)

    for cls, orig in saved.items():
        cls.compute = wrap(cls, orig)
    try:
        yield
    finally:
        for cls, orig in saved.items():
            cls.compute = orig


@contextlib.contextmanager
def recording_samples(drawn: list):
    """Record every MC target tensor drawn (``Loss.sample`` of the cross-entropy)."""
    orig = losses.CrossEntropy.sample

    def sample(self, f, generator=None):
        y = orig(self, f, generator)
        drawn.append(y.clone())
        return y

    losses.CrossEntropy.sample = sample
    try:
        yield
    finally:
        losses.CrossEntropy.sample = orig


def run_steps(model: nn.Module, opt: kc.KFC, x: torch.Tensor, y: torch.Tensor, steps: int, closure: bool,
              reduction: str = "mean") -> dict:
    """``steps`` training steps; the parameters after each, the factors after the first."""
    out = {"params": [], "factors": None}
    for _ in range(steps):
        def loss_fn():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y, reduction=reduction)
            loss.backward()
            return loss
        if closure:
            opt.step(loss_fn)
        else:
            loss_fn()
            opt.step()
        out["params"].append([p.detach().clone() for p in model.parameters()])
        if out["factors"] is None:
            out["factors"] = {s.name: s.dense_factors() for s in opt.layer_states()}
    return out


def train(rank: int, world: int, cfg: dict) -> dict:
    """One rank of a DDP run (``world`` = 0: the single-process reference on the global batch)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    X, Y = global_batch(sum(cfg["sizes"]))
    model = make_model(cfg.get("silent", False))
    if world:
        src = 0 if cfg.get("same_data") else rank  # same_data: every rank trains on the first shard
        x, y = shard(X, cfg["sizes"], src), shard(Y, cfg["sizes"], src)
        wrapped = DDP(model)
    else:
        x, y, wrapped = X, Y, model
    kwargs = dict(cfg["kfc"])
    reduction = cfg.get("reduction", "mean")
    kwargs["loss"] = nn.CrossEntropyLoss(reduction=reduction)
    if not world:
        kwargs.pop("distributed", None)
    if "seed" in cfg:
        kwargs["generator"] = torch.Generator().manual_seed(cfg["seed"])
    counts: dict[str, int] = {}
    drawn: list = []
    with counting_inverses(counts), recording_samples(drawn):
        opt = kc.KFC(wrapped, **kwargs)
        out = run_steps(wrapped, opt, x, y, cfg["steps"], cfg.get("closure", False), reduction)
    out.update(computes=counts, drawn=drawn, last_step=opt.last_step, damping=opt.param_groups[0]["damping"],
               scale=opt._estimator.scale,
               live={s.name: None if s.inverse is None else s.inverse.live is not None for s in opt.layer_states()},
               blocked={s.name: None if s.inverse is None else s.inverse.layout is not None
                        for s in opt.layer_states()})
    return out


def train_many(rank: int, world: int, cfgs: list[dict]) -> list[dict]:
    """:func:`train` for each configuration in turn, in one process group."""
    return [train(rank, world, cfg) for cfg in cfgs]


def build(world: int, cfg: dict, checkpoint: str | None = None) -> tuple[nn.Module, nn.Module, kc.KFC]:
    """(model, what is trained: DDP(model) or model, its KFC), restored from ``checkpoint`` if given."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = make_model()
    saved = None if checkpoint is None else torch.load(checkpoint, weights_only=False)
    if saved is not None:
        model.load_state_dict(saved["model"])
    wrapped = DDP(model) if world else model
    opt = kc.KFC(wrapped, **cfg["kfc"])
    if saved is not None:
        opt.load_state_dict(saved["opt"])
    return model, wrapped, opt


def save(model: nn.Module, opt: kc.KFC, path: str) -> None:
    """The checkpoint: the user's module's state_dict (no DDP prefix) and the optimizer's."""
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)


def data(world: int, rank: int, cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard (world 0: the global batch)."""
    X, Y = global_batch(sum(cfg["sizes"]))
    return (X, Y) if not world else (shard(X, cfg["sizes"], rank), shard(Y, cfg["sizes"], rank))


def resume(rank: int, world: int, cfg: dict, directory: str, single: str | None) -> dict:
    """Checkpoint round trips; the parameters after the last step of each.

    Save after 3 steps on rank 0 and go on for 2 ("straight"); a fresh run resumed from that checkpoint
    ("resumed"); a run resumed from the single-process checkpoint ``single`` ("from_single").
    """
    import torch.distributed as dist

    x, y = data(world, rank, cfg)
    path = f"{directory}/ddp.pt"
    model, wrapped, opt = build(world, cfg)
    run_steps(wrapped, opt, x, y, 3, False)
    state = {"model": model.state_dict(), "opt": opt.state_dict()}  # a collective: every rank calls it
    if rank == 0:
        torch.save(state, path)
    dist.barrier()
    out = {"straight": run_steps(wrapped, opt, x, y, 2, False)["params"][-1]}
    model, wrapped, opt = build(world, cfg, path)
    out["resumed"] = run_steps(wrapped, opt, x, y, 2, False)["params"][-1]
    if single is not None:
        model, wrapped, opt = build(world, cfg, single)
        out["from_single"] = run_steps(wrapped, opt, x, y, 2, False)["params"][-1]
    return out


def error_of(fn) -> str:
    """``fn()``'s error as "Type: message" (the refusals the bad set-ups expect), or "no error"."""
    try:
        fn()
    except (ValueError, NotImplementedError, RuntimeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def bad_setups(rank: int, world: int) -> dict:
    """The errors and warnings of set-ups distributed KFC refuses (their messages, by case)."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    out["false_with_ddp"] = error_of(lambda: kc.KFC(DDP(make_model()), lr=0.1, distributed=False))
    out["options_differ"] = error_of(lambda: kc.KFC(DDP(make_model()), lr=0.1, inverse_every=10 + rank))
    other = make_model() if rank == 0 else nn.Sequential(nn.Linear(3, 3)).double()
    out["layers_differ"] = error_of(lambda: kc.KFC(other, lr=0.1, distributed=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kc.KFC(make_model(), lr=0.1)
    out["plain_module_warning"] = [str(w.message) for w in caught]
    def refresh_failure():  # damping 0: the 101-wide Ω of 8 examples is singular on its owner
        model = make_model()
        ddp = DDP(model)
        opt = kc.KFC(ddp, lr=0.1, damping=0.0, fisher="empirical", stats_fraction=1.0)
        x, y = data(world, rank, {"sizes": [4] * world})
        F.cross_entropy(ddp(x), y).backward()
        opt.step()

    out["refresh_failure"] = error_of(refresh_failure)
    mesh = init_device_mesh("cpu", (world,))
    sharded = nn.Linear(4, 4).double()
    sharded.weight = nn.Parameter(distribute_tensor(sharded.weight.detach(), mesh))
    out["dtensor"] = error_of(lambda: kc.KFC(sharded, lr=0.1, distributed=True))
    return out


def streams_checkpoints_setups(rank: int, world: int, mc_cfgs: list[dict], jobs: list[tuple]) -> dict:
    """One group for the MC-stream runs, the checkpoint round trips and the refused set-ups.

    ``jobs``: (configuration, directory, single-process checkpoint or None) per round trip.
    """
    return {"mc": train_many(rank, world, mc_cfgs),
            "resume": [resume(rank, world, cfg, d, single) for cfg, d, single in jobs],
            "bad": bad_setups(rank, world)}
