"""The zoo's models and inputs.

torchvision names by family, the input sizes to try, building a model, and the synthetic inputs and main output it
is trained on.

torchvision is imported where it is used: it is the optional ``zoo`` extra, and a sweep over the user's own
``(name, constructor)`` pairs (e.g. timm models) runs without it.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

FAMILIES = ("classification", "video", "segmentation", "detection")

# Resolutions to try, smallest first; the first one the model accepts is used (a requested --resolution
# replaces the smallest entries it exceeds).
DEFAULT_RES = (32, 64, 128, 224)
MIN_RES = {
    "inception_v3": (75, 128, 299),  # needs >= 75
    "googlenet": (32, 75, 128, 224),
    "maxvit_t": (224,),  # window partitioning needs multiples of 7 * 32
}
VIDEO_FRAMES = {"mvit_v1_b": 16, "mvit_v2_s": 16, "s3d": 16}
# models whose smallest input is 16 frames of 224×224 (MViT's fixed positional grid, S3D's final 2×7×7 average
# pool) run with one clip: ~70 GFLOPs per clip forward
MAX_BATCH = {"mvit_v1_b": 1, "mvit_v2_s": 1, "s3d": 1}
DETECTION_RES = (128, 224, 320)


def family_of(name: str) -> str:
    """The torchvision family of a model name ('classification' for unknown names)."""
    import torchvision

    for fam, mod in (("video", torchvision.models.video), ("segmentation", torchvision.models.segmentation),
                     ("detection", torchvision.models.detection)):
        if name in torchvision.models.list_models(module=mod):
            return fam
    return "classification"


def resolve_family(name: str, constructor: Callable[[], nn.Module] | None, family: str | None) -> str:
    """The family a sweep item runs as.

    The given one, else the torchvision family of a named model, else 'classification' for a user constructor.
    """
    return family or (family_of(name) if constructor is None else "classification")


def model_names(families: Iterable[str] = ("classification",)) -> list[str]:
    """All torchvision model names of the given families."""
    import torchvision

    mods = {"classification": torchvision.models, "video": torchvision.models.video,
            "segmentation": torchvision.models.segmentation, "detection": torchvision.models.detection}
    names: list[str] = []
    for fam in families:
        if fam not in mods:
            raise ValueError(f"unknown family {fam!r}: expected one of {FAMILIES}")
        names += torchvision.models.list_models(module=mods[fam])
    return names


def resolutions(name: str, family: str = "classification", requested: int | None = None) -> tuple[int, ...]:
    """Input sizes to try for a model, smallest first."""
    if name.startswith("vit_"):  # built for one image size (see build): a multiple of the patch size
        patch = int(name.rsplit("_", 1)[1])
        return (224 if requested is None else patch * math.ceil(requested / patch),)
    if family == "detection":
        res: tuple[int, ...] = DETECTION_RES
    elif family == "video":
        res = (224,) if name in MAX_BATCH else (32, 64, 112)
    else:
        res = MIN_RES.get(name, DEFAULT_RES)
    if requested is not None:
        res = tuple(sorted({max(requested, res[0]), *(r for r in res if r > requested)}))
    return res


def build(name: str, resolution: int | None = None) -> nn.Module:
    """A torchvision model by name, ``weights=None`` (nothing is downloaded), plain-tensor outputs where possible.

    ``resolution``: the input size for models built for one size (ViT's ``image_size``; see :func:`resolutions`).
    """
    import torchvision

    kwargs: dict = {"weights": None}
    if name.startswith("vit_") and resolution is not None:
        kwargs["image_size"] = resolution
    fam = family_of(name)
    if name in ("inception_v3", "googlenet"):
        kwargs["aux_logits"] = False  # keeps the output a plain tensor in train mode too
        kwargs["init_weights"] = True
    if fam in ("segmentation", "detection"):
        kwargs["weights_backbone"] = None
    if fam == "segmentation" and not name.startswith("lraspp"):
        kwargs["aux_loss"] = False
    return torchvision.models.get_model(name, **kwargs)


def first_output(out) -> torch.Tensor:
    """The main output tensor: the tensor itself, the first of a tuple/list, or ``out['out']``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        return out["out"] if "out" in out else next(v for v in out.values() if isinstance(v, torch.Tensor))
    return out[0]


def make_input(family: str, res: int, batch: int, name: str = "",
               generator: torch.Generator | None = None) -> torch.Tensor:
    """A standard-normal synthetic batch: images (B, 3, res, res), or clips (B, 3, T, res, res) for video."""
    if family == "video":
        return torch.randn(batch, 3, VIDEO_FRAMES.get(name, 4), res, res, generator=generator)
    return torch.randn(batch, 3, res, res, generator=generator)
