"""KFC checkpoints through ``torch.distributed.checkpoint`` (DCP): FSDP2, DDP, single process, across world sizes.

One 2-rank gloo group (module fixture) trains FSDP2 and DDP runs of the float64 test model, writes a DCP checkpoint
(``opt.distributed_state_dict()`` next to ``get_model_state_dict(model)``) and a plain one after 3 steps, goes on
for 3 more, and resumes fresh runs from the DCP checkpoints (tests/dcp_cases.py). The parent writes a
single-process checkpoint the same way. References: the uninterrupted run (bitwise at the same world size, ≤ 1e-10
relative across world sizes, where the gradient means sum in another order) and the plain-state_dict path, which
loads the same state: bitwise.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from dcp_cases import BEFORE, build, data, go_on, resume_dcp, resume_plain, save_dcp, three_ranks, two_ranks, write
from distributed_cases import make_model, run_steps
from distributed_harness import run_ranks
from test_distributed import BASE, rel
from torch.distributed.checkpoint.api import CheckpointException

import kfc_compile as kc

KFC = dict(BASE, fisher="empirical", damping_method="eigen", fallback="adam")
LAYERS = ["0", "2", "6", "9"]


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(rel(p, q) for p, q in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[str, dict, list[dict]]:
    d = str(tmp_path_factory.mktemp("dcp"))
    single = write("plain", KFC, d, 0, 0)
    return d, single, run_ranks(2, two_ranks, KFC, d)


def test_same_world_size_resume_is_bitwise(written):
    """FSDP2 and DDP, 2 ranks: 4 steps, DCP save, fresh model and KFC, DCP load, 3 steps == 7 uninterrupted steps.

    Under FSDP2 and DDP's ``distributed="owner"`` each rank's optimizer dict holds the layers it owns only
    (together: every layer once, the bytes of the single process's), under FSDP2 with its shards of the momentum
    and Adam buffers as DTensors; under DDP's default (each inverse gathered by all) every rank holds every layer
    and DCP writes each once.
    """
    _, single, ranks = written
    for kind in ("fsdp", "ddp", "ddp_owner"):
        for r in ranks:
            assert _equal(r[kind]["resumed"], r[kind]["straight"]), kind
            assert _equal(r[kind]["straight"], ranks[0][kind]["straight"]), kind
    for kind in ("fsdp", "ddp_owner"):
        held = [r[kind]["saved"]["layers"] for r in ranks]
        assert sorted(n for h in held for n in h) == LAYERS and all(held)
        assert sum(r[kind]["saved"]["layer_bytes"] for r in ranks) == single["saved"]["layer_bytes"]
    assert all(r["ddp"]["saved"]["layers"] == LAYERS for r in ranks)
    dtensors = ranks[0]["fsdp"]["saved"]["dtensors"]
    assert "state.6.weight.momentum_buffer" in dtensors and "state.7.weight.exp_avg" in dtensors
    assert not ranks[0]["ddp"]["saved"]["dtensors"]
    assert _close(ranks[0]["fsdp"]["straight"], single["straight"]) <= 1e-10  # the 2-rank run is the global batch's


def test_single_process_checkpoint_into_fsdp(written):
    """A single-process DCP checkpoint resumes under FSDP2 (2 ranks) as the single process goes on."""
    _, single, ranks = written
    for r in ranks:
        assert _close(r["from_single"], single["straight"]) <= 1e-10


def test_other_world_sizes(written):
    """The 2-rank FSDP2 DCP checkpoint into 1 process and into 3 FSDP2 ranks (the layers re-owned, DTensors resharded).

    Each equals the plain-state_dict path from the same point bitwise, and the uninterrupted 2-rank run ≤ 1e-10.
    """
    d, _, ranks = written
    straight = ranks[0]["fsdp"]["straight"]
    one = go_on(*resume_dcp("plain", KFC, f"{d}/fsdp2"), 0, 0)
    assert _equal(one, go_on(*resume_plain("plain", KFC, f"{d}/fsdp2.pt"), 0, 0))
    assert _close(one, straight) <= 1e-10
    three = run_ranks(3, three_ranks, KFC, d)
    for r in three:
        assert _equal(r["dcp"], r["plain"]) and _equal(r["dcp"], three[0]["dcp"])
    assert _close(three[0]["dcp"], straight) <= 1e-10


@pytest.mark.parametrize("kfc", [dict(KFC, damping_method="factored", fallback="sgd", averaging=4.0),
                                 dict(KFC, max_factor_dim=40)])
def test_fresh_template_and_single_process_round_trip(kfc, tmp_path):
    """A fresh KFC's dict has every key, shape and dtype of a trained one (live-block and blocked inverses too).

    So ``dcp.load`` fills it in place; the resume is bitwise the uninterrupted run.
    """
    silent = kfc["damping_method"] == "factored"  # the first linear layer's inverse on its live block
    fresh = kc.KFC(make_model(silent), **kfc).distributed_state_dict()
    model = make_model(silent)
    opt = kc.KFC(model, **kfc)
    x, y = data(0, 0)
    run_steps(model, opt, x, y, BEFORE, False)
    if silent:
        assert opt.layer_state("6").inverse.live is not None
    trained = opt.distributed_state_dict()
    assert sorted(trained) == sorted(fresh)
    for k, v in trained.items():
        assert type(v) is type(fresh[k]), k
        if isinstance(v, torch.Tensor):
            assert (v.shape, v.dtype) == (fresh[k].shape, fresh[k].dtype), k
    path = str(tmp_path / "ckpt")
    save_dcp(model, opt, path)
    straight = go_on(model, model, opt, 0, 0)
    model2, _, opt2 = _resume(make_model(silent), kfc, path)
    assert _equal(go_on(model2, model2, opt2, 0, 0), straight)


def _resume(model, kfc: dict, path: str):
    opt = kc.KFC(model, **kfc)
    sd = {"model": model.state_dict(), "optim": opt.distributed_state_dict()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(sd, checkpoint_id=path)
    model.load_state_dict(sd["model"])
    opt.load_distributed_state_dict(sd["optim"])
    return model, model, opt


def _load_error(opt: kc.KFC, path: str) -> str:
    """The error of loading the DCP checkpoint at ``path`` into ``opt``.

    ``dcp.load`` refuses a template key the checkpoint lacks or has with another size (DCP's planning, before it
    reads anything; raised as a ``CheckpointException`` carrying the rank's error), the KFC load the rest.
    """
    sd = opt.distributed_state_dict()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"optim": sd}, checkpoint_id=path)
        opt.load_distributed_state_dict(sd)
    except (ValueError, RuntimeError, CheckpointException) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def test_bad_checkpoints_are_refused_and_change_nothing(tmp_path):
    """Another model, options or factor layout: a clear error, and the optimizer's state stays as it was."""
    model, _, opt = build("plain", KFC)
    x, y = data(0, 0)
    run_steps(model, opt, x, y, 2, False)
    path = str(tmp_path / "ckpt")
    save_dcp(model, opt, path)
    cases = {
        "approx": dict(KFC, approx="reduce"),
        "fallback": dict(KFC, fallback="sgd"),
        "layout": dict(KFC, max_factor_dim=40),
    }
    for what, kfc in cases.items():
        other_model = make_model()
        other = kc.KFC(other_model, **kfc)
        run_steps(other_model, other, x, y, 1, False)  # some state of its own to keep
        before = copy.deepcopy(other.state_dict())
        err = _load_error(other, path)
        assert err != "no error", what
        after = other.state_dict()
        assert after["kfc"]["step"] == before["kfc"]["step"] and _same(after, before), what
        cases[what] = err
    assert cases["approx"].startswith("ValueError: state_dict was saved with approx='expand'")
    # dcp.load: the SGD fallback's momentum slot is not in the checkpoint
    assert "Missing key in checkpoint state_dict: optim.state.7.weight.momentum_buffer" in cases["fallback"]
    assert "ValueError: Size mismatch" in cases["layout"] and "optim.kfc.layers.6.A" in cases["layout"]
    small = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
    err = _load_error(kc.KFC(small, **KFC), path)  # another model: its parameters have other sizes
    assert "saved torch.Size([4, 2, 3, 3]) and current: torch.Size([2, 3]) for optim.state.0.weight" in err
    with pytest.raises(ValueError, match="not a KFC distributed state dict"):
        opt.load_distributed_state_dict(opt.state_dict())
    compiled = kc.KFC(torch.compile(make_model(), backend="kfc"), **KFC)  # no layer compiled yet: no template
    with pytest.raises(RuntimeError, match="needs its layers: run the compiled model's forward once"):
        compiled.distributed_state_dict()


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b, strict=True))
    return a == b or (a != a and b != b)
