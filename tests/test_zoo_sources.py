"""The zoo's timm and HF sources: a CI subset of both sweeps, the family rule, the conv/linear share and its checks.

A few timm models (one traced by torch.fx, one captured by dynamo) and HF architectures (a causal LM with a tied
head and HF ``Conv1D`` layers, an encoder, a vision transformer) train with a finite decreasing loss and have every
conv/linear parameter under KFC, eager and compiled; the weight tied to the embeddings is reported, not counted.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

import kfc_compile as kc
from kfc_compile.tools import zoo
from kfc_compile.tools.cli import main

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()


def test_timm_family_rule():
    """The family is the leading run of lower-case letters; test models are left out; the smallest member wins."""
    fam = zoo.timm_models.family_of
    assert [fam(n) for n in ("resnet18", "resnet50d", "resnetv2_50", "vit_tiny_patch16_224", "convnextv2_atto",
                             "tf_efficientnet_b0", "xcit_nano_12_p8_224")] == [
        "resnet", "resnet", "resnetv", "vit", "convnextv", "tf", "xcit"]
    names = ["resnet50", "resnet18", "resnet10t", "vit_small_patch16_224", "vit_tiny_patch16_224", "test_vit"]
    assert zoo.timm_models.families(names) == {"resnet": ["resnet50", "resnet18", "resnet10t"],
                                               "vit": ["vit_small_patch16_224", "vit_tiny_patch16_224"]}
    counts = zoo.timm_models.param_counts(names[:3], cache=False)
    assert counts == {n: sum(p.numel() for p in timm.create_model(n).parameters()) for n in names[:3]}
    assert zoo.timm_models.default_names(names, cache=False) == ["resnet10t", "vit_tiny_patch16_224"]


def test_timm_cases_are_built_for_the_resolution():
    case = zoo.timm_models.case("vit_tiny_patch16_224", resolution=32)
    assert case.resolutions == (32, 64, 128, 224) and case.per_resolution
    assert case.build(32).patch_embed.img_size == (32, 32)
    assert zoo.timm_models.resolutions("resnet10t", 100) == (100, 128, 176, 224)  # its own default size: 176


def _check_trained(r: dict) -> None:
    assert r["status"] == "ok", (r["error"], r["compiled_error"])
    assert r["trained"] and r["loss_decreased"], (r["loss_before"], r["loss_after"])
    assert r["warnings"] == [], r["warnings"]
    assert set(zoo.ROW_KEYS) | set(zoo.DETAIL_KEYS) == set(r)


@pytest.fixture(scope="module")
def source_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo-sources")
    cases = zoo.timm_models.cases(["resnet10t", "vit_tiny_patch16_224"]) + zoo.hf_models.cases(["gpt2", "bert",
                                                                                                   "vit"])
    rows = zoo.run(cases, steps=2, batch=8, out=str(out), progress=False, timing_steps=0, detail=True,
                   compiled=True, source="test")
    return out, {r["name"]: r for r in rows}


def test_timm_subset(source_rows):
    _, by = source_rows
    fx, dyn = by["resnet10t"], by["vit_tiny_patch16_224"]
    for r in (fx, dyn):
        _check_trained(r)
        assert r["source"] == "timm" and r["input_shape"] == [8, 3, 32, 32]
        assert r["linear_coverage"] == 1.0 and r["compiled_linear_coverage"] == 1.0 and r["tied"] == []
        assert r["linear_uncovered"] == {} and r["compiled_linear_uncovered"] == {}
    assert (fx["frontend"], dyn["frontend"]) == ("fx", "dynamo")  # ViT's forward has a None default
    assert fx["family"] == "resnet" and fx["layers_by_kind"] == {"conv2d": 14, "linear": 1}
    assert dyn["compiled_coverage"] == pytest.approx(dyn["coverage"])


def test_hf_subset(source_rows):
    out, by = source_rows
    for name in ("gpt2", "bert", "vit"):
        r = by[name]
        _check_trained(r)
        assert r["source"] == "hf" and r["frontend"] == "dynamo"
        assert r["linear_coverage"] == 1.0 and r["compiled_linear_coverage"] == 1.0
    gpt2 = by["gpt2"]
    assert gpt2["input_shape"] == [8, 16] and gpt2["layers_by_kind"] == {"matmul": 8}  # Conv1D; the head is tied
    assert gpt2["tied"] == ["lm_head.weight = transformer.wte.weight"]
    assert "weight also used by embedding (only conv/linear calls are under KFC)" in gpt2["uncovered"]
    assert by["bert"]["tied"] == [] and by["bert"]["layers_by_kind"] == {"linear": 14}
    doc = json.loads((out / "zoo.json").read_text())
    assert doc["run"]["compiled"] is True and doc["run"]["source"] == "test"
    md = (out / "zoo.md").read_text()
    assert "conv/linear share under KFC" in md and "| gpt2 | causal-lm | ok | dynamo | 16 |" in md
    assert "`lm_head.weight = transformer.wte.weight`" in md


def test_hf_list_covers_the_architectures():
    archs = zoo.hf_models.ARCHITECTURES
    assert len(archs) >= 15 and len({a.name for a in archs}) == len(archs)
    assert {a.family for a in archs} == set(zoo.hf_models.FAMILIES)
    gpt2 = zoo.hf_models.build("gpt2")
    assert sum(p.numel() for p in gpt2.parameters()) < 200_000  # small configs, built without downloading


def test_a_loss_spec_that_is_not_the_models_loss_fails_the_row():
    """The model gets the labels and its own loss must equal the zoo's objective: unshifted logits do not."""
    case = dataclasses.replace(zoo.hf_models.case("gpt2"), objective_output=lambda out: out.logits[:, 1:])
    row = zoo.run_one("gpt2", case=case, timing_steps=0)
    assert row["status"] == "failed" and "differs from the zoo's objective" in row["error"]
    assert row["error"].startswith("input")


