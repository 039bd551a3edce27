"""The linear algebra behind the inverse kinds (``inverses.py``).

Damped Cholesky inverses with the trace-norm π split, eigendecompositions, the singularity test without damping,
and silent Ω coordinates.

Everything works on factors stacked per group or per block, ``(B, d, d)``, in the factors' dtype (fp32, fp64 for
fp64 models); a failed fp32 Cholesky / eigh is retried in fp64 (inside :func:`counting_retries` each retry is
noted), and one that fails in fp64 too raises :class:`DecompositionError` (never a torch ``LinAlgError``).

Without damping (η = 0) the inverses are exact, so a singular factor raises :class:`SingularFactorError`. Cholesky
and eigh of a numerically singular matrix often *succeed* through rounding, so singularity is decided by the
eigenvalues (:func:`check_nonsingular`): a matrix M of size d, stored in a dtype with machine epsilon eps, is
singular when ``λ_min(M) ≤ d · eps · λ_max(M)`` (the rank criterion of ``numpy.linalg.matrix_rank``): below that
the smallest eigenvalue is indistinguishable from the rounding errors of M itself. Each matrix of a stack (each
group, each diagonal block) is tested on its own.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from contextvars import ContextVar

import torch

from kfc_compile.curvature import blocks as bl
from kfc_compile.curvature.blocks import Layout

SILENT_SHARE = 0.1  # restrict to the live block when at least this share of Ω's coordinates is silent
SILENT_MIN_DIM = 64  # ... and Ω is at least this wide (below, the gathers cost more than they save)


class SingularFactorError(RuntimeError):
    """An undamped (damping = weight_decay = 0) factor is singular, so its exact inverse does not exist."""


class DecompositionError(RuntimeError):
    """A damped factor's Cholesky / eigendecomposition failed in its own dtype and again in float64.

    ``what`` names the factor (``"factor Ω of layer 'fc'"``).
    """

    def __init__(self, message: str, what: str = "?"):
        super().__init__(message)
        self.what = what


_RETRIES: ContextVar[list[str] | None] = ContextVar("kfc_decomposition_retries", default=None)


@contextlib.contextmanager
def counting_retries() -> Iterator[list[str]]:
    """Inside the block, each fp32 decomposition that failed and was redone in fp64 appends its method to the list."""
    retries: list[str] = []
    token = _RETRIES.set(retries)
    try:
        yield retries
    finally:
        _RETRIES.reset(token)


def _note_retry(method: str) -> None:
    retries = _RETRIES.get()
    if retries is not None:
        retries.append(method)


def _fp64_failure(method: str, what: str, error: Exception | None = None) -> DecompositionError:
    detail = f": {error}" if error is not None else ""
    return DecompositionError(f"{method} of {what} failed in float64 too{detail}", what)


def pi_split(ta: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
    """π per group (trace norm) from the mean diagonals tr Ω / dim Ω and tr Γ / dim Γ, in float64.

    The value is sqrt(ta / tg); 1 where a trace is not positive. The ratio is formed in float64: with fp32 traces
    far apart (a Γ trace that is an fp32 subnormal, 3.5e-40, behind a BatchNorm whose γ starts at 0) ta / tg
    overflows fp32 although π itself, its square root, is representable.
    """
    ta, tg = ta.double(), tg.double()
    ok = (ta > 0) & (tg > 0)
    return torch.where(ok, (ta / torch.where(ok, tg, torch.ones_like(tg))).sqrt(), torch.ones_like(ta))


def _traces64(F: torch.Tensor, groups: int) -> torch.Tensor:
    """Trace per group of a stacked / blocked factor, summed in float64 (see :func:`blocks.group_traces`)."""
    return torch.diagonal(F, dim1=-2, dim2=-1).double().sum(-1).reshape(groups, -1).sum(-1)


def _split_damping(pi: torch.Tensor, s: float, dtype: torch.dtype, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(π√η, √η/π) per group in ``dtype``; a damping outside that dtype's range is a :class:`DecompositionError`."""
    ca, cg = (pi * s).to(dtype), (s / pi).to(dtype)
    both = torch.cat([ca, cg])
    if not bool(((both > 0) & (both < math.inf)).all()):  # finite and positive (NaN fails both), one host sync
        raise DecompositionError(
            f"the π split of layer {name!r}'s damping is outside the {dtype} range (π = {float(pi.max()):.3g}): "
            "the traces of its Ω and Γ are too far apart", f"factors of layer {name!r}")
    return ca, cg


def _rounding_floor(M: torch.Tensor) -> torch.Tensor:
    """dim·eps·(mean eigenvalue) per group: the least damping that keeps a PSD factor positive definite.

    That is, positive definite despite rounding, for a factor stored in M's dtype. It matters only when π puts a
    vanishing share of η on a factor whose scale is far from the other's (e.g. Γ's trace 1e14, Ω's 1e2): without it
    Cholesky fails on a rank-deficient Ω whose rounding errors are below π√η.
    """
    trace = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1).clamp_min(0)
    return (trace * torch.finfo(M.dtype).eps)[:, None, None]


