"""Input validation and conv geometry, shared by the torch references, the Triton launchers and the fake impls.

Every public kernel validates here first, so a bad call fails with a ValueError that names the problem, whichever
backend would have run it (and also while torch.compile traces with fake tensors).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

FACTOR_DTYPES = (torch.float32, torch.float64)
INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def check_floating(name: str, t: Tensor, allowed: tuple[torch.dtype, ...] = INPUT_DTYPES) -> None:
    """Raise ``ValueError`` unless ``t`` is a tensor with one of the ``allowed`` dtypes."""
    if not isinstance(t, Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in allowed:
        _fail(f"{name} has dtype {t.dtype}; expected one of {[str(d) for d in allowed]}")


def check_same_device(**tensors: Tensor) -> None:
    """Raise ``ValueError`` unless all ``tensors`` (named by keyword, for the message) share one device."""
    devs = {name: t.device for name, t in tensors.items()}
    if len(set(devs.values())) > 1:
        _fail("all tensors must be on the same device, got " + ", ".join(f"{k}={v}" for k, v in devs.items()))


# ---------------------------------------------------------------------------------------------------------------
# syrk


def check_syrk(F: Tensor, X: Tensor, ones: bool) -> tuple[Tensor, Tensor]:
    """Validate a syrk call; return batched views (B, D', D') and (B, M, D)."""
    check_floating("F", F, FACTOR_DTYPES)
    check_floating("X", X)
    check_same_device(F=F, X=X)
    if X.dim() not in (2, 3):
        _fail(f"X must be (M, D) or (B, M, D), got {X.dim()} dims with shape {tuple(X.shape)}")
    if F.dim() != X.dim():
        _fail(f"F must have {X.dim()} dims to match X {tuple(X.shape)} (F is ({'B, ' if X.dim() == 3 else ''}D', D')),"
              f" got shape {tuple(F.shape)}")
    F3 = F if F.dim() == 3 else F.unsqueeze(0)
    X3 = X if X.dim() == 3 else X.unsqueeze(0)
    D = X3.shape[-1]
    Dp = D + int(bool(ones))
    if F3.shape[-1] != Dp or F3.shape[-2] != Dp:
        _fail(f"F has shape {tuple(F.shape)} but X has D={D} and ones={bool(ones)}, so F must be ({Dp}, {Dp})"
              + (" per batch" if X.dim() == 3 else ""))
    if F3.shape[0] != X3.shape[0]:
        _fail(f"batch mismatch: F has B={F3.shape[0]}, X has B={X3.shape[0]}")
    return F3, X3


# ---------------------------------------------------------------------------------------------------------------
# conv geometry


@dataclass(frozen=True)
class ConvGeometry:
    """Conv input geometry normalised to 3 spatial dims (leading dummy dims have size 1, kernel 1, stride 1)."""

    d: int                        # number of real spatial dims (1, 2 or 3)
    N: int
    C: int
    groups: int
    spatial: tuple[int, int, int]
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    pad_lo: tuple[int, int, int]
    pad_hi: tuple[int, int, int]
    dilation: tuple[int, int, int]
    out: tuple[int, int, int]

    @property
    def Cg(self) -> int:
        """Input channels per group."""
        return self.C // self.groups

    @property
    def K(self) -> int:
        """Kernel offsets (the kernel's volume)."""
        return self.kernel[0] * self.kernel[1] * self.kernel[2]

    @property
    def T(self) -> int:
        """Output locations per example."""
        return self.out[0] * self.out[1] * self.out[2]

    @property
    def Dg(self) -> int:
        """Patch length per group: channels per group x kernel offsets."""
        return self.Cg * self.K

    def dp(self, ones: bool) -> int:
        """Factor width per group: the patch length, plus one for the homogeneous coordinate when ``ones``."""
        return self.Dg + int(bool(ones))


def _int_tuple(name: str, v: Sequence[int] | int, n: int, minimum: int, d: int) -> tuple[int, ...]:
    if isinstance(v, int):
        v = (v,) * n
    try:
        t = tuple(int(e) for e in v)
    except TypeError:
        _fail(f"{name} must be a sequence of {n} ints, got {v!r}")
    if len(t) != n:
        _fail(f"{name} must have {n} entries for x with {d} spatial dims, got {len(t)}: {v!r}"
              + (" (padding is (lo_0, hi_0, lo_1, hi_1, ...))" if name == "padding" else ""))
    if any(e < minimum for e in t):
        _fail(f"{name} entries must be >= {minimum}, got {t}")
    return t


def conv_geometry(x: Tensor, kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int) -> ConvGeometry:
    """Validate conv arguments against x (N, C, *S) and return the normalised geometry."""
    check_floating("x", x)
    if x.dim() not in (3, 4, 5):
        _fail(f"x must be (N, C, *S) with 1 to 3 spatial dims, got shape {tuple(x.shape)}")
    d = x.dim() - 2
    ks = _int_tuple("kernel_size", kernel_size, d, 1, d)
    st = _int_tuple("stride", stride, d, 1, d)
    pd = _int_tuple("padding", padding, 2 * d, 0, d)
    dl = _int_tuple("dilation", dilation, d, 1, d)
    N, C = int(x.shape[0]), int(x.shape[1])
    S = tuple(int(s) for s in x.shape[2:])
    if not isinstance(groups, int) or groups < 1:
        _fail(f"groups must be a positive int, got {groups!r}")
    if C % groups != 0:
        _fail(f"groups={groups} does not divide the number of input channels C={C}")
    out = []
    for i in range(d):
        span = dl[i] * (ks[i] - 1) + 1
        padded = S[i] + pd[2 * i] + pd[2 * i + 1]
        if padded < span:
            _fail(f"spatial dim {i}: padded size {padded} is smaller than the dilated kernel extent {span}")
        out.append((padded - span) // st[i] + 1)
    lead = 3 - d
    one = (1,) * lead
    zero = (0,) * lead
    return ConvGeometry(
        d=d, N=N, C=C, groups=groups, spatial=one + S, kernel=one + ks, stride=one + st,
        pad_lo=zero + tuple(pd[0::2]), pad_hi=zero + tuple(pd[1::2]), dilation=one + dl, out=one + tuple(out))


def check_patch_cov(F: Tensor, x: Tensor, geom: ConvGeometry, ones: bool) -> Tensor:
    """Validate the factor of a patch-covariance call; return it as (groups, Dg', Dg')."""
    check_floating("F", F, FACTOR_DTYPES)
    check_same_device(F=F, x=x)
    Dp = geom.dp(ones)
    want = (geom.groups, Dp, Dp)
    if F.dim() == 2 and geom.groups == 1:
        F3 = F.unsqueeze(0)
    elif F.dim() == 3:
        F3 = F
    else:
        _fail(f"F must be (groups, Dg', Dg') = {want}, got shape {tuple(F.shape)}")
    if tuple(F3.shape) != want:
        _fail(f"F has shape {tuple(F.shape)}, expected (groups, Dg', Dg') = {want} with Dg = (C/groups)*prod(kernel)"
              f" = {geom.Cg}*{geom.K} and ones={bool(ones)}")
    return F3


# ---------------------------------------------------------------------------------------------------------------
# preconditioners


def _batched(name: str, t: Tensor, rank: int, unbatched: bool) -> Tensor:
    want = rank - 1 if unbatched else rank
    if t.dim() != want:
        _fail(f"{name} must have {want} dims here (grad is {'unbatched' if unbatched else 'batched'}), "
              f"got shape {tuple(t.shape)}")
    return t.unsqueeze(0) if unbatched else t


def check_out(out: Tensor | None, grad: Tensor, unbatched: bool, B: int, DG: int, D: int) -> Tensor | None:
    """Validate a preconditioner's ``out`` (grad's shape, a float dtype, grad's device); return its batched view."""
    if out is None:
        return None
    check_floating("out", out)
    check_same_device(out=out, grad=grad)
    want = (DG, D) if unbatched else (B, DG, D)
    if tuple(out.shape) != want:
        _fail(f"out has shape {tuple(out.shape)}, expected {want} (the shape of grad)")
    return out.unsqueeze(0) if unbatched else out


def check_eigen(grad: Tensor, QG: Tensor, lG: Tensor, QA: Tensor, lA: Tensor,
                out: Tensor | None) -> tuple[bool, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Validate an eigenbasis preconditioner call; return (unbatched, batched views...)."""
    for n, t in (("grad", grad), ("QG", QG), ("lG", lG), ("QA", QA), ("lA", lA)):
        check_floating(n, t)
    check_same_device(grad=grad, QG=QG, lG=lG, QA=QA, lA=lA)
    if grad.dim() not in (2, 3):
        _fail(f"grad must be (I, D) or (B, I, D), got shape {tuple(grad.shape)}")
    ub = grad.dim() == 2
    g = grad.unsqueeze(0) if ub else grad
    QG3, lG2 = _batched("QG", QG, 3, ub), _batched("lG", lG, 2, ub)
    QA3, lA2 = _batched("QA", QA, 3, ub), _batched("lA", lA, 2, ub)
    B, DG, D = g.shape
    for n, t, orig, want in (("QG", QG3, QG, (B, DG, DG)), ("lG", lG2, lG, (B, DG)), ("QA", QA3, QA, (B, D, D)),
                             ("lA", lA2, lA, (B, D))):
        if tuple(t.shape) != want:
            _fail(f"{n} has shape {tuple(orig.shape)}, expected {want[1:] if ub else want} for grad of shape "
                  f"{tuple(grad.shape)}")
    return ub, g, QG3, lG2, QA3, lA2, check_out(out, grad, ub, B, DG, D)


def check_kron(grad: Tensor, Ginv: Tensor, Ainv: Tensor,
               out: Tensor | None) -> tuple[bool, Tensor, Tensor, Tensor, Tensor | None]:
    """Validate a factored-inverse preconditioner call; return (unbatched, batched views...)."""
    for n, t in (("grad", grad), ("Ginv", Ginv), ("Ainv", Ainv)):
        check_floating(n, t)
    check_same_device(grad=grad, Ginv=Ginv, Ainv=Ainv)
    if grad.dim() not in (2, 3):
        _fail(f"grad must be (I, D) or (B, I, D), got shape {tuple(grad.shape)}")
    ub = grad.dim() == 2
    g = grad.unsqueeze(0) if ub else grad
    G3, A3 = _batched("Ginv", Ginv, 3, ub), _batched("Ainv", Ainv, 3, ub)
    B, DG, D = g.shape
    for n, t, orig, want in (("Ginv", G3, Ginv, (B, DG, DG)), ("Ainv", A3, Ainv, (B, D, D))):
        if tuple(t.shape) != want:
            _fail(f"{n} has shape {tuple(orig.shape)}, expected {want[1:] if ub else want} for grad of shape "
                  f"{tuple(grad.shape)}")
    return ub, g, G3, A3, check_out(out, grad, ub, B, DG, D)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """fp64 if any input is fp64, else fp32: the dtype preconditioner intermediates are kept in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
