"""KFC kernels: symmetric factor updates, implicit-im2col patch statistics and preconditioned updates.

Each function runs a ``kfc::`` custom op (``ops.py``) that validates its inputs and runs either the Triton kernel
or its torch reference, chosen per call by ``dispatch.backend`` from the tensors' device and the
``KFC_KERNELS=auto|triton|torch`` environment variable; in plain eager execution the op's implementation is
called without the dispatcher (``ops.call``, ``dispatch.direct``). The Triton modules are imported lazily.
"""
from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from . import checks, reference
from . import ops as _ops  # registers the kfc:: ops

__all__ = ["syrk_update_", "patch_cov_update_", "patch_sum", "patch_rows", "eigen_precondition",
           "kron_precondition"]


def syrk_update_(F: Tensor, X: Tensor, alpha: float = 1.0, beta: float = 0.0, ones: bool = False) -> Tensor:
    """In place F <- beta*F + alpha*Xbar^T Xbar; returns F.

    X is (M, D) or (B, M, D); F is (D', D') or (B, D', D') with D' = D + ones, fp32 or fp64 (X of any float dtype
    is upcast, accumulation in F's dtype). ``ones`` appends an implicit trailing column of ones (the bias
    coordinate). The result is exactly symmetric, built from the upper triangle (F's old lower triangle is
    ignored). With ``beta == 0`` F's old contents are never read.
    """
    _ops.call("syrk_update", F, X, float(alpha), float(beta), bool(ones))
    return F


def patch_cov_update_(F: Tensor, x: Tensor, kernel_size: Sequence[int], stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], groups: int, alpha: float = 1.0,
                      beta: float = 0.0, ones: bool = False) -> Tensor:
    """In place F[g] <- beta*F[g] + alpha*sum_{n,t} pbar pbar^T (conv input patch second moment); returns F.

    x is (N, C, *S) with 1 to 3 spatial dims and any strides; ``padding`` is (lo_0, hi_0, lo_1, hi_1, ...) (zero
    padding); F is (groups, Dg', Dg') with Dg = (C/groups)*prod(kernel_size), Dg' = Dg + ones, patches ordered like
    ``weight.flatten(1)``. Same symmetry and ``beta == 0`` rules as :func:`syrk_update_`.
    """
    _ops.call("patch_cov_update", F, x, list(kernel_size), list(stride), list(padding), list(dilation),
              int(groups), float(alpha), float(beta), bool(ones))
    return F


def patch_sum(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int], groups: int, ones: bool = False) -> Tensor:
    """(N, groups, Dg') sum over output locations of the patches (KFAC-reduce); the ones coordinate sums to T.

    fp32, or fp64 when x is fp64. Geometry arguments as in :func:`patch_cov_update_`.
    """
    return _ops.call("patch_sum", x, list(kernel_size), list(stride), list(padding), list(dilation), int(groups),
                     bool(ones))


def patch_rows(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
               dilation: Sequence[int], groups: int) -> Tensor:
    """(groups, N·T, Dg) explicit patches (im2col), ordered like ``weight.flatten(1)``, in x's dtype.

    For consumers that need the rows themselves (block-diagonal factors split the patch coordinates before the
    products); plain torch on every device. Geometry arguments as in :func:`patch_cov_update_`.
    """
    geom = checks.conv_geometry(x, kernel_size, stride, padding, dilation, groups)
    cols = reference.im2col(x, geom)  # (N, groups, Dg, T)
    return cols.permute(1, 0, 3, 2).reshape(geom.groups, geom.N * geom.T, geom.Dg)


def eigen_precondition(grad: Tensor, QG: Tensor, lG: Tensor, QA: Tensor, lA: Tensor, damping: float,
                       out: Tensor | None = None, alpha: float = 1.0, beta: float = 0.0) -> Tensor:
    """U = QG [(QG^T grad QA) / (lG lA^T + damping)] QA^T, batched over a leading dim (or unbatched 2-d/1-d).

    grad (B, I, D), QG (B, I, I), lG (B, I), QA (B, D, D), lA (B, D). Without ``out`` returns U (fp32, fp64 if any
    input is fp64); with ``out`` (grad's shape, any float dtype) computes out <- beta*out + alpha*U in place and
    returns out (e.g. alpha=-lr, beta=1 updates a parameter directly).
    """
    if out is None:
        return _ops.call("eigen_precondition", grad, QG, lG, QA, lA, float(damping))
    _ops.call("eigen_precondition_out", out, grad, QG, lG, QA, lA, float(damping), float(alpha), float(beta))
    return out


def kron_precondition(grad: Tensor, Ginv: Tensor, Ainv: Tensor, out: Tensor | None = None, alpha: float = 1.0,
                      beta: float = 0.0) -> Tensor:
    """U = Ginv grad Ainv, batched like :func:`eigen_precondition`, with the same ``out`` epilogue."""
    if out is None:
        return _ops.call("kron_precondition", grad, Ginv, Ainv)
    _ops.call("kron_precondition_out", out, grad, Ginv, Ainv, float(alpha), float(beta))
    return out