def check_nonsingular(lam: torch.Tensor, what: str) -> None:
    """Raise :class:`SingularFactorError` if some matrix with eigenvalues ``lam`` (``(B, d)``) is singular.

    Singular means ``λ_min ≤ d · eps · λ_max`` with eps the machine epsilon of ``lam``'s dtype (see the module
    docstring).
    """
    tol = lam.amax(-1) * lam.shape[-1] * torch.finfo(lam.dtype).eps
    if bool((lam.amin(-1) <= tol).any()):
        raise SingularFactorError(f"{what} is singular (smallest eigenvalue at most dim·eps·largest); use "
                                  "damping > 0 or weight_decay > 0")


def _with_fp64_retry(op, M: torch.Tensor, what: str) -> tuple[torch.Tensor, ...]:
    """``torch.linalg.<op>(M)`` (eigvalsh or eigh) as a tuple of tensors in M's dtype.

    A failure or a non-finite result in fp32 is retried in fp64; in fp64 it is a :class:`DecompositionError`.
    """
    fn = getattr(torch.linalg, op)

    def run(X: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        out = fn(X)
        out = out if isinstance(out, tuple) else (out,)
        return out if all(bool(torch.isfinite(t).all()) for t in out) else None

    error = None
    try:
        out = run(M)
        if out is not None:
            return out
    except torch.linalg.LinAlgError as e:
        error = e
    if M.dtype == torch.float64:
        raise _fp64_failure(op, what, error)
    _note_retry(op)
    try:
        out = run(M.double())
    except torch.linalg.LinAlgError as e:
        raise _fp64_failure(op, what, e) from e
    if out is None:
        raise _fp64_failure(op, what)
    return tuple(t.to(M.dtype) for t in out)


def _eigvalsh(M: torch.Tensor, what: str = "a factor") -> torch.Tensor:
    """Eigenvalues of symmetric matrices in M's dtype; an fp32 failure is retried in fp64."""
    return _with_fp64_retry("eigvalsh", M, what)[0]


def _spd_inverse(M: torch.Tensor, what: str, exact: bool) -> torch.Tensor:
    """Inverse of a batch of SPD matrices by Cholesky; fp32 failures are retried in fp64.

    A failure in fp64 too is a singular factor when ``exact`` (no damping: :class:`SingularFactorError`), else a
    failed decomposition (:class:`DecompositionError`).
    """
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info == 0).all()):
        return torch.cholesky_inverse(L)
    if M.dtype != torch.float64:
        _note_retry("cholesky")
        L64, info = torch.linalg.cholesky_ex(M.double())
        if bool((info == 0).all()):
            return torch.cholesky_inverse(L64).to(M.dtype)
    if exact:
        raise SingularFactorError(
            f"{what} is singular (not positive definite even in float64); use damping > 0 or weight_decay > 0")
    raise DecompositionError(f"Cholesky of damped {what} failed in float64 too (not positive definite)", what)


