"""KFC of a DDP model whose layers come from dynamo: compiled inside or outside DDP, or dynamo capture.

``DDP(torch.compile(model, backend="kfc"))``, ``torch.compile(DDP(model), backend="kfc")`` and dynamo capture all
register their layers in a live registry as dynamo compiles (distributed KFC checks at that point that every
rank compiled the same layers). In 2-rank gloo groups: the same layers as the eager (fx) DDP run, and after a few
KFC steps the eager-DDP parameters (float64, ≤ 1e-10 relative), bitwise equal on both ranks.

Under ``torch.compile(DDP(model))`` dynamo's DDPOptimizer splits the model's graph at DDP's gradient-bucket
boundaries and hands the backend one subgraph per bucket, whose parameters are fake tensors
(``frontend/dynamo/scan.py`` finds the real ones): with a bucket per parameter the five parameterised modules of the
test model become five subgraphs, and the factors after the first statistics step are eager DDP's (≤ 1e-12).
"""
from __future__ import annotations

import torch
from distributed_cases import global_batch, make_model, run_steps, shard
from distributed_harness import run_ranks
from test_distributed import BASE, rel
from torch import nn


def _runs(rank: int, world: int) -> dict:
    import warnings

    from torch.nn.parallel import DistributedDataParallel as DDP

    import kfc_compile as kc

    X, Y = global_batch(4 * world)
    x, y = shard(X, [4] * world, rank), shard(Y, [4] * world, rank)
    out = {}
    for kind in ("eager", "compiled", "capture"):
        model = make_model()
        ddp = DDP(torch.compile(model, backend="kfc") if kind == "compiled" else model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = kc.KFC(ddp, **dict(BASE, fisher="type-2"), frontend="dynamo" if kind == "capture" else "fx")
            steps = run_steps(ddp, opt, x, y, 3, False)
        out[kind] = {"params": steps["params"], "layers": [la.name for la in opt.layers],
                     "live": opt._estimator.live}
    return out


def test_dynamo_front_ends_under_ddp_match_eager():
    """The compiled and captured DDP models register the eager layers and take the eager-DDP steps."""
    out = run_ranks(2, _runs)
    for r in out:
        assert r["eager"]["layers"] == ["0", "2", "6", "9"] and not r["eager"]["live"]
        for kind in ("compiled", "capture"):
            assert r[kind]["layers"] == r["eager"]["layers"] and r[kind]["live"], kind
            for step in range(3):
                for a, b in zip(r[kind]["params"][step], r["eager"]["params"][step], strict=True):
                    assert rel(a, b) <= 1e-10, (kind, step)
                assert all(torch.equal(a, b) for a, b in zip(r[kind]["params"][step], out[0][kind]["params"][step],
                                                             strict=True))


class Wrapped(nn.Module):
    """The test model inside a module whose forward lives in a user file (dynamo traces it as a frame of its own)."""

    def __init__(self):
        super().__init__()
        self.body = make_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SplitBias(nn.Module):
    """``x @ W.T + b``: with a bucket per parameter, DDPOptimizer puts the matmul and the bias add in two subgraphs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.W = nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(5, dtype=torch.float64))
        self.out = nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(x @ self.W.T + self.b))


STEPS = 5
CONFIGS = {"sequential": dict(BASE, fisher="type-2"),  # nn.Sequential: its forward gets a traced frame
           "wrapped": dict(BASE, fisher="empirical", damping_method="eigen")}


def _compiled_ddp(rank: int, world: int) -> dict:
    """Eager ``KFC(DDP(m))`` and ``KFC(torch.compile(DDP(m), backend="kfc"))`` with one gradient bucket per parameter.

    The compiled runs use the AOTAutograd inner backend (``aot_eager``: the graphs inductor would get, without its
    code generation, which takes minutes on two shared cores).
    """
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    import kfc_compile as kc

    X, Y = global_batch(4 * world)
    x, y = shard(X, [4] * world, rank), shard(Y, [4] * world, rank)
    out = {}
    for kind, cfg in [*CONFIGS.items(), ("split", dict(BASE, fisher="empirical"))]:
        for compiled in (False, True):
            model = {"wrapped": Wrapped, "split": SplitBias}.get(kind, make_model)()
            inputs = x.flatten(1)[:, :4] if kind == "split" else x
            first = dist._DEFAULT_FIRST_BUCKET_BYTES
            dist._DEFAULT_FIRST_BUCKET_BYTES = 1  # DDP's and DDPOptimizer's first bucket: one parameter too
            try:
                ddp = DDP(model, bucket_cap_mb=1e-6 if compiled else 25)
                run = torch.compile(ddp, backend="kfc", options={"inner": "aot_eager"}) if compiled else ddp
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    opt = kc.KFC(run, **cfg)
                    steps = run_steps(run, opt, inputs, y, STEPS, False)
            finally:
                dist._DEFAULT_FIRST_BUCKET_BYTES = first
            out[kind, compiled] = {
                "params": steps["params"], "factors": steps["factors"], "live": opt._estimator.live,
                "layers": [(la.name, la.kind, la.a_dim, la.g_dim, la.bias is not None) for la in opt.layers],
                "graphs": run.kfc.graphs if compiled else None,
                "fallback": sorted(opt.fallback_names)}
    model = make_model()  # a refused set-up leaves the model as it was (no traced forward left on it)
    compiled = torch.compile(DDP(model), backend="kfc")
    try:
        kc.KFC(compiled, lr=0.1, distributed=False)
    except ValueError as e:
        out["refused"] = (str(e), "forward" in model.__dict__, "kfc" in compiled.__dict__)
    return out


def test_compiled_ddp_matches_eager_ddp():
    """``torch.compile(DDP(m), backend="kfc")``: every DDPOptimizer subgraph tapped, eager DDP's layers and steps."""
    out = run_ranks(2, _compiled_ddp)
    for r in out:
        for kind in CONFIGS:
            eager, comp = r[kind, False], r[kind, True]
            prefix = "body." if kind == "wrapped" else ""
            assert [la[0] for la in eager["layers"]] == [prefix + n for n in ("0", "2", "6", "9")]
            assert comp["layers"] == eager["layers"] and comp["live"] and not eager["live"], kind
            assert comp["fallback"] == eager["fallback"], kind  # the LayerNorm (no module. prefix either)
            assert comp["graphs"] == 5, kind  # one subgraph per bucket: conv, conv, linear, LayerNorm, linear
            assert comp["factors"].keys() == eager["factors"].keys()
            for name, (A, G) in eager["factors"].items():
                A2, G2 = comp["factors"][name]
                assert rel(A2, A) <= 1e-12 and rel(G2, G) <= 1e-12, (kind, name)
            for step in range(STEPS):
                for a, b in zip(comp["params"][step], eager["params"][step], strict=True):
                    assert rel(a, b) <= 1e-10, (kind, step)
                assert all(torch.equal(a, b) for a, b in zip(comp["params"][step], out[0][kind, True]["params"][step],
                                                             strict=True))
        # A bias add split from its matmul, as across a graph break: the weight is a bias-free layer, the bias
        # goes to the fallback (eager: one layer with its bias).
        assert r["split", False]["layers"] == [("W", "linear", 5, 5, True), ("out", "linear", 6, 3, True)]
        assert r["split", True]["layers"] == [("W", "linear", 4, 5, False), ("out", "linear", 6, 3, True)]
        assert r["split", False]["fallback"] == [] and r["split", True]["fallback"] == ["b"]
        assert r["split", True]["graphs"] == 3
        msg, *left = r["refused"]
        assert msg.startswith("distributed=False with a DistributedDataParallel model") and left == [False, False]


def test_fake_parameter_resolution():
    """A subgraph's fake parameter is the real one its placeholder's ``grapharg`` holds; without one, a warning."""
    import types
    import warnings

    import torch.fx as fx
    from torch._dynamo.utils import to_fake_tensor
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kfc_compile.frontend.dynamo.scan import _real_parameter

    p = nn.Parameter(torch.randn(3, 2))
    fake = to_fake_tensor(p, FakeTensorMode())
    assert isinstance(fake, nn.Parameter)  # what DDPOptimizer hands the backend
    graph = fx.Graph()
    known, unknown, activation = graph.placeholder("w"), graph.placeholder("v"), graph.placeholder("x")
    known.meta["grapharg"] = types.SimpleNamespace(example=p)  # dynamo's GraphArg: .example is the real input
    assert _real_parameter(known, fake) is p
    assert _real_parameter(known, p) is p  # an unsplit graph: the parameter itself
    assert _real_parameter(activation, torch.randn(3)) is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _real_parameter(unknown, fake) is None
    assert any("'v' is a fake parameter whose model parameter is unknown" in str(w.message) for w in caught)
