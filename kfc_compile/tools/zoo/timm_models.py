"""The timm source of the zoo: architecture families, the smallest member of each, and timm cases.

**Family rule.** A timm model's family is the leading run of lower-case letters of its name: the name up to the
first digit, underscore or other character (``resnet18``, ``resnet50d`` → ``resnet``; ``resnetv2_50`` →
``resnetv``; ``vit_tiny_patch16_224`` → ``vit``; ``convnextv2_atto`` → ``convnextv``; ``tf_efficientnet_b0`` →
``tf``). timm's ``test_*`` models (tiny test variants of real families) are left out. The default sweep runs the
**smallest member** of each family: fewest parameters when built with ``pretrained=False`` (ties: the first name
in alphabetical order). The parameter counts come from building every model on the ``meta`` device (no memory, a
few minutes for all of timm on one core), cached per timm version in ``$KFC_ZOO_CACHE`` (default
``~/.cache/kfc_compile``) as ``timm-<version>-params.json``. ``--all`` runs every name.

**Cases.** Random weights (``pretrained=False``: nothing is downloaded), 1000 classes, images (B, 3, r, r) with r
the first of 32, 64, 128, 224 and the model's own default size that it accepts; a model whose constructor takes
``img_size`` (vision transformers, Swin, ...) is built for each size tried, so that r = 32 can work for it too.
Cross-entropy on the model output.
"""
from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable

import torch
from torch import nn

from kfc_compile.tools.zoo.cases import Case, Inputs
from kfc_compile.tools.zoo.models import DEFAULT_RES

EXCLUDED_FAMILIES = ("test",)


def family_of(name: str) -> str:
    """The timm family of a model name: its leading run of lower-case letters (see the module doc)."""
    m = re.match(r"[a-z]+", name)
    return m.group(0) if m else name


def all_names() -> list[str]:
    """Every model name timm lists (``timm.list_models()``), test models included."""
    import timm

    return timm.list_models()


def _cache_path() -> str:
    import timm

    root = os.environ.get("KFC_ZOO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kfc_compile")
    return os.path.join(root, f"timm-{timm.__version__}-params.json")


def param_count(name: str) -> int:
    """Parameter elements of timm's ``name`` (``pretrained=False``), built on the meta device."""
    import timm

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False)
    return sum(p.numel() for p in model.parameters())


def param_counts(names: Iterable[str], cache: bool = True) -> dict[str, int]:
    """Parameter counts of ``names`` (see :func:`param_count`), read from and added to the per-version cache."""
    path = _cache_path()
    known: dict[str, int] = {}
    if cache and os.path.exists(path):
        with open(path) as f:
            known = json.load(f)
    missing = [n for n in names if n not in known]
    for n in missing:
        known[n] = param_count(n)
    if cache and missing:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(known, f)
        os.replace(tmp, path)
    return {n: known[n] for n in names}


def families(names: Iterable[str] | None = None) -> dict[str, list[str]]:
    """The model names of each family (default: every timm name), test models left out."""
    out: dict[str, list[str]] = {}
    for n in all_names() if names is None else names:
        fam = family_of(n)
        if fam not in EXCLUDED_FAMILIES:
            out.setdefault(fam, []).append(n)
    return out


def default_names(names: Iterable[str] | None = None, cache: bool = True) -> list[str]:
    """The smallest member of every family of ``names`` (default: all of timm), in family order."""
    fams = families(names)
    counts = param_counts([n for members in fams.values() for n in members], cache=cache)
    return [min(members, key=lambda n: (counts[n], n)) for _, members in sorted(fams.items())]


def build(name: str, resolution: int | None) -> nn.Module:
    """The timm model ``name`` with random weights, built for ``resolution`` when its constructor takes ``img_size``."""
    import timm

    if resolution is not None:
        try:
            return timm.create_model(name, pretrained=False, img_size=resolution)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(name, pretrained=False)


def _images(res: int, batch: int, gen: torch.Generator) -> Inputs:
    return (torch.randn(batch, 3, res, res, generator=gen),), {}


def resolutions(name: str, requested: int | None = None) -> tuple[int, ...]:
    """Sizes to try for ``name``: 32, 64, 128, 224 and its default input size, from ``requested`` up."""
    import timm

    cfg = timm.get_pretrained_cfg(name)
    own = tuple(cfg.input_size[-1:]) if cfg is not None and getattr(cfg, "input_size", None) else ()
    res = sorted({*DEFAULT_RES, *own})
    if requested is not None:
        res = sorted({max(requested, res[0]), *(r for r in res if r > requested)})
    return tuple(res)


def case(name: str, resolution: int | None = 32) -> Case:
    """The zoo case of timm's ``name`` (see the module doc); ``resolution``: the smallest size to try."""
    return Case(name=name, family=family_of(name), build=functools.partial(build, name), inputs=_images,
                resolutions=resolutions(name, resolution), per_resolution=True, source="timm")


def cases(names: Iterable[str] | None = None, resolution: int | None = 32, all_models: bool = False) -> list[Case]:
    """Cases for ``names``; default: the smallest member of every family, or every name with ``all_models``."""
    if names is None:
        names = all_names() if all_models else default_names()
    return [case(n, resolution) for n in names]
