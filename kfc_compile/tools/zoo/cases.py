"""What the zoo runs for one model: a :class:`Case`, i.e. how to build the model, feed it and train it.

torchvision names and ``(name, constructor[, family])`` pairs become image cases (:func:`image_case`); the timm and
HF sources (:mod:`~kfc_compile.tools.zoo.timm_models`, :mod:`~kfc_compile.tools.zoo.hf_models`) build their own.
A case's callables are module-level functions or ``functools.partial`` of them where the source controls them, so
that a case pickles into the time-limited worker's fork server.

The training objective is the case's loss spec applied to the logits its ``output`` selects
(:meth:`Case.objective`), i.e. exactly the loss whose Fisher KFC builds. A model whose head also takes the targets
(``labels``: HF's ``labels=``) gets them as that keyword argument, and the loss it returns is checked against the
objective once before training (a mismatch means the case's spec is not the model's own loss and fails the row);
the training steps then back-propagate the model's own loss, as users do (:meth:`Case.training_loss`: KFC's
output tap starts the Fisher pass from the logits for a 0-d loss returned next to them).
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import kfc_compile as kc
from kfc_compile.runtime.taps import model_output
from kfc_compile.tools.zoo.models import MAX_BATCH, build, first_output, make_input, resolutions, resolve_family

Inputs = tuple[tuple, dict]


def class_targets(spec: kc.CrossEntropy, f: torch.Tensor, inputs: Inputs, gen: torch.Generator):
    """Uniform random classes for the logits ``f``: shaped like ``f`` without its class dim; no model labels."""
    d = spec.class_dim % f.dim()
    shape = f.shape[:d] + f.shape[d + 1:]
    return torch.randint(f.shape[d], shape, generator=gen), None


@dataclass(frozen=True)
class Case:
    """How the zoo builds, feeds and trains one model.

    ``build(resolution)`` returns the model (``per_resolution``: it is built for that input size, e.g. timm's
    ``img_size``; otherwise it is built once and the resolutions are tried on it); ``inputs(resolution, batch,
    generator)`` returns the forward's ``(args, kwargs)``; ``resolutions`` are tried smallest first (``(None,)``:
    one fixed input). ``loss`` is the KFC loss spec, ``output`` selects the logits from the model's output
    (None: ``kc.KFC``'s default), ``objective_output`` those the objective is computed on (None: the same).
    ``targets(spec, logits, inputs, generator)`` returns ``(targets of the objective, labels for the model or
    None)``; with labels, ``labels`` names the keyword the model takes them as.
    ``train=False``: transformed and reported only (torchvision detection). ``max_batch`` caps the batch.
    """

    name: str
    family: str
    build: Callable[[int | None], nn.Module]
    inputs: Callable[[int | None, int, torch.Generator], Inputs]
    resolutions: tuple = (None,)
    per_resolution: bool = False
    loss: Any = kc.CrossEntropy()
    output: Callable[[Any], torch.Tensor] | None = None
    objective_output: Callable[[Any], torch.Tensor] | None = None
    targets: Callable = class_targets
    labels: str | None = None
    train: bool = True
    source: str = "custom"
    max_batch: int | None = None

    def logits(self, out) -> torch.Tensor:
        """The tensor of the model output that feeds the Fisher and the objective."""
        return model_output(out, self.output)

    def objective(self, out, y: torch.Tensor) -> torch.Tensor:
        """The objective: the loss spec on the objective's logits."""
        return self.loss.batch_loss(model_output(out, self.objective_output or self.output), y)

    def training_loss(self, out, y: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """What the training steps back-propagate: the model's own loss if it got the labels, else the objective."""
        if self.labels is not None and self.labels in kwargs:
            own = own_loss(out)
            if own is None:
                raise RuntimeError(f"the model returned no loss for {self.labels}=")
            return own
        return self.objective(out, y)


def own_loss(out) -> torch.Tensor | None:
    """The loss a model returned next to its outputs (HF: ``out.loss``), or None."""
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    return loss


def _image_inputs(family: str, name: str, res: int, batch: int, gen: torch.Generator) -> Inputs:
    x = make_input(family, res, batch, name, gen)
    return ((list(x) if family == "detection" else x),), {}


def _constructed(constructor: Callable[[], nn.Module], res: int | None) -> nn.Module:
    return constructor()


def image_case(name: str, constructor: Callable[[], nn.Module] | None = None, family: str | None = None,
               resolution: int | None = None) -> Case:
    """The case of a torchvision model name, or of a user's ``(name, constructor[, family])``.

    Images (clips for video), cross-entropy on the main output (per pixel for segmentation); detection models are
    transformed and reported only.
    """
    family = resolve_family(name, constructor, family)
    builder = functools.partial(build, name) if constructor is None else functools.partial(_constructed, constructor)
    return Case(name=name, family=family, build=builder, inputs=functools.partial(_image_inputs, family, name),
                resolutions=resolutions(name, family, resolution), per_resolution=False, output=first_output,
                train=family != "detection", source="torchvision" if constructor is None else "custom",
                max_batch=MAX_BATCH.get(name))
