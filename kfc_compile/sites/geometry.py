"""Layer kinds: how one call site's (input, output-gradient) pair becomes Ω and Γ contributions.

A *site* is one call of a linear or convolution in the model; a *layer* (see ``factors.py``) is one weight
parameter, which may be used at several sites. Each kind knows its geometry and produces, for a batch:

* ``a_rows``/``a_sum``: the input side — unfolded patches (expand) or their per-example sums (reduce);
* ``g_rows``/``g_sum``: the output-gradient side, channels last, split per group.

All heavy lifting goes through the ``triton_kernels`` ops so that CUDA tensors get the fused kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import triton_kernels as tk

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class StandardWeight:
    """Where a site's weight lives in its layer's gradient matrix: ``weight.flatten(1)``'s rows, per group.

    The preconditioner works on ``(groups, g_dim, a_in)`` matrices (Γ's rows, Ω's columns without the bias); a kind
    whose parameter is stored in another layout (a transposed conv's (Cin, Cout/groups, k...), a matmul weight
    stored (in, out)) overrides these two maps, so the update lands in the parameter's own layout.
    """

    groups: int
    g_dim: int

    def weight_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """A parameter-shaped tensor (the weight, its gradient) as ``(groups, g_dim, a_in)``."""
        return w.reshape(self.groups, self.g_dim, -1)

    def weight_from_matrix(self, m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`weight_matrix`: a ``(groups, g_dim, a_in)`` matrix in the parameter's ``shape``."""
        return m.reshape(shape)


@dataclass(frozen=True)
class LinearSite(StandardWeight):
    """``F.linear(x, W, b)`` on an input of any rank: leading dims become positions."""

    in_features: int
    out_features: int
    has_bias: bool
    kind: str = "linear"
    groups: int = 1

    @property
    def a_dim(self) -> int:
        """Length of one input row (Ω's size per group without the bias coordinate): the input features."""
        return self.in_features

    @property
    def g_dim(self) -> int:
        """Length of one output-gradient row (Γ's size per group): the output features."""
        return self.out_features

    def positions(self, x: torch.Tensor) -> int:
        """Positions per example: the product of the dims between the batch dim and the features (0 for no examples)."""
        return x.numel() // (x.shape[0] * self.in_features) if x.shape[0] else 0

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(1, N·T, in): one group, rows are (example, position) pairs."""
        return x.reshape(1, -1, self.in_features)

    def input_sums(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, in): per-example sums over positions (the ones coordinate is added by the caller)."""
        n = x.shape[0]
        return x.reshape(n, -1, self.in_features).sum(1, dtype=_acc_dtype(x)).unsqueeze(1)

    def accumulate_input_cov(self, out: torch.Tensor, x: torch.Tensor, alpha: float, beta: float, ones: bool) -> None:
        """In place ``out <- beta*out + alpha*X^T X`` over the input rows (with the ones coordinate when ``ones``)."""
        tk.syrk_update_(out, self.input_rows(x), alpha=alpha, beta=beta, ones=ones)

    def output_rows(self, gy: torch.Tensor) -> torch.Tensor:
        """(1, N·T, out): one group, output-gradient rows are (example, position) pairs."""
        return gy.reshape(1, -1, self.out_features)

    def output_sums(self, gy: torch.Tensor) -> torch.Tensor:
        """(N, 1, out): per-example sums of the output gradients over positions."""
        n = gy.shape[0]
        return gy.reshape(n, -1, self.out_features).sum(1, dtype=_acc_dtype(gy)).unsqueeze(1)


