#!/usr/bin/env python
"""The models users bring (issue 13): what KFC covers, eager and compiled, and the first-call cost of instrumenting.

The models and batches are those of ``tests/test_user_models.py`` (``tests/user_models.py``: HF GPT-2, BERT, Llama,
ViT; timm ViT-tiny, ConvNeXt-atto, MobileViTv2-050; a ``self.training`` branch; LSTM and GRU models), on CPU.
Per model and path:

* ``eager``: ``kc.KFC(model)`` on the plain module (``frontend="auto"``); ``compiled``:
  ``kc.KFC(torch.compile(model, backend="kfc", options={"inner": "aot_eager"}))``;
* ``front end``: what took the model (``fx``: the torch.fx pass; ``dynamo``: a live registry, i.e. dynamo capture
  or the kfc backend);
* ``layers``: KFC layers after the first step; ``conv/linear under KFC``: the share of the elements of the
  conv/linear parameters (``nn.Linear``, ``nn.Conv*d``, transformers' ``Conv1D``; tied weights counted once) that
  KFC preconditions; ``all params``: the share of all trainable elements (embeddings, norms, RNN weights are not
  conv/linear);
* ``overhead``: the first-call cost of instrumenting, in seconds: (``[torch.compile +] kc.KFC(model)`` + the first
  forward + backward + ``opt.step()``) minus the first forward + backward of a fresh uninstrumented copy (both in a
  fresh dynamo state; the median of ``--reps`` fresh builds). It is mostly dynamo's tracing where dynamo is used.

    .venv/bin/python bench/user_models.py            # prints a markdown table
    .venv/bin/python bench/user_models.py --models gpt2,bert --reps 3
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
sys.path.insert(0, os.path.join(ROOT, "tests"))
import kfc_compile as kc  # noqa: E402

from user_models import MODELS, UserModel, kfc_options  # noqa: E402

PATHS = ("eager", "compiled")


def conv_linear_params(model: nn.Module) -> dict[int, nn.Parameter]:
    """The parameters of the model's conv / linear modules, by identity (a tied weight once)."""
    kinds: tuple[type, ...] = (nn.Linear, nn.modules.conv._ConvNd)
    try:
        from transformers.pytorch_utils import Conv1D
        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover - transformers is a test dependency
        pass
    return {id(p): p for m in model.modules() if isinstance(m, kinds)
            for p in m.parameters(recurse=False) if p.requires_grad}


def _target(model: nn.Module, path: str):
    return model if path == "eager" else torch.compile(model, backend="kfc", options={"inner": "aot_eager"})


def first_call(um: UserModel, path: str) -> tuple[float, kc.KFC, nn.Module]:
    """Seconds of instrumentation + first forward, backward and step; the optimizer; the trained module."""
    torch._dynamo.reset()
    model, batch = um.build(), um.batch()
    t0 = time.perf_counter()
    target = _target(model, path)
    opt = kc.KFC(target, **kfc_options(um))
    torch.manual_seed(0)
    um.training_loss(target, batch).backward()
    opt.step()
    return time.perf_counter() - t0, opt, model


def plain_first_call(um: UserModel) -> float:
    """Seconds of the first forward + backward of a fresh uninstrumented model."""
    torch._dynamo.reset()
    model, batch = um.build(), um.batch()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    um.training_loss(model, batch).backward()
    return time.perf_counter() - t0


def measure(um: UserModel, path: str, reps: int) -> dict:
    """One row of the table."""
    overheads, opt, model = [], None, None
    for _ in range(reps):
        plain = plain_first_call(um)
        t, opt, model = first_call(um, path)
        overheads.append(t - plain)
    info = opt.model.kfc
    covered = {id(p) for layer in opt.layers for p in (layer.weight, layer.bias) if p is not None}
    cl = conv_linear_params(model)
    cl_numel = sum(p.numel() for p in cl.values())
    all_numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    kfc_numel = sum(p.numel() for p in model.parameters() if id(p) in covered)
    return {
        "model": um.name, "path": path, "frontend": "dynamo" if getattr(info, "version", None) is not None else "fx",
        "layers": len(opt.layers),
        "cl": sum(p.numel() for i, p in cl.items() if i in covered) / cl_numel if cl_numel else 0.0,
        "all": kfc_numel / all_numel, "overhead": statistics.median(overheads),
    }


def main() -> None:
    """Measure the models given (default: all) on both paths and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated names from tests/user_models.py")
    ap.add_argument("--reps", type=int, default=1, help="fresh builds per model and path (median overhead)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    warnings.simplefilter("ignore")
    first_call(MODELS["training_branch"], "compiled")  # one-time process costs (dynamo's imports) go here
    rows = [measure(MODELS[name], path, args.reps) for name in args.models.split(",") for path in PATHS]
    print(f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}\n")
    print("| model | path | front end | layers | conv/linear under KFC | all params | overhead (s) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['path']} | {r['frontend']} | {r['layers']} | {100 * r['cl']:.1f}% | "
              f"{100 * r['all']:.1f}% | {r['overhead']:.2f} |")


if __name__ == "__main__":
    main()