class Tied(nn.Module):
    """An LM head tied to the embedding (with its own bias), and a linear whose weight is also used elsewhere."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.fc(self.emb(ids)) + self.fc.weight.sum()
        return self.head(h)


def test_linear_share_of_tied_and_uncovered_weights():
    model = Tied()
    tm = kc.transform(model)
    params, tied = zoo.conv_linear_params(model)
    assert sorted(n for n, _ in params.values()) == ["fc.bias", "fc.weight"]
    assert tied == ["head.weight = emb.weight", "head.bias (the bias of a tied layer)"]
    share = zoo.linear_share(model, tm.kfc)
    assert share["linear_numel"] == 20 and share["linear_coverage"] == 0.0
    assert sum(d["count"] for d in share["linear_uncovered"].values()) == 2


def test_cli_hf_source(tmp_path, capsys):
    assert main(["zoo", "--source", "hf", "--models", "resnet", "--timing-steps", "0", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    doc = json.loads((tmp_path / "zoo.json").read_text())
    (row,) = doc["models"]
    assert row["name"] == "resnet" and row["status"] == "ok" and set(zoo.DETAIL_KEYS) <= set(row)
    assert row["compiled_linear_coverage"] is None  # --compiled not given
    assert main(["zoo", "--source", "hf", "--models", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown hf architectures" in capsys.readouterr().err
    assert main(["zoo", "--source", "hf", "--family", "video", "--out", str(tmp_path)]) == 2


def test_hf_vision_model_input_is_pixels():
    case = zoo.hf_models.case("vit")
    args, kwargs = case.inputs(None, 4, torch.Generator().manual_seed(0))
    assert args == () and set(kwargs) == {"pixel_values"} and kwargs["pixel_values"].shape == (4, 3, 32, 32)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


class Other(Small):
    pass


def test_resume_keeps_the_rows_of_an_interrupted_sweep(tmp_path):
    first = zoo.run([("a", Small)], steps=1, resolution=8, batch=4, out=str(tmp_path), progress=False,
                    timing_steps=0)
    rows = zoo.run([("b", Other), ("a", Small)], steps=1, resolution=8, batch=4, out=str(tmp_path),
                   progress=False, timing_steps=0, resume=True)
    assert [r["name"] for r in rows] == ["b", "a"] and rows[1] == first[0]  # a kept as it was, in sweep order
    assert rows[0]["status"] == "ok"
    doc = json.loads((tmp_path / "zoo.json").read_text())
    assert doc["run"]["resumed"] == 1 and doc["run"]["n_models"] == 2 and len(doc["models"]) == 2
