"""The detail columns of a sweep: the share of conv/linear parameter elements under KFC, eager and compiled.

The *conv/linear parameters* of a model are found from its modules, independently of KFC's own matching: the
weights and biases of every ``nn.Linear``, ``nn.Conv*d`` / ``nn.ConvTranspose*d`` (torch's ``_ConvNd``, so
subclasses such as timm's ``Conv2dSame`` or ``StdConv2d`` count), HF's ``Conv1D``, and the projection weights
of ``nn.MultiheadAttention``; plus any other parameter KFC takes as a layer (a raw 2-d parameter in ``x @ W.T``).
A conv/linear weight that is also an ``nn.Embedding``'s weight (an LM head tied to the input embeddings) is left out
of the share with the bias of its layer and listed as *tied*: it is an embedding matrix too, which KFC does not
precondition (a weight with another use stays outside KFC). Only trainable parameters count.

The compiled column compiles a fresh build of the model with ``torch.compile(model, backend="kfc",
options={"inner": "eager"})`` and runs one training forward and backward: the ``kfc`` backend scans and taps every
dynamo graph before it hands it to the inner backend, so the layers are those of ``torch.compile(model,
backend="kfc")`` with inductor, without inductor's compile time.
"""
from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import nn

from kfc_compile.frontend.dynamo.backend import registry_for
from kfc_compile.registry import KFCInfo

DETAIL_KEYS = ("source", "frontend", "linear_numel", "linear_coverage", "linear_uncovered", "tied", "warnings",
               "compiled_coverage", "compiled_linear_coverage", "compiled_linear_uncovered", "compiled_error")
MHA_PROJECTIONS = ("in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight")
COMPILED_INNER = "eager"


def _conv_linear_types() -> tuple[type, ...]:
    types: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd)
    hf = sys.modules.get("transformers.pytorch_utils")  # loaded whenever a model uses HF's Conv1D
    if hf is not None and hasattr(hf, "Conv1D"):
        types += (hf.Conv1D,)
    return types


def conv_linear_params(model: nn.Module) -> tuple[dict[int, tuple[str, nn.Parameter]], list[str]]:
    """The trainable conv/linear parameters of ``model`` by id (name, parameter) and the names of the tied ones.

    A tied parameter is listed as ``"lm_head.weight = transformer.wte.weight"`` (its conv/linear name, then its
    embedding's) and is not in the returned dict.
    """
    types = _conv_linear_types()
    embedding = {id(m.weight): name for name, m in model.named_modules()
                 if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}
    found: dict[int, tuple[str, nn.Parameter]] = {}
    tied: dict[int, str] = {}
    for mname, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            names = MHA_PROJECTIONS
        elif isinstance(m, types):
            names = ("weight", "bias")
        else:
            continue
        weight = m._parameters.get(names[0])
        layer_tied = weight is not None and id(weight) in embedding
        for pname in names:
            p = m._parameters.get(pname)
            if p is None or not p.requires_grad or id(p) in found or id(p) in tied:
                continue
            full = f"{mname}.{pname}" if mname else pname
            if id(p) in embedding:
                tied[id(p)] = f"{full} = {embedding[id(p)]}.weight"
            elif layer_tied:  # the bias of a tied layer: no layer without its weight
                tied[id(p)] = f"{full} (the bias of a tied layer)"
            else:
                found[id(p)] = (full, p)
    return found, list(tied.values())


def linear_share(model: nn.Module, info: KFCInfo, reason: Callable[[str], str] = str) -> dict:
    """The conv/linear columns of ``info`` (a model's registry): numel, share under KFC, misses, tied weights.

    ``linear_uncovered`` groups the conv/linear parameters outside KFC by ``reason(u.reason)`` of their
    ``info.uncovered`` entry: ``{reason: {"count", "numel", "params"}}`` (at most 5 names each).
    """
    params, tied = conv_linear_params(model)
    covered: dict[int, nn.Parameter] = {}
    for layer in info.layers:
        for p in (layer.weight, layer.bias):
            if p is not None:
                covered[id(p)] = p
    total = {**{k: p for k, (_, p) in params.items()}, **covered}
    numel = sum(p.numel() for p in total.values())
    why = {u.name: reason(u.reason) for u in info.uncovered}
    missed: dict[str, dict] = {}
    for k, (name, p) in params.items():
        if k not in covered:
            d = missed.setdefault(why.get(name, "not under KFC (no reason recorded)"),
                                  {"count": 0, "numel": 0, "params": []})
            d["count"] += 1
            d["numel"] += p.numel()
            if len(d["params"]) < 5:
                d["params"].append(name)
    return {"linear_numel": numel, "tied": tied, "linear_uncovered": missed,
            "linear_coverage": sum(p.numel() for p in covered.values()) / numel if numel else None}


def compiled_coverage(model: nn.Module, run_backward: Callable[[nn.Module], None],
                      reason: Callable[[str], str] = str) -> dict:
    """Coverage of ``model`` under ``torch.compile(backend="kfc")`` after one training forward and backward.

    ``run_backward(compiled_model)`` runs them. Returns ``compiled_coverage`` (all trainable elements),
    ``compiled_linear_coverage`` and ``compiled_linear_uncovered``; ``model`` should be a fresh build that no other
    registry owns.
    """
    cm = torch.compile(model, backend="kfc", options={"inner": COMPILED_INNER})
    info = registry_for(cm)
    model.train()
    run_backward(cm)
    share = linear_share(model, info, reason)
    return {"compiled_coverage": info.coverage, "compiled_linear_coverage": share["linear_coverage"],
            "compiled_linear_uncovered": share["linear_uncovered"]}
