"""``kfc-compile zoo`` / ``zoo.run``: a small CI subset, broken models reported, and the JSON schema.

Broken models are reported without stopping the sweep.
"""
from __future__ import annotations

import json
import math

import pytest
import torchvision
from torch import nn

from kfc_compile.tools import zoo
from kfc_compile.tools.cli import main
from kfc_compile.tools.zoo import ROW_KEYS, SCHEMA_VERSION

ROW_KEY_SET = {"name", "family", "status", "error", "trained", "input_shape", "params", "trainable_params",
               "kfc_layers", "layers_by_kind", "coverage", "black_boxes", "uncovered", "loss_before", "loss_after",
               "loss_decreased", "steps", "kfc_step_s", "sgd_step_s", "step_time_ratio", "factor_bytes", "seconds"}


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).relu().mean((2, 3)))


class ForwardRaises(SmallNet):
    def forward(self, x):
        raise RuntimeError("broken forward")


def broken_constructor():
    raise RuntimeError("broken constructor")


@pytest.fixture(scope="module")
def ci_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    # torchvision models through (name, constructor) pairs with 10 classes: keeps the 1000-class Γ inverses out of
    # the CI time (by name, "squeezenet1_1" works the same with 1000 classes)
    rows = zoo.run([("squeezenet1_1", lambda: torchvision.models.squeezenet1_1(num_classes=10)),
                       ("broken_ctor", broken_constructor), ("small", SmallNet), ("broken_forward", ForwardRaises),
                       ("mobilenet_v3_small", lambda: torchvision.models.mobilenet_v3_small(num_classes=10))],
                      steps=2, resolution=16, batch=8, out=str(out), progress=False)
    return out, rows


def test_ci_subset_trains(ci_rows):
    _, rows = ci_rows
    by = {r["name"]: r for r in rows}
    for name in ("squeezenet1_1", "small", "mobilenet_v3_small"):
        r = by[name]
        assert r["status"] == "ok", r["error"]
        assert r["trained"] and r["steps"] == 2
        assert math.isfinite(r["loss_before"]) and math.isfinite(r["loss_after"]) and r["loss_decreased"]
        assert r["coverage"] > 0.9 and r["kfc_layers"] > 0 and sum(r["layers_by_kind"].values()) == r["kfc_layers"]
        assert r["factor_bytes"] > 0 and r["kfc_step_s"] > 0 and r["sgd_step_s"] > 0 and r["step_time_ratio"] > 0
    assert by["small"]["layers_by_kind"] == {"conv2d": 1, "linear": 1}
    assert by["small"]["uncovered"] == {"BatchNorm2d: normalization layer (not conv/linear)":
                                        {"count": 2, "numel": 16, "params": ["bn.weight", "bn.bias"]}}


def test_broken_models_reported_without_stopping(ci_rows):
    out, rows = ci_rows
    assert [r["name"] for r in rows] == ["squeezenet1_1", "broken_ctor", "small", "broken_forward",
                                         "mobilenet_v3_small"]
    by = {r["name"]: r for r in rows}
    assert by["broken_ctor"]["status"] == "failed" and "broken constructor" in by["broken_ctor"]["error"]
    assert by["broken_forward"]["status"] == "failed" and "broken forward" in by["broken_forward"]["error"]
    md = (out / "zoo.md").read_text()
    assert "broken constructor" in md and "| mobilenet_v3_small |" in md and "failed 2" in md


def test_json_schema_is_stable(ci_rows):
    out, rows = ci_rows
    assert set(ROW_KEYS) == ROW_KEY_SET
    doc = json.loads((out / "zoo.json").read_text())
    assert set(doc) == {"schema_version", "run", "models"} and doc["schema_version"] == SCHEMA_VERSION == 1
    assert len(doc["models"]) == 5
    for r in doc["models"]:
        assert set(r) == ROW_KEY_SET
    assert all(set(r) == ROW_KEY_SET for r in rows)


def test_cli_zoo(tmp_path, capsys):
    assert main(["zoo", "--models", "small_unknown_name", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "failed 1" in capsys.readouterr().out
    doc = json.loads((tmp_path / "zoo.json").read_text())
    assert doc["models"][0]["status"] == "failed" and set(doc["models"][0]) == ROW_KEY_SET


class Slow(SmallNet):
    def forward(self, x):
        import time

        time.sleep(120)  # far past the limit: a row back well before this proves the worker was stopped
        return super().forward(x)


def test_time_limit_stops_a_model_without_stopping_the_sweep(tmp_path):
    """A model over the per-model limit runs in a worker that is killed; its row is failed with the reason.

    The row keeps what was measured before (here the parameter count), and the next model still runs.
    """
    rows = zoo.run([("slow", Slow), ("small", SmallNet)], steps=1, resolution=8, batch=2, out=str(tmp_path),
                      progress=False, time_limit=10, timing_steps=1)
    slow, small = rows
    assert slow["status"] == "failed" and "time limit" in slow["error"] and slow["error"].startswith("input")
    # the limit counts from the worker's start (the fork server's start-up included, slow on a loaded machine)
    assert slow["params"] == small["params"] and 10 <= slow["seconds"] < 60
    assert set(slow) == ROW_KEY_SET
    assert small["status"] == "ok", small["error"]
    assert small["trained"] and small["step_time_ratio"] > 0
    doc = json.loads((tmp_path / "zoo.json").read_text())
    assert doc["run"]["time_limit"] == 10 and all(set(r) == ROW_KEY_SET for r in doc["models"])
    assert "time limit" in (tmp_path / "zoo.md").read_text()


def test_cli_zoo_bad_family(capsys):
    with pytest.raises(SystemExit):
        main(["zoo", "--family", "audio"])


def test_vit_is_built_for_the_requested_resolution():
    """ViT fixes its image size at construction: the sweep builds it for a multiple of its patch size.

    That is the smallest multiple of the patch size at or above the requested resolution (224, the published size,
    when none is requested).
    """
    assert zoo.resolutions("vit_b_16", requested=32) == (32,)
    assert zoo.resolutions("vit_h_14", requested=32) == (42,)
    assert zoo.resolutions("vit_l_32") == (224,)
    assert zoo.resolutions("resnet18", requested=32) == (32, 64, 128, 224)
