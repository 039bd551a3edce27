"""Linear layers inside opaque calls, at run time: ``nn.MultiheadAttention`` leaves and fx-wrapped functions.

Some calls stay opaque in the traced graph even though they hold linear layers:

* ``nn.MultiheadAttention`` is a leaf (its forward has control flow) and computes its packed input projection and
  its output projection functionally inside ``F.multi_head_attention_forward``;
* a function registered with ``torch.fx.wrap`` (torchvision's ``shifted_window_attention``) is one
  ``call_function`` node that receives weights (``self.qkv.weight``, ``self.proj.weight``) as arguments.

Without a probe run, sites are created at transform time from the parameters' shapes (what a linear call with
that weight must look like; ``frontend/fx/plans.py`` builds the ``OpaquePlan``) and the call is replaced by a
wrapper (this module). On an armed forward (statistics due, grad
enabled) the wrapper runs the original call under a ``TorchFunctionMode`` that

* taps every ``F.linear`` whose weight *is* one of the registered parameters (the ordinary capture tap, rows
  example-major as everywhere in the fx path), and
* replaces ``F.multi_head_attention_forward`` of a registered self-attention by the decomposition of
  ``runtime/attention.py`` (the same one the ``kfc`` backend uses), whose two projection taps see sequence-first
  tensors and are registered ``seq_first`` so that the statistics get them batch-first.

On every other forward the original call runs untouched (bit-identical outputs, no overhead). A mode is needed
for attention because ``F.multi_head_attention_forward`` dispatches through ``__torch_function__`` and a mode
sees only that outermost call, not the ``linear`` calls inside it.

Swin pads its feature map with zeros to a multiple of the window size; the rows of those padded tokens are kept
out of the statistics of its projections (see ``_swin_real_rows``).

What stays uncovered, with a reason: biases passed into a wrapped function (the function may compute the bias it
actually uses, as Swin V2 does, so only the weight block is put under KFC); non-2-D parameters of such functions;
cross-attention (query, key and value are distinct nodes: the packed weight is applied in slices); attention
with ``bias_k``/``bias_v``, ``add_zero_attn`` or separate projection weights; parameters of black-box modules.
If at run time a registered weight is used by another op inside the call, its statistics are switched off (the
layer then gets no factors: the optimizer uses its plain gradient) and a warning says why.
"""
from __future__ import annotations

import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from kfc_compile.runtime import attention as mha
from kfc_compile.runtime import record as ops
from kfc_compile.runtime.taps import tap

# ops that only read a tensor's metadata: not a "use" of a registered weight
_METADATA = {"__get__", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "element_size", "nelement",
             "__len__", "storage_offset", "is_floating_point", "is_complex"}
_MHA_ARGS = ("query", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias", "dropout_p",
             "out_proj_weight", "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights")


@dataclass
class OpaqueSite:
    """One linear site inside an opaque call (``index``: its position among the transform's sites)."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    module_name: str | None  # layer name for a module-owned weight, None: named after the parameter
    index: int = -1


@dataclass(eq=False)
class OpaquePlan:
    """What the wrapper of one opaque call taps.

    ``mha``: (in-projection, out-projection) sites of a self-attention, else None; ``linear``: weights tapped in
    ``F.linear`` calls.
    """

    name: str  # for messages: the module's qualified name or the function's name
    linear: list[OpaqueSite] = field(default_factory=list)
    mha: tuple[OpaqueSite, OpaqueSite] | None = None
    state: object = None  # CaptureState, set by the instrumenter
    _keys: tuple[int, int] | None = None
    _warned: set = field(default_factory=set)

    @property
    def sites(self) -> list[OpaqueSite]:
        """The plan's sites: the attention's (in, out) projections first, then the ``F.linear`` calls."""
        return list(self.mha or ()) + self.linear

    def bind(self, state) -> None:
        """Attach the plan to the capture ``state``; an attention plan also allocates its ``kfc::record`` keys."""
        self.state = state
        if self.mha is not None:  # kfc::record keys that hand (L, N, ·) tensors to the statistics batch-first
            self._keys = tuple(ops.new_site(state, s.index, seq_first=True) for s in self.mha)

    def warn(self, key: str, message: str) -> None:
        """Warn once per ``key`` for this plan, so that a training loop does not repeat the message every step."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"kfc: {message}", stacklevel=4)

    def disable(self, site: OpaqueSite, why: str) -> None:
        """Stop recording a site whose weight turned out to be used in a way KFC cannot account for."""
        self.state.sites[site.index].layer = None
        self.warn(f"disable{site.index}", f"no statistics for the weight of {self.name!r} with shape "
                                          f"{tuple(site.weight.shape)}: {why}; its layer gets no factors")