def factored_inverses(A: torch.Tensor, G: torch.Tensor, eta: float, scale: float = 1.0, name: str = "?",
                      live: torch.Tensor | None = None,
                      layout: Layout | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Ω_d⁻¹, Γ_d⁻¹, Ω-side damping c) with Ω_d = scale·Ω + c I, c = π√η, Γ_d = Γ + √η/π I (KFC Eqs. 20–22).

    Args:
        A: Ω stacked per group, or per block with a blocked ``layout``.
        G: Γ, stacked likewise.
        eta: total identity weight (damping + weight decay); with η = 0 the exact inverses, and a singular
            factor (see :func:`check_nonsingular`) raises :class:`SingularFactorError`.
        scale: curvature scale applied to Ω before damping.
        name: the layer's name, for error messages.
        live: coordinates of Ω to invert (the others are silent: zero rows, so Ω_d is c there); π uses all of Ω.
        layout: blocked storage; one π per group, from the traces of all its blocks.

    Returns:
        The inverses, stacked like the inputs, and c per stacked Ω matrix ``(B, 1, 1)``.
    """
    A = A * scale if scale != 1.0 else A
    lay = layout or Layout(A.shape[0], A.shape[-1], G.shape[-1])
    if eta > 0:
        s = eta ** 0.5
        pi = pi_split(_traces64(A, lay.groups) / lay.a_dim, _traces64(G, lay.groups) / lay.g_dim)
        pa, pg = _split_damping(pi, s, A.dtype, name)
        if lay.a_blocks > 1:  # one π per group, repeated over its blocks
            pa = pa.repeat_interleave(lay.a_blocks)
        if lay.g_blocks > 1:
            pg = pg.repeat_interleave(lay.g_blocks)
        ca = torch.maximum(pa[:, None, None], _rounding_floor(A))
        cg = torch.maximum(pg[:, None, None], _rounding_floor(G))
    else:
        ca = torch.zeros(A.shape[0], 1, 1, dtype=A.dtype, device=A.device)
        cg = torch.zeros(G.shape[0], 1, 1, dtype=G.dtype, device=G.device)
    if live is not None:
        A = A.index_select(-1, live).index_select(-2, live)
    Ad = bl.pad_identity_(A + ca * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device), lay.a_blocks, lay.a_dim)
    Gd = bl.pad_identity_(G + cg * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device), lay.g_blocks, lay.g_dim)
    what_a, what_g = f"factor Ω of layer {name!r}", f"factor Γ of layer {name!r}"
    exact = eta <= 0
    if exact:
        check_nonsingular(_eigvalsh(Ad, what_a), what_a)
        check_nonsingular(_eigvalsh(Gd, what_g), what_g)
    # both Cholesky factorisations, then one host sync for both; a failure is redone (and retried) per factor
    (La, info_a), (Lg, info_g) = torch.linalg.cholesky_ex(Ad), torch.linalg.cholesky_ex(Gd)
    if bool((info_a == 0).all() & (info_g == 0).all()):
        return torch.cholesky_inverse(La), torch.cholesky_inverse(Lg), ca
    return _spd_inverse(Ad, what_a, exact), _spd_inverse(Gd, what_g, exact), ca


def _eigh(M: torch.Tensor, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors) of symmetric matrices in M's dtype; an fp32 failure is retried in fp64."""
    lam, Q = _with_fp64_retry("eigh", M, what)
    return lam, Q


def eigendecompose(A: torch.Tensor, G: torch.Tensor,
                   name: str = "?") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(QA, lA, QG, lG) of the symmetric factors, eigenvalues clamped at 0 (the factors are PSD).

    Raises:
        DecompositionError: eigh failed in float64 too (``name`` is the layer's, for the message).
    """
    lA, QA = _eigh(A, f"factor Ω of layer {name!r}")
    lG, QG = _eigh(G, f"factor Γ of layer {name!r}")
    return QA, lA.clamp_min(0), QG, lG.clamp_min(0)


def spectrum_summary(M: torch.Tensor) -> str:
    """``"trace …, smallest eigenvalue …"`` of the worst matrix of a stack (for error messages; fp64, never raises)."""
    M = M.detach().double().cpu()
    trace = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1)
    try:
        lam = torch.linalg.eigvalsh(M).amin(-1)
        i = int(torch.nan_to_num(lam, nan=-float("inf")).argmin())
        smallest = f"{float(lam[i]):.6g}"
    except (torch.linalg.LinAlgError, RuntimeError):
        i, smallest = 0, "not computable"
    return f"trace {float(trace[i]):.6g}, smallest eigenvalue {smallest}"


def check_eigen_invertible(lA: torch.Tensor, lG: torch.Tensor, name: str) -> None:
    """With η = 0 the exact damping needs every eigenvalue product to be positive: both factors nonsingular."""
    check_nonsingular(lA, f"factor Ω of layer {name!r}")
    check_nonsingular(lG, f"factor Γ of layer {name!r}")


def live_coordinates(A: torch.Tensor) -> torch.Tensor | None:
    """Indices of Ω's coordinates with a positive diagonal in some group, or None.

    None when too few are silent (less than ``SILENT_SHARE`` of them, or Ω narrower than ``SILENT_MIN_DIM``) or
    none is live.
    """
    d = A.shape[-1]
    if d < SILENT_MIN_DIM:
        return None
    live = (torch.diagonal(A, dim1=-2, dim2=-1) > 0).any(0)
    n = int(live.sum())
    if n > (1.0 - SILENT_SHARE) * d or n == 0:
        return None
    return live.nonzero().squeeze(-1)


def silent_split(A: torch.Tensor, eta: float, name: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(live, silent) coordinate indices of Ω, or (None, None).

    The indices are given when the inverse is restricted to its live block (see :func:`live_coordinates`). Silent
    coordinates make Ω singular: without damping they raise :class:`SingularFactorError`.
    """
    live = live_coordinates(A)
    if live is None:
        return None, None
    if eta <= 0:
        raise SingularFactorError(f"factor Ω of layer {name!r} is singular ({A.shape[-1] - live.numel()} "
                                  "coordinates never see a nonzero input); use damping > 0 or weight_decay > 0")
    mask = torch.ones(A.shape[-1], dtype=torch.bool, device=A.device)
    mask[live] = False
    return live, mask.nonzero().squeeze(-1)
