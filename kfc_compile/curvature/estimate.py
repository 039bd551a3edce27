"""``kc.curvature``: the KFC factors of one batch, for analysis, Laplace approximations and tests."""
from __future__ import annotations

import torch
from torch import nn

from kfc_compile.curvature.factors import Factors, public_view
from kfc_compile.curvature.labels import LabelSource
from kfc_compile.curvature.losses import check_fisher, loss_spec, output_gradients
from kfc_compile.curvature.statistics import check_approx
from kfc_compile.registry import KFCInfo
from kfc_compile.runtime.calls import RecordedCall
from kfc_compile.runtime.taps import model_output
from kfc_compile.transform import transform


def transformed(model: nn.Module, approx: str) -> nn.Module:
    """``model`` itself if it is already transformed with ``approx``, else a transformed copy."""
    info = getattr(model, "kfc", None)
    if isinstance(info, KFCInfo):
        if info.approx != approx:
            raise ValueError(f"model was transformed with approx={info.approx!r}, not {approx!r}")
        return model
    return transform(model, approx)


def _call_inputs(inputs) -> tuple[tuple, dict]:
    """(args, kwargs) of a model call given as a tensor, a tuple of positional inputs or a dict of keywords."""
    if isinstance(inputs, torch.Tensor):
        args, kwargs = (inputs,), {}
    elif isinstance(inputs, dict):
        args, kwargs = (), dict(inputs)
    else:
        args, kwargs = tuple(inputs), {}
    if not any(isinstance(t, torch.Tensor) and t.dim() > 0 for t in (*args, *kwargs.values())):
        raise ValueError("inputs must be a tensor, a tuple or a dict of model inputs with at least one batched tensor")
    return args, kwargs


def curvature(model: nn.Module, loss_fn, inputs, targets, fisher: str = "mc", approx: str = "expand",
              mc_samples: int = 1, generator: torch.Generator | None = None, output=None) -> dict[str, Factors]:
    """KFC factors of one batch, keyed by layer name, in the paper's scaling.

    ``inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs (dim 0 of the first tensor is
    the batch); ``loss_fn`` a loss name, a ``kc.CrossEntropy``/``kc.MSE``/``kc.BCEWithLogits`` or the matching ``nn``
    loss; ``output`` picks the logits from the model's output (default: see ``kc.KFC``).
    For each layer, ``kron(G, A)`` is the approximate Fisher block of the per-example loss for the row-major
    ``[W | b]``; grouped convs give factors stacked per group. One forward; one backward per output vector (1 for
    mc/empirical, mc_samples for mc, one per output coordinate for type-2), each computing no weight gradients.

    The labels are visible (README, "Sequence losses"): ``targets`` (those of the logits), else a ``labels=``
    keyword input read as the model's own loss reads it; positions labelled ``ignore_index`` are then no loss
    terms (for every ``fisher``), and the layers' ``masking`` record says which layers dropped them.

    Raises:
        ValueError: an unknown fisher / approx / loss, or visible labels that are all ``ignore_index``.
    """
    check_fisher(fisher)
    check_approx(approx)
    spec = loss_spec(loss_fn)
    tm = transformed(model, approx)
    args, kwargs = _call_inputs(inputs)
    live = getattr(tm.kfc, "version", None) is not None  # dynamo capture: layers join at the first call
    if not tm.kfc.layers and not live:
        return {}  # nothing under KFC (transform warned); the output may not even depend on a parameter
    n = next(t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.dim() > 0).shape[0]
    state = tm.kfc.state
    state.reset()
    selector, state.output_fn = state.output_fn, output
    # the whole batch, whatever subsample an optimizer on this model uses for its own statistics
    try:
        with state.using_stats_fraction(None):
            state.set_examples(n)
            with state.preserved_calls(), state.armed_forward():  # not a micro-batch of an optimizer's step
                f = model_output(tm(*args, **kwargs), output)
            if not tm.kfc.layers:  # dynamo capture: the forward compiled no layer either
                return {}
            mask = (spec.term_mask(f, targets) if targets is not None else
                    LabelSource.of(model, spec).mask(RecordedCall(args, kwargs), f))
            if mask is not None and not bool(mask.any()):
                raise ValueError(f"every label is ignore_index={spec.ignore_index}: the loss has no term")
            state.term_mask = mask
            first = True
            for v in output_gradients(spec, fisher, f, targets, mc_samples, generator, mask):
                state.record_backward(f, v, inputs=first)
                first = False
            batch = state.take()
    finally:
        state.output_fn = selector
    return {layer.name: Factors(public_view(batch[i].A), public_view(batch[i].G))
            for i, layer in enumerate(tm.kfc.layers) if i in batch}
