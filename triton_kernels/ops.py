"""``torch.library`` custom ops (namespace ``kfc``) wrapping the kernels, with fake impls for torch.compile.

Each op validates its inputs (also under fake tensors, so a bad call fails while tracing), asks
``dispatch.backend`` which implementation to run, and runs it. The ops are opaque to inductor: torch.compile
traces them as single nodes with no graph break; in-place ops declare ``mutates_args`` so functionalization
handles the writes.

:func:`call` is how the public wrappers run an op: in plain eager execution (``dispatch.direct``) it calls the
op's implementation (``<name>_impl``, the function the op was registered with) as a Python function, which skips
the ``torch.library`` dispatcher (~30-50 µs per call on CPU, more than the torch twin's own work on small
layers); under tracing, fake or functional tensors, functorch transforms or autograd it calls ``torch.ops.kfc``,
so compiled graphs hold the ops.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from . import checks, dispatch, reference, shift_cov


def _triton(kernel: str):
    mod = dispatch.kernel_module(kernel)
    return mod, dispatch.kernels_interpreted(mod)


# ---------------------------------------------------------------------------------------------------------------
# symmetric rank-k update


def syrk_update_impl(F: Tensor, X: Tensor, alpha: float, beta: float, ones: bool) -> None:
    """F <- beta*F + alpha*Xbar^T Xbar (in place, exactly symmetric)."""
    F3, X3 = checks.check_syrk(F, X, ones)
    if dispatch.backend("syrk", F, X) == "triton":
        mod, interp = _triton("syrk")
        mod.syrk_update_(F3, X3, alpha, beta, ones, interp)
    else:
        reference.syrk_update_(F3, X3, alpha, beta, ones)


syrk_update = torch.library.custom_op("kfc::syrk_update", syrk_update_impl, mutates_args=("F",))


@syrk_update.register_fake
def _(F: Tensor, X: Tensor, alpha: float, beta: float, ones: bool) -> None:
    checks.check_syrk(F, X, ones)


# ---------------------------------------------------------------------------------------------------------------
# conv patches


def patch_cov_update_impl(F: Tensor, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                          padding: Sequence[int], dilation: Sequence[int], groups: int, alpha: float, beta: float,
                          ones: bool) -> None:
    """F[g] <- beta*F[g] + alpha*sum_{n,t} pbar pbar^T with implicit im2col (in place, exactly symmetric)."""
    geom = checks.conv_geometry(x, kernel_size, stride, padding, dilation, groups)
    F3 = checks.check_patch_cov(F, x, geom, ones)
    if dispatch.backend("patch_cov", F, x) == "triton":
        mod, interp = _triton("patch_cov")
        mod.patch_cov_update_(F3, x, geom, alpha, beta, ones, interp)
    else:
        shift_cov.patch_cov_update_cpu(F3, x, geom, alpha, beta, ones)


patch_cov_update = torch.library.custom_op("kfc::patch_cov_update", patch_cov_update_impl, mutates_args=("F",))


@patch_cov_update.register_fake
def _(F: Tensor, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
      dilation: Sequence[int], groups: int, alpha: float, beta: float, ones: bool) -> None:
    geom = checks.conv_geometry(x, kernel_size, stride, padding, dilation, groups)
    checks.check_patch_cov(F, x, geom, ones)


def _sum_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def patch_sum_impl(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int, ones: bool) -> Tensor:
    """(N, groups, Dg') sums over output locations of the (bias-augmented) patches."""
    geom = checks.conv_geometry(x, kernel_size, stride, padding, dilation, groups)
    if dispatch.backend("patch_cov", x) == "triton":
        mod, interp = _triton("patch_cov")
        return mod.patch_sum(x, geom, ones, _sum_dtype(x), interp)
    return reference.patch_sum(x, geom, ones, _sum_dtype(x))


patch_sum = torch.library.custom_op("kfc::patch_sum", patch_sum_impl, mutates_args=())


@patch_sum.register_fake
def _(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
      dilation: Sequence[int], groups: int, ones: bool) -> Tensor:
    geom = checks.conv_geometry(x, kernel_size, stride, padding, dilation, groups)
    return x.new_empty((geom.N, geom.groups, geom.dp(ones)), dtype=_sum_dtype(x))


# ---------------------------------------------------------------------------------------------------------------
# preconditioners


def _eigen(grad, QG, lG, QA, lA, damping, out, alpha, beta) -> Tensor:
    ub, g, QG3, lG2, QA3, lA2, out3 = checks.check_eigen(grad, QG, lG, QA, lA, out)
    dtype = checks.compute_dtype(grad, QG, lG, QA, lA)
    if dispatch.backend("precondition", grad, QG, lG, QA, lA, *(() if out is None else (out,))) == "triton":
        mod, interp = _triton("precondition")
        U = mod.eigen_precondition(g, QG3, lG2, QA3, lA2, damping, out3, alpha, beta, dtype, interp)
    else:
        U = reference.eigen_precondition(g, QG3, lG2, QA3, lA2, damping, out3, alpha, beta, dtype)
    return U[0] if ub else U


def eigen_precondition_impl(grad: Tensor, QG: Tensor, lG: Tensor, QA: Tensor, lA: Tensor,
                            damping: float) -> Tensor:
    """U = QG [(QG^T grad QA) / (lG lA^T + damping)] QA^T (batched or not), as a new tensor."""
    return _eigen(grad, QG, lG, QA, lA, damping, None, 1.0, 0.0)


eigen_precondition = torch.library.custom_op("kfc::eigen_precondition", eigen_precondition_impl, mutates_args=())


@eigen_precondition.register_fake
def _(grad: Tensor, QG: Tensor, lG: Tensor, QA: Tensor, lA: Tensor, damping: float) -> Tensor:
    checks.check_eigen(grad, QG, lG, QA, lA, None)
    return grad.new_empty(grad.shape, dtype=checks.compute_dtype(grad, QG, lG, QA, lA))


def eigen_precondition_out_impl(out: Tensor, grad: Tensor, QG: Tensor, lG: Tensor, QA: Tensor, lA: Tensor,
                                damping: float, alpha: float, beta: float) -> None:
    """``out`` <- beta*out + alpha*U for the eigenbasis update U (fused epilogue)."""
    _eigen(grad, QG, lG, QA, lA, damping, out, alpha, beta)


eigen_precondition_out = torch.library.custom_op("kfc::eigen_precondition_out", eigen_precondition_out_impl,
                                                 mutates_args=("out",))


@eigen_precondition_out.register_fake
def _(out: Tensor, grad: Tensor, QG: Tensor, lG: Tensor, QA: Tensor, lA: Tensor, damping: float, alpha: float,
      beta: float) -> None:
    checks.check_eigen(grad, QG, lG, QA, lA, out)


def _kron(grad, Ginv, Ainv, out, alpha, beta) -> Tensor:
    ub, g, G3, A3, out3 = checks.check_kron(grad, Ginv, Ainv, out)
    dtype = checks.compute_dtype(grad, Ginv, Ainv)
    if dispatch.backend("precondition", grad, Ginv, Ainv, *(() if out is None else (out,))) == "triton":
        mod, interp = _triton("precondition")
        U = mod.kron_precondition(g, G3, A3, out3, alpha, beta, dtype, interp)
    else:
        U = reference.kron_precondition(g, G3, A3, out3, alpha, beta, dtype)
    return U[0] if ub else U


def kron_precondition_impl(grad: Tensor, Ginv: Tensor, Ainv: Tensor) -> Tensor:
    """U = Ginv grad Ainv (batched or not), as a new tensor."""
    return _kron(grad, Ginv, Ainv, None, 1.0, 0.0)


kron_precondition = torch.library.custom_op("kfc::kron_precondition", kron_precondition_impl, mutates_args=())


@kron_precondition.register_fake
def _(grad: Tensor, Ginv: Tensor, Ainv: Tensor) -> Tensor:
    checks.check_kron(grad, Ginv, Ainv, None)
    return grad.new_empty(grad.shape, dtype=checks.compute_dtype(grad, Ginv, Ainv))


def kron_precondition_out_impl(out: Tensor, grad: Tensor, Ginv: Tensor, Ainv: Tensor, alpha: float,
                               beta: float) -> None:
    """``out`` <- beta*out + alpha*Ginv grad Ainv (fused epilogue)."""
    _kron(grad, Ginv, Ainv, out, alpha, beta)


kron_precondition_out = torch.library.custom_op("kfc::kron_precondition_out", kron_precondition_out_impl,
                                                mutates_args=("out",))


@kron_precondition_out.register_fake
def _(out: Tensor, grad: Tensor, Ginv: Tensor, Ainv: Tensor, alpha: float, beta: float) -> None:
    checks.check_kron(grad, Ginv, Ainv, out)


# ---------------------------------------------------------------------------------------------------------------
# one entry point for the public wrappers

_IMPLS = {"syrk_update": syrk_update_impl, "patch_cov_update": patch_cov_update_impl, "patch_sum": patch_sum_impl,
          "eigen_precondition": eigen_precondition_impl, "eigen_precondition_out": eigen_precondition_out_impl,
          "kron_precondition": kron_precondition_impl, "kron_precondition_out": kron_precondition_out_impl}
_OPS = {name: getattr(torch.ops.kfc, name) for name in _IMPLS}


def call(name: str, *args):
    """Run the op ``kfc::<name>`` on ``args``: its implementation directly where ``dispatch.direct`` allows it.

    Both paths run the same function on the same arguments (the op's registered implementation), so their results
    are identical; only the dispatcher's overhead differs.
    """
    if dispatch.direct(args):
        return _IMPLS[name](*args)
    return _OPS[name](*args)
