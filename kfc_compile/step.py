"""``kc.compile_step``: one call per training step — forward, backward, statistics, inverses, update.

What is compiled and what is not (measured in ``bench/compiled_step.py``, see docs/benchmarks.md):

* **compiled** (``torch.compile(model, backend="kfc")``, inductor): the model's forward and, through AOTAutograd,
  its backward, with the capture taps inside both graphs. The taps' ``kfc::record`` op reads the capture flags at
  run time, so statistics steps and plain steps run the **same** graph; the MC Fisher pass of a statistics step
  is one more call of the compiled backward (``torch.autograd.grad`` from the output, sampled targets). Unlike
  the eager Fisher pass, that call also computes the weight gradients (AOT compiles one backward for every input
  that requires grad) and throws them away.
* **eager**: the loss on the model output, the optimizer step (moving averages, inverse / eigendecomposition
  refresh every ``inverse_every`` steps, preconditioning, clipping, momentum). Hyperparameters live in the
  optimizer's ``param_groups`` and are read there, so changing lr, damping or decay between steps (a scheduler)
  never recompiles anything.
* **the update, fused, not compiled by default**: KFC-pre's update is one function of tensors
  (``optim/fused_update.py``); ``compile_step(..., compile_update=True)`` compiles it as well (one graph, two
  around the exact ν's Fisher products; no recompile under schedulers or inverse refreshes). It stays off here:
  in ``bench/compiled_update_probe.py --ab`` (docs/benchmarks.md) it saved 14–20 % of a whole step only with
  ``clip_curvature="factored"`` on the small models at (stats 10, inverses 100), ~4 % at (1, 20), nothing
  measurable with the exact ν (then the default; its Fisher products stay eager) or on the paper net (where the
  update is ~3 % of a step and a live-block layer changes the plan at inverse refreshes), for 2–8 s of compilation.

On CPU, inductor's default layout optimisation (channels-last convolutions) made resnet18's training graph
slower than eager in ``bench/compiled_step.py``; ``backend_options={"layout_optimization": False}`` turns it off.

Recompiles: one graph per dynamo frame for the first batch shape; a different batch size (the last, partial
batch) recompiles once with a dynamic batch dimension (dynamo's automatic dynamic shapes), after which any batch
size reuses it. ``step.compiles`` counts the graphs the backend instrumented for this model.
"""
from __future__ import annotations

import torch
from torch import nn

from kfc_compile.curvature.losses import LOSSES, Loss
from kfc_compile.frontend.dynamo.backend import kfc_backend
from kfc_compile.optim import KFC
from kfc_compile.runtime.taps import model_output


class CompiledStep:
    """``step(inputs, targets) -> loss`` (a detached 0-d tensor).

    ``step.model`` is the module that runs the forward (the compiled wrapper, or the model itself with
    ``compile=False``); ``step.optimizer`` the ``KFC`` optimizer.
    """

    def __init__(self, model: nn.Module, optimizer, loss_fn, compiled: bool, on_logits: bool = True):
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.compiled = compiled
        self.on_logits = on_logits  # loss_fn takes the logits (a torch / kc loss) or the model's whole output

    @property
    def compiles(self) -> int:
        """Dynamo graphs instrumented by the ``kfc`` backend for this model so far (0 when not compiled)."""
        info = self.model.__dict__.get("kfc") if self.compiled else None
        return info.graphs if info is not None else 0

    def __call__(self, inputs, targets) -> torch.Tensor:
        """One training step: forward, loss, backward and ``optimizer.step``; returns the loss, detached.

        ``inputs`` is the model's input, a tuple of its positional inputs, or a dict of its keyword inputs.
        """
        args, kwargs = (((), inputs) if isinstance(inputs, dict) else
                        ((inputs, {}) if isinstance(inputs, tuple) else ((inputs,), {})))
        opt = self.optimizer
        select = opt.options.output

        state = opt.model.kfc.state
        labels = targets if self.on_logits and isinstance(targets, torch.Tensor) else None

        def closure():
            opt.zero_grad(set_to_none=True)
            with state.visible_labels(labels):  # the targets of the logits: ignore_index positions are masked
                out = self.model(*args, **kwargs)
            loss = self.loss_fn(model_output(out, select) if self.on_logits else out, targets)
            loss.backward()
            return loss

        loss = opt.step(closure)
        return loss.detach()

    def __repr__(self) -> str:
        kind = "compiled with the kfc backend" if self.compiled else "eager"
        return f"CompiledStep({kind}, {type(self.optimizer).__name__}, layers={len(self.optimizer.layers)})"


def _loss_callable(loss_fn):
    if isinstance(loss_fn, str):
        if loss_fn not in LOSSES:
            raise ValueError(f"unknown loss {loss_fn!r}: expected a callable or one of {tuple(LOSSES)}")
        return LOSSES[loss_fn]()
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable or a loss name, got {type(loss_fn).__name__}")
    return loss_fn


def compile_step(model: nn.Module, loss_fn, *, compile: bool = True, dynamic: bool | None = None,
                 backend_options: dict | None = None, **kfc_options) -> CompiledStep:
    """A training step for ``model`` with the ``KFC`` optimizer, compiled with ``torch.compile``.

    ``loss_fn(logits, targets)`` is a torch loss module (``nn.CrossEntropyLoss``, ``nn.MSELoss``,
    ``nn.BCEWithLogitsLoss``), a ``kc`` loss spec or a loss name — it gets the logits (``output=`` selects them from
    the model's output) — or any other callable, which gets the model's whole output (e.g. ``lambda out, y:
    out.loss`` for a model that computes its own loss), together with ``loss=`` naming the Fisher model;
    ``kfc_options`` are ``kc.KFC``'s keyword arguments (``lr`` is required). ``compile=False`` gives the eager
    ``transform`` + ``KFC`` step with the same numerics (for comparison and debugging). ``dynamic`` and
    ``backend_options`` go to ``torch.compile`` (e.g. ``{"inner": "aot_eager"}``, inductor options, ...).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"compile_step expects an nn.Module, got {type(model).__name__}")
    if "lr" not in kfc_options:
        raise TypeError("compile_step needs lr=... (and optionally the other KFC options)")
    kfc_options.setdefault("loss", loss_fn)
    loss = _loss_callable(loss_fn)
    if compile:
        runner = torch.compile(model, backend=kfc_backend, dynamic=dynamic, options=backend_options)
    else:
        runner = model
    optimizer = KFC(runner, **kfc_options)
    return CompiledStep(runner, optimizer, loss, compile, on_logits=isinstance(loss_fn, (str, nn.Module, Loss)))