def _swin_real_rows(fn: Callable, args: tuple, kwargs: dict) -> tuple[torch.Tensor, int] | None:
    """For a padded ``shifted_window_attention`` call: the real tokens' row indices and the rows per example.

    For a call of torchvision's ``shifted_window_attention`` whose input is padded: the indices of the real (not
    padded) tokens among an example's rows (windows · tokens, in the function's window order) and the number of
    rows per example; None for any other call and for an input that needs no padding.

    Padded tokens are not data. Their rows add nothing to the projections' weight gradients (qkv: the input row
    is 0; proj: the output is cropped, its gradient is 0), but they would enter the factors: proj's input rows
    are attention outputs (not 0), and qkv's gradient rows are those of the bias-only keys and values that real
    tokens attend to; in Swin V2, whose key bias is zeroed, the key is exactly 0 and the cosine attention's
    ``F.normalize`` scales its gradient by 1/eps = 1e12, which swamps Γ (singular factors).
    The rows are selected from the padding geometry (pad, cyclic shift, window partition, as the function does
    it) rather than as all-zero input rows: proj's padded rows are not zero (attention mixes values in), a real
    token's input can be zero, and every example must keep the same rows (reduce sums positions per example).
    """
    swin = sys.modules.get("torchvision.models.swin_transformer")
    if swin is None or fn is not getattr(swin, "shifted_window_attention", None):
        return None
    a = inspect.signature(fn).bind(*args, **kwargs).arguments
    (h, w), (wh, ww) = a["input"].shape[1:3], a["window_size"]
    ph, pw = h + (wh - h % wh) % wh, w + (ww - w % ww) % ww
    if (ph, pw) == (h, w):
        return None
    real = torch.zeros(ph, pw, dtype=torch.bool)
    real[:h, :w] = True
    shift = [0 if wh >= ph else a["shift_size"][0], 0 if ww >= pw else a["shift_size"][1]]
    if sum(shift) > 0:
        real = torch.roll(real, shifts=(-shift[0], -shift[1]), dims=(0, 1))
    real = real.view(ph // wh, wh, pw // ww, ww).permute(0, 2, 1, 3).reshape(-1)
    return real.nonzero().squeeze(1).to(a["input"].device), real.numel()


class _CaptureMode(TorchFunctionMode):
    """Taps the registered linear calls of one opaque call (see the module docstring)."""

    def __init__(self, plan: OpaquePlan, n: int | None, rows: tuple[torch.Tensor, int] | None = None):
        super().__init__()
        self.plan = plan
        self.n = n  # batch size of the call: the leading dimension of its first tensor argument
        self.rows = rows  # (indices of the rows to record, rows per example): see _swin_real_rows
        self.weights = {id(s.weight): s for s in plan.linear}
        self.guarded = {id(s.weight): s for s in plan.sites} | {id(s.bias): s for s in plan.sites
                                                                  if s.bias is not None}
        self.seen: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        plan = self.plan
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            site = self.weights.get(id(w))
            if site is not None and site.weight is w:
                x = args[0] if args else kwargs["input"]
                rest = [a for a in (*args[2:], *(v for k, v in kwargs.items() if k not in ("input", "weight")))]
                self._check(func, [*rest, x])
                self.seen.add(site.index)
                return self._tap(func(*args, **kwargs), x, site)
        elif func is mha.MHA_TARGET and plan.mha is not None:
            a = mha.bind(args, kwargs)
            s_in, s_out = plan.mha
            if a["in_proj_weight"] is s_in.weight and a["out_proj_weight"] is s_out.weight:
                reason = mha.unsupported_reason(a, a["query"].dim() if isinstance(a["query"], torch.Tensor) else None)
                if not reason and a["in_proj_bias"] is s_in.bias and a["out_proj_bias"] is s_out.bias:
                    self.seen.update((s_in.index, s_out.index))
                    return mha.self_attention(*(a[k] for k in _MHA_ARGS), plan.state.slot, *plan._keys)
                plan.warn("mha", f"attention {plan.name!r} called as {reason or 'with other biases'}: no statistics "
                                 "for its projections in this call")
                return func(*args, **kwargs)
        self._check(func, [*args, *kwargs.values()])
        return func(*args, **kwargs)

    def _tap(self, y: torch.Tensor, x: torch.Tensor, site: OpaqueSite) -> torch.Tensor:
        """Tap with rows grouped per example, so that approx='reduce' sums positions per example.

        An input with a leading dimension of N·k (Swin's windows) is seen as (N, k·…, in), rows example-major. With
        ``rows`` only those rows of each example are recorded (the output is unchanged).
        """
        n = self.n
        if n is None or x.dim() < 2 or (x.shape[0] == n and self.rows is None):
            return tap(y, x, self.plan.state, site.index)
        if x.shape[0] % n:
            self.plan.disable(site, f"its input's leading dimension {x.shape[0]} is not a multiple of the batch "
                                    f"size {n} of the call")
            return y
        xs = x.reshape(n, -1, x.shape[-1])
        ys = y.view(n, -1, y.shape[-1])
        if self.rows is None:
            return tap(ys, xs, self.plan.state, site.index).view(y.shape)
        index, per_example = self.rows
        if xs.shape[1] != per_example:
            self.plan.disable(site, f"its input has {xs.shape[1]} rows per example, the padded window grid "
                                    f"{per_example}")
            return y
        tapped = tap(ys.index_select(1, index), xs.index_select(1, index), self.plan.state, site.index)
        return ys.index_copy(1, index, tapped).view(y.shape)

    def _check(self, func, values) -> None:
        if getattr(func, "__name__", "") in _METADATA:
            return
        for v in values:
            for t in (v if isinstance(v, (list, tuple)) else (v,)):
                site = self.guarded.get(id(t))
                if site is not None and (t is site.weight or t is site.bias):
                    self.plan.disable(site, f"used by {getattr(func, '__name__', func)} inside {self.plan.name}")

    def finish(self) -> None:
        for site in self.plan.sites:
            if site.index not in self.seen and self.plan.state.sites[site.index].layer is not None:
                self.plan.warn(f"unseen{site.index}", f"the weight of {self.plan.name!r} with shape "
                                                      f"{tuple(site.weight.shape)} was not used by a linear call "
                                                      "during an armed forward: no statistics for it")


def _capturing(plan: OpaquePlan, fn, args, kwargs):
    if not (torch.is_grad_enabled() and plan.state is not None and plan.state.armed):
        return fn(*args, **kwargs)
    first = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if first is not None and fwAD.unpack_dual(first).tangent is not None:
        return fn(*args, **kwargs)  # a forward-mode JVP (Fisher-vector products): no statistics, original ops
    mode = _CaptureMode(plan, first.shape[0] if first is not None and first.dim() else None,
                        _swin_real_rows(fn, args, kwargs))
    with mode:
        out = fn(*args, **kwargs)
    mode.finish()
    return out


# Under torch.compile the mode cannot be traced: the call runs eagerly (a graph break), which keeps the
# statistics right; the kfc backend on the original model decomposes attention without a break.
_capturing_eager = torch.compiler.disable(_capturing)


def call(plan: OpaquePlan, fn, args, kwargs):
    """Run ``fn(*args, **kwargs)``, capturing the plan's linear calls when statistics are due."""
    if torch.compiler.is_compiling():
        return _capturing_eager(plan, fn, args, kwargs)
    return _capturing(plan, fn, args, kwargs)


class OpaqueCall(nn.Module):
    """The graph node that replaces an opaque ``call_function`` node (``call_module`` of this module)."""

    def __init__(self, fn, plan: OpaquePlan):
        super().__init__()
        self.fn = fn
        self.plan = plan

    def forward(self, *args, **kwargs):
        """Run the wrapped function, capturing the plan's sites when statistics are due (see :func:`call`)."""
        return call(self.plan, self.fn, args, kwargs)

    def extra_repr(self) -> str:
        """The wrapped function's name and the indices of its sites, for ``print(model)``."""
        return f"{getattr(self.fn, '__name__', self.fn)}, sites={[s.index for s in self.plan.sites]}"


_CAPTURING_CLASSES: dict[type, type] = {}


def capturing_class(cls: type) -> type:
    """A subclass of a module class (``nn.MultiheadAttention``) whose forward runs under the capture mode."""
    if cls not in _CAPTURING_CLASSES:
        def forward(self, *args, **kwargs):
            return call(self._kfc_plan, cls.forward, (self, *args), kwargs)
        _CAPTURING_CLASSES[cls] = type(f"KFC{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})
    return _CAPTURING_CLASSES[cls]
