"""Which labels a forward's loss sees, and the term mask they give (docs/algorithm.md §3.1, "Sequence losses").

Labels are visible to the optimizer when a driver saw the targets of the logits (``compile_step``'s ``targets``,
recorded with the call) or when the model is called with ``labels=`` (recorded with the call's keyword arguments).
A model's own loss may score the logits against shifted labels: Hugging Face models name their loss in
``model.loss_type``, and :data:`LABEL_SHIFTS` says which of those shift (causal LM: position t is scored against
``labels[t + 1]``, the last position against nothing). ``shift_labels=`` passed to the model are already aligned.
A loss type not in the table, a custom ``loss_function`` or ``num_items_in_batch=`` (another normalisation) leaves
the labels unused for masking, reported once: every position then counts.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kfc_compile.curvature.loss_base import Loss
from kfc_compile.runtime.calls import RecordedCall

# Hugging Face ``loss_type`` → whether its loss shifts the labels by one position (None: HF's default, ForCausalLM)
# (the classification losses score (B, C) logits against (B,) labels, ignore_index included: nothing to shift)
LABEL_SHIFTS: dict[str | None, bool] = {None: True, "ForCausalLM": True, "ForMaskedLM": False,
                                        "ForTokenClassification": False, "ForSequenceClassification": False,
                                        "ForImageClassification": False}
_NOT_HF = object()


@dataclass
class LabelSource:
    """The labels of recorded calls of one model, aligned with its logits, and their term masks under ``spec``.

    ``shift``: whether ``labels=`` are shifted by one position (causal LM); None: they are not used (``note`` says
    why, warned once).
    """

    spec: Loss
    shift: bool | None = False
    note: str | None = None
    warned: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, model: nn.Module, spec: Loss) -> LabelSource:
        """How ``model``'s own loss reads ``labels=`` (see the module docstring)."""
        m = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        loss_type = getattr(m, "loss_type", _NOT_HF)
        if loss_type is _NOT_HF:
            return cls(spec)  # not a Hugging Face model: labels= are the targets of the logits
        if "_loss_function" in vars(m):
            return cls(spec, None, "the model has a custom loss_function")
        if loss_type not in LABEL_SHIFTS:
            return cls(spec, None, f"its loss_type {loss_type!r} is not one of {[k for k in LABEL_SHIFTS if k]}")
        return cls(spec, LABEL_SHIFTS[loss_type])

    def _report(self, why: str) -> None:
        if why not in self.warned:
            self.warned.add(why)
            warnings.warn(f"the labels= passed to the model are not used to drop ignore_index positions from the "
                          f"KFC statistics ({why}): every position counts. Pass the logits' targets through "
                          "kc.compile_step or kc.curvature to make them visible", RuntimeWarning, stacklevel=4)

    def labels(self, call: RecordedCall) -> torch.Tensor | None:
        """The labels of the call's logits (aligned, ``ignore_index`` where no term), or None where none are seen."""
        if call.labels is not None:
            return call.labels
        kw = call.kwargs
        labels = kw.get("labels")
        if not isinstance(labels, torch.Tensor):
            return None
        if self.shift is None:
            self._report(self.note)
            return None
        if kw.get("num_items_in_batch") is not None:
            self._report("num_items_in_batch= sets another normalisation than the mean over the real tokens")
            return None
        shifted = kw.get("shift_labels")
        if isinstance(shifted, torch.Tensor):
            return shifted
        if self.shift:
            ignore = getattr(self.spec, "ignore_index", -100)
            return F.pad(labels, (0, 1), value=ignore)[..., 1:]
        return labels

    def term_weight(self, call: RecordedCall, f: torch.Tensor) -> float | None:
        """The weight c = N/M of a whole recorded call with visible labels and a mean loss (None: the default).

        ``f``: the logits of a leading part of the call. The statistics subset and the Fisher products on such a
        part use it: ℓ_n is the whole batch's per-example loss.
        """
        labels = self.labels(call)
        if labels is None or self.spec.reduction != "mean" or not hasattr(self.spec, "ignore_index"):
            return None
        try:
            self.spec.term_mask(f, labels[: f.shape[0]])
        except ValueError:  # not the logits' labels (reported by mask())
            return None
        real = int((labels != self.spec.ignore_index).sum())
        return labels.shape[0] / real if real else 0.0

    def mask(self, call: RecordedCall, f: torch.Tensor) -> torch.Tensor | None:
        """The term mask of the logits ``f`` of ``call`` (None: every term counts)."""
        labels = self.labels(call)
        if labels is None:
            return None
        try:
            return self.spec.term_mask(f, labels)
        except ValueError as e:
            self._report(str(e))
            return None
