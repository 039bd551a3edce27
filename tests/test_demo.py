"""The demo's Python API: data (no downloads), models, time-to-target bookkeeping, a tiny end-to-end run."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

import kfc_compile as kc
from kfc_compile.tools.demo import DemoError, RunResult, build_model, load_task, paper_cifar_net, run_demo

pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TINY_GRIDS = {"kfc": (0.003,), "sgd": (0.3, 0.1), "adam": (0.01,)}


def test_digits_split_and_shapes():
    ds = load_task("digits")
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797 and len(ds.y_test) == 359
    assert abs(float(ds.x_train.mean())) < 1e-4  # standardised on the training split


def test_mnist1d_is_generated_locally_and_keeps_global_rng(monkeypatch):
    requests = pytest.importorskip("requests")

    def no_network(*a, **k):
        raise AssertionError("mnist1d tried to download")

    monkeypatch.setattr(requests, "get", no_network)
    from kfc_compile.tools.demo import data

    np.random.seed(123), random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    ds = data._mnist1d(num_samples=400)  # a small fresh generation (the demo's 5000 are cached per process)
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    assert ds.input_shape == (1, 40) and len(ds.y_train) == 320 and len(ds.y_test) == 80
    assert ds.x_train.dtype == torch.float32 and set(ds.y_train.tolist()) <= set(range(10))


@pytest.mark.parametrize("task,shape", [("digits", (1, 8, 8)), ("mnist1d", (1, 40))])
@pytest.mark.parametrize("name", ["convnet", "mlp"])
def test_models_fit_their_tasks(task, shape, name):
    m = build_model(name, task, shape, 10)
    assert m(torch.zeros(3, *shape)).shape == (3, 10)


def test_paper_net_factor_sizes():
    """docs/algorithm.md §10.1: Ω is 76 / 801 / 801 / 1025 wide, Γ 32 / 32 / 64 / 10."""
    tm = kc.transform(paper_cifar_net())
    dims = [(layer.a_dim, layer.g_dim) for layer in tm.kfc.layers]
    assert dims == [(76, 32), (801, 32), (801, 64), (1025, 10)]
    assert tm(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_model_errors():
    with pytest.raises(DemoError, match="3×32×32"):
        build_model("paper", "digits", (1, 8, 8), 10)
    with pytest.raises(DemoError, match="resnet18"):
        build_model("resnet18", "mnist1d", (1, 40), 10)
    with pytest.raises(DemoError, match="unknown model"):
        build_model("vgg", "digits", (1, 8, 8), 10)


def test_time_to_target_bookkeeping():
    r = RunResult("sgd", 0.1, 0, target=0.5, steps=[0, 10, 20, 30], seconds=[0, 1.0, 2.0, 3.0],
                  train_loss=[2.0, 0.7, 0.5, 0.2])
    assert (r.steps_to_target, r.seconds_to_target, r.final_loss) == (20, 2.0, 0.2)
    miss = RunResult("sgd", 0.3, 0, target=0.1, steps=[0, 10], seconds=[0, 1.0], train_loss=[2.0, 0.7])
    div = RunResult("sgd", 1.0, 0, target=0.1, steps=[0, 10], seconds=[0, 1.0], train_loss=[2.0, math.nan],
                    diverged=True)
    assert miss.steps_to_target is None and div.final_loss == math.inf
    assert sorted([div, miss, r], key=RunResult.tuning_key) == [r, miss, div]


def test_bad_options():
    with pytest.raises(DemoError, match="unknown task"):
        run_demo("imagenet", out=None, progress=False)
    with pytest.raises(DemoError, match="--data-dir"):
        run_demo("cifar10", out=None, progress=False)
    with pytest.raises(DemoError, match="unknown optimizer"):
        run_demo("digits", optimizers=("lbfgs",), out=None, progress=False)
    with pytest.raises(DemoError, match="steps"):
        run_demo("digits", steps=0, out=None, progress=False)
    with pytest.raises(DemoError, match="larger than the training set"):
        run_demo("digits", steps=2, batch_size=5000, optimizers=("sgd",), grids={"sgd": (0.1,)}, out=None,
                 progress=False)


def test_tiny_demo_writes_plot_and_table(tmp_path):
    png = tmp_path / "sub" / "demo.png"
    res = run_demo("digits", steps=6, tune_steps=3, eval_every=3, grids=TINY_GRIDS, target=1.0, out=str(png),
                   progress=False)
    assert png.read_bytes()[:8] == PNG_MAGIC and res.plot == str(png)
    assert set(res.runs) == {"kfc", "sgd", "adam"} and len(res.tuning["sgd"]) == 2 and "kfc" not in res.tuning
    for r in res.runs.values():
        assert r.steps == [0, 3, 6] and len(r.seconds) == 3 and r.seconds[-1] > 0
        assert r.test_acc is not None and 0.0 <= r.test_acc <= 1.0
    table = res.table()
    for word in ("KFC-pre", "SGD+momentum", "Adam", "steps to target", "test acc", "target training loss 1"):
        assert word in table