@dataclass(frozen=True)
class MatmulSite(LinearSite):
    """``x @ W`` with ``W`` stored (in, out): ``torch.matmul``/``mm``/``addmm`` weights, HF's ``Conv1D``.

    The call is ``F.linear(x, Wᵀ)``, so positions, rows and factors are the linear layer's; only the weight's place in
    the gradient matrix differs: the layer's (out, in) block is ``Wᵀ``, and an update is transposed back.
    """

    kind: str = "matmul"

    def weight_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """The (in, out) parameter-shaped ``w`` as the (1, out, in) block of the equivalent ``nn.Linear``."""
        return w.reshape(self.in_features, self.out_features).t().unsqueeze(0)

    def weight_from_matrix(self, m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`weight_matrix`: a (1, out, in) matrix as the (in, out) parameter layout ``shape``."""
        return m.reshape(self.out_features, self.in_features).t().reshape(shape)


@dataclass(frozen=True)
class ConvSite(StandardWeight):
    """``F.conv{1,2,3}d`` with any stride, padding (incl. 'same' and non-zero modes), dilation and groups."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]  # (lo_0, hi_0, lo_1, hi_1, ...) applied by the conv itself (zero padding)
    dilation: tuple[int, ...]
    groups: int
    has_bias: bool
    padding_mode: str = "zeros"  # non-zero modes: pre-pad the input explicitly with ``mode_padding``
    mode_padding: tuple[int, ...] = ()  # F.pad order (last dim first), used only when padding_mode != zeros

    @property
    def kind(self) -> str:
        """``conv1d``, ``conv2d`` or ``conv3d``: the layer kind, named by the number of spatial dims."""
        return f"conv{len(self.kernel_size)}d"

    @property
    def a_dim(self) -> int:
        """Length of one patch (Ω's size per group without the bias coordinate): channels per group × kernel offsets."""
        return (self.in_channels // self.groups) * math.prod(self.kernel_size)

    @property
    def g_dim(self) -> int:
        """Output channels per group (Γ's size per group)."""
        return self.out_channels // self.groups

    def _padded(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode == "zeros":
            return x
        return F.pad(x, self.mode_padding, mode=self.padding_mode)

    def out_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """The conv's output spatial shape for the input ``x`` (after the padding mode's explicit padding)."""
        spatial = self._padded(x).shape[2:]
        return tuple(
            (s + self.padding[2 * i] + self.padding[2 * i + 1] - self.dilation[i] * (k - 1) - 1) // self.stride[i] + 1
            for i, (s, k) in enumerate(zip(spatial, self.kernel_size, strict=True))
        )

    def positions(self, x: torch.Tensor) -> int:
        """Output positions per example: the product of the output spatial shape."""
        return math.prod(self.out_shape(x))

    def accumulate_input_cov(self, out: torch.Tensor, x: torch.Tensor, alpha: float, beta: float, ones: bool) -> None:
        """In place ``out[g] <- beta*out[g] + alpha*sum p p^T`` over the patches (``ones``: with a 1 appended)."""
        tk.patch_cov_update_(
            out, self._padded(x), self.kernel_size, self.stride, self.padding, self.dilation, self.groups,
            alpha=alpha, beta=beta, ones=ones,
        )

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(groups, N·T, a_dim): explicit patches (for block-diagonal Ω)."""
        return tk.patch_rows(self._padded(x), self.kernel_size, self.stride, self.padding, self.dilation,
                             self.groups)

    def input_sums(self, x: torch.Tensor) -> torch.Tensor:
        """(N, groups, a_dim): per-example sums of patches over output positions."""
        s = tk.patch_sum(self._padded(x), self.kernel_size, self.stride, self.padding, self.dilation, self.groups)
        return s

    def output_rows(self, gy: torch.Tensor) -> torch.Tensor:
        """(groups, N·T, Cout/groups)."""
        n = gy.shape[0]
        g = gy.reshape(n, self.groups, self.g_dim, -1)  # (N, G, I, T)
        return g.permute(1, 0, 3, 2).reshape(self.groups, -1, self.g_dim)

    def output_sums(self, gy: torch.Tensor) -> torch.Tensor:
        """(N, groups, Cout/groups): per-example sums of the output gradients over positions."""
        n = gy.shape[0]
        return gy.reshape(n, self.groups, self.g_dim, -1).sum(-1, dtype=_acc_dtype(gy))


@dataclass(frozen=True)
class ConvTransposeSite(StandardWeight):
    """``F.conv_transpose{1,2,3}d`` as its equivalent direct conv (BackPACK's view), any stride/padding/groups.

    ``conv_transpose(x, W)`` equals a stride-1 conv with dilation d of the zero-inserted input x̃ (x[j] at s·j,
    zeros between), padded by d·(k−1)−p before and d·(k−1)−p+output_padding after (cropped where negative),
    with the direct weight W'[g·I/G + o, i, κ'] = W[g·J/G + i, o, k−1−κ'] (I = Cout, J = Cin, G = groups). The
    factors are the direct weight's: Ω's coordinates per group are (i, κ') channel-major, offset-minor, so Ω
    coordinate (i, κ') belongs to the transposed weight's entries ``W[g·J/G + i, :, k−1−κ']`` (flipped offsets); Γ
    is over the output channels of group g, as for a direct conv. T is the number of output positions.
    The input side is the torch path: x̃ is materialised (s^d times the input, one transient tensor per statistics
    call) and handed to the direct-conv patch ops (Triton on CUDA); no kernel skips the inserted zeros. Stride 1
    needs no zero insertion (x̃ is x, cropped if p > d·(k−1)).
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]  # per spatial dim, as the transposed conv takes it
    output_padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    has_bias: bool

    @property
    def kind(self) -> str:
        """``conv_transpose1d``, ``conv_transpose2d`` or ``conv_transpose3d``: the layer kind."""
        return f"conv_transpose{len(self.kernel_size)}d"

    @property
    def a_dim(self) -> int:
        """Length of one patch of the equivalent direct conv: input channels per group × kernel offsets."""
        return (self.in_channels // self.groups) * math.prod(self.kernel_size)

    @property
    def g_dim(self) -> int:
        """Output channels per group (Γ's size per group)."""
        return self.out_channels // self.groups

    def direct_input(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(x̃ cropped where the direct conv's padding is negative, that padding's non-negative (lo, hi) per dim)."""
        if any(s > 1 for s in self.stride):
            n, c, *spatial = x.shape
            xz = x.new_zeros(n, c, *((size - 1) * s + 1 for size, s in zip(spatial, self.stride, strict=True)))
            xz[(slice(None), slice(None), *(slice(None, None, s) for s in self.stride))] = x
        else:
            xz = x
        crop, pads = [slice(None), slice(None)], []
        for size, k, p, op, dl in zip(xz.shape[2:], self.kernel_size, self.padding, self.output_padding,
                                      self.dilation, strict=True):
            lo, hi = dl * (k - 1) - p, dl * (k - 1) - p + op
            crop.append(slice(max(0, -lo), size - max(0, -hi)))
            pads += [max(0, lo), max(0, hi)]
        return xz[tuple(crop)], tuple(pads)

    def out_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """The transposed conv's output spatial shape for the input ``x``."""
        return tuple((s - 1) * st - 2 * p + dl * (k - 1) + op + 1 for s, st, p, dl, k, op in zip(
            x.shape[2:], self.stride, self.padding, self.dilation, self.kernel_size, self.output_padding, strict=True))

    def positions(self, x: torch.Tensor) -> int:
        """Output positions per example: the product of the output spatial shape."""
        return math.prod(self.out_shape(x))

    def _patch_args(self, x: torch.Tensor) -> tuple:
        xz, pads = self.direct_input(x)
        return xz, self.kernel_size, (1,) * len(self.kernel_size), pads, self.dilation, self.groups

    def accumulate_input_cov(self, out: torch.Tensor, x: torch.Tensor, alpha: float, beta: float, ones: bool) -> None:
        """In place ``out[g] <- beta*out[g] + alpha*sum p p^T`` over the direct conv's patches of x̃."""
        tk.patch_cov_update_(out, *self._patch_args(x), alpha=alpha, beta=beta, ones=ones)

    def input_rows(self, x: torch.Tensor) -> torch.Tensor:
        """(groups, N·T, a_dim): explicit patches of x̃ (for block-diagonal Ω)."""
        return tk.patch_rows(*self._patch_args(x))

    def input_sums(self, x: torch.Tensor) -> torch.Tensor:
        """(N, groups, a_dim): per-example sums of the patches of x̃ over output positions."""
        return tk.patch_sum(*self._patch_args(x))

    output_rows = ConvSite.output_rows  # the output side is a direct conv's: channels per group
    output_sums = ConvSite.output_sums

    def weight_matrix(self, w: torch.Tensor) -> torch.Tensor:
        """A (Cin, Cout/groups, k...) tensor as the direct weight's ``(groups, Cout/groups, a_dim)`` blocks."""
        d = len(self.kernel_size)
        w = w.reshape(self.groups, self.in_channels // self.groups, self.g_dim, *self.kernel_size)
        return w.flip(tuple(range(3, 3 + d))).transpose(1, 2).reshape(self.groups, self.g_dim, -1)

    def weight_from_matrix(self, m: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """Inverse of :meth:`weight_matrix`: direct-weight blocks back in the transposed layout ``shape``."""
        d = len(self.kernel_size)
        m = m.reshape(self.groups, self.g_dim, self.in_channels // self.groups, *self.kernel_size)
        return m.transpose(1, 2).flip(tuple(range(3, 3 + d))).reshape(shape)


Site = LinearSite | ConvSite | ConvTransposeSite


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _tuple(v, n: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * n
    v = tuple(int(i) for i in v)
    if len(v) == 1:
        return v * n
    if len(v) != n:
        raise ValueError(f"expected {n} values, got {v}")
    return v


def conv_site(weight: torch.Tensor, has_bias: bool, stride, padding, dilation, groups: int,
              padding_mode: str = "zeros") -> ConvSite:
    """Build a ConvSite from conv call arguments, resolving 'same'/'valid' padding like PyTorch does."""
    if padding_mode not in _PADDING_MODES:
        raise ValueError(f"unsupported padding_mode {padding_mode!r}")
    d = weight.dim() - 2
    if d not in (1, 2, 3):
        raise ValueError(f"conv weight must have 3..5 dims, got {tuple(weight.shape)}")
    kernel = tuple(weight.shape[2:])
    stride = _tuple(stride, d)
    dilation = _tuple(dilation, d)
    if isinstance(padding, str):
        if padding == "valid":
            pads = (0,) * (2 * d)
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' requires stride 1")
            pads = []
            for k, dil in zip(kernel, dilation, strict=True):
                total = dil * (k - 1)
                pads += [total // 2, total - total // 2]
            pads = tuple(pads)
        else:
            raise ValueError(f"unknown padding {padding!r}")
    else:
        p = _tuple(padding, d)
        pads = tuple(v for pi in p for v in (pi, pi))
    mode_padding: tuple[int, ...] = ()
    if padding_mode != "zeros":
        # nn.ConvNd pads with the mode (F.pad order: last dim first), then convolves without padding.
        mode_padding = tuple(v for i in reversed(range(d)) for v in (pads[2 * i], pads[2 * i + 1]))
        pads = (0,) * (2 * d)
    cout, cin_g = weight.shape[0], weight.shape[1]
    return ConvSite(
        in_channels=cin_g * groups, out_channels=cout, kernel_size=kernel, stride=stride, padding=pads,
        dilation=dilation, groups=groups, has_bias=has_bias, padding_mode=padding_mode, mode_padding=mode_padding,
    )


def linear_site(weight: torch.Tensor, has_bias: bool) -> LinearSite:
    """Build a LinearSite from a linear call's (out, in) weight and whether the call has a bias."""
    return LinearSite(in_features=weight.shape[1], out_features=weight.shape[0], has_bias=has_bias)


def conv_transpose_site(weight: torch.Tensor, has_bias: bool, stride, padding, output_padding, groups: int,
                        dilation) -> ConvTransposeSite:
    """Build a ConvTransposeSite from ``F.conv_transpose*d`` arguments (weight (Cin, Cout/groups, k...)).

    Raises ValueError for what torch rejects too: string padding, output_padding not below stride or dilation.
    """
    d = weight.dim() - 2
    if d not in (1, 2, 3):
        raise ValueError(f"transposed conv weight must have 3..5 dims, got {tuple(weight.shape)}")
    if isinstance(padding, str):
        raise ValueError(f"transposed convs take no string padding, got {padding!r}")
    stride, padding, dilation = _tuple(stride, d), _tuple(padding, d), _tuple(dilation, d)
    output_padding = _tuple(output_padding, d)
    if any(op >= max(s, dl) or op < 0 for op, s, dl in zip(output_padding, stride, dilation, strict=True)):
        raise ValueError(f"output_padding {output_padding} must be below stride {stride} or dilation {dilation}")
    if weight.shape[0] % groups:
        raise ValueError(f"groups={groups} does not divide the {weight.shape[0]} input channels")
    return ConvTransposeSite(
        in_channels=weight.shape[0], out_channels=weight.shape[1] * groups, kernel_size=tuple(weight.shape[2:]),
        stride=stride, padding=padding, output_padding=output_padding, dilation=dilation, groups=groups,
        has_bias=has_bias,
    )


def matmul_site(weight: torch.Tensor, has_bias: bool) -> MatmulSite:
    """Build a MatmulSite from the (in, out) weight of ``x @ W`` and whether the call has a bias."""
    return MatmulSite(in_features=weight.shape[0], out_features=weight.shape[1], has_bias=has_bias)
