"""``RecordedCall``: one forward of the model as the user wrote it, positional and keyword arguments.

The output tap records every forward run with grad enabled (``runtime/taps.py``); the optimizer replays them on a
leading subset of the batch: the statistics pass (``curvature/subset.py``) and the exact Fisher products
(``optim/fvp.py``). With gradient accumulation a step has several recorded calls, one per micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class RecordedCall:
    """The arguments of one forward: ``model(*args, **kwargs)`` (the tensors themselves, no copy).

    The batch dimension is dim 0 of the first tensor argument that has one, looked up in ``args`` then in
    ``kwargs`` (in the order they were passed); :meth:`leading` slices every top-level tensor argument whose
    leading dim is that batch size. Tensors nested in containers are passed through unsliced. ``labels`` are the
    targets of the call's logits where a driver saw them (``compile_step``), not an argument of the call.
    """

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    labels: torch.Tensor | None = None

    def tensors(self) -> list[torch.Tensor]:
        """The top-level tensor arguments: positional first, then keyword, in call order."""
        return [a for a in (*self.args, *self.kwargs.values()) if isinstance(a, torch.Tensor)]

    def batch_size(self) -> int | None:
        """N: dim 0 of the first tensor argument with at least one dimension; None if there is none."""
        return next((t.shape[0] for t in self.tensors() if t.dim() > 0), None)

    def leading(self, m: int) -> RecordedCall:
        """The call on the first ``m`` examples: every tensor argument with leading dim N sliced to ``[:m]``.

        All tensor arguments are detached: a replay computes statistics or Fisher products for this model's
        parameters only, never gradients of whatever produced its inputs.
        """
        n = self.batch_size()

        def cut(a):
            if not isinstance(a, torch.Tensor):
                return a
            a = a.detach()
            return a[:m] if n is not None and m < n and a.dim() > 0 and a.shape[0] == n else a

        return RecordedCall(tuple(cut(a) for a in self.args), {k: cut(v) for k, v in self.kwargs.items()},
                            cut(self.labels))


class CallLog:
    """An immutable chain of recorded calls, newest first; :data:`NO_CALLS` is the empty chain.

    The output tap appends by rebinding, ``state.call_log = CallLog(args, kwargs, state.call_log)``: inside a graph
    that dynamo traces (``torch.compile(kc.transform(m))``) that is an attribute store replayed after the graph,
    with no guard on how many calls were recorded (a growing list would be guarded on its length and recompile).
    """

    __slots__ = ("args", "kwargs", "prev", "labels")

    def __init__(self, args: tuple | None, kwargs: dict | None, prev: CallLog | None,
                 labels: torch.Tensor | None = None):
        self.args, self.kwargs, self.prev, self.labels = args, kwargs, prev, labels

    def last(self) -> RecordedCall:
        """The newest recorded call (not for :data:`NO_CALLS`)."""
        return RecordedCall(self.args, self.kwargs, self.labels)

    def calls(self) -> list[RecordedCall]:
        """The recorded calls, oldest first."""
        out, link = [], self
        while link.prev is not None:
            out.append(link.last())
            link = link.prev
        return out[::-1]


NO_CALLS = CallLog(None, None, None)
