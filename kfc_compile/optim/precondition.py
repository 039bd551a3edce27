"""Per-layer preconditioning: damped factor inverses / eigendecompositions and Γ⁻¹ [∇W | ∇b] Ω⁻¹.

Conventions (kfc_spec.md §5, design.md §3):

* A layer's gradient matrix is ``[∇W | ∇b]`` per group, ``(groups, g_dim, a_dim)``, bias column last; for a
  grouped conv, group g is output rows ``g·Cout/groups .. (g+1)·Cout/groups`` of ``weight.flatten(1)``.
* ``kron(Γ, Ω)`` (factors in the paper's scaling) is the Fisher block of the *per-example* loss. The objective h
  being preconditioned may be a sum over N examples; its curvature is then ``scale · kron(Γ, Ω)`` with
  ``scale = N`` (``scale = 1`` for a batch mean). The scale is applied to Ω before damping.
* ``eta`` is the total identity weight: damping + weight decay.

Two damping methods:

* ``"factored"`` (KFC Eqs. 20–22): ``(scale·Ω + π√η I) ⊗ (Γ + √η/π I)`` with the trace-norm split
  π = sqrt((tr(scale·Ω)/dim Ω) / (tr Γ/dim Γ)), per group; inverses by Cholesky.
* ``"eigen"`` (KFC-S App. B.2, Eqs. 33–38): ``(scale·kron(Γ, Ω) + η I)⁻¹`` exactly, via the eigendecompositions
  of Ω and Γ; the eigenvalue products and η meet inside the kernel.

Silent inputs: a coordinate of Ω whose diagonal is exactly 0 in every group (a kernel offset that only ever reads
zero padding, e.g. a 3×3 conv on a 1×1 feature map, or an input feature that is always 0) has an all-zero row and
column, so the damped curvature is block diagonal there. Where such coordinates are at least
``SILENT_SHARE`` of Ω, the inverse / eigendecomposition is computed on the live block only and the silent
columns of the update are the damped identity's (``Γ_d⁻¹ g / (π√η)`` factored, ``g / η`` eigen); the result is the
same, and on resnet18 at 32×32 the 4609-wide factors of layer4 shrink to 513.

Block-diagonal factors (``KFC(max_factor_dim=m)``, curvature/blocks.py): a layer whose Ω or Γ is wider than m
stores it as diagonal blocks; its inverses are per block (π from the whole group's traces), silent coordinates are
not looked for, and its update is applied block by block in torch (its own bucket).

Everything is computed in the factors' dtype (fp32, fp64 for fp64 models); a failed fp32 Cholesky / eigh is
retried in fp64. With η = 0 the inverses are exact and a singular factor raises :class:`SingularFactorError`.
The products themselves go through ``triton_kernels`` (``kron_precondition`` / ``eigen_precondition``), with all
same-shape groups of all layers stacked into one batched call.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import astuple, dataclass, field

import torch

import triton_kernels as tk
from kfc_compile.curvature import blocks as bl
from kfc_compile.curvature.blocks import Layout
from kfc_compile.registry import KFCLayer

DAMPING_METHODS = ("factored", "eigen")
SILENT_SHARE = 0.1  # restrict to the live block when at least this share of Ω's coordinates is silent
SILENT_MIN_DIM = 64  # ... and Ω is at least this wide (below, the gathers cost more than they save)


class SingularFactorError(RuntimeError):
    """An undamped (damping = weight_decay = 0) factor is singular, so its exact inverse does not exist."""


# -- gradient matrices -------------------------------------------------------------------------------------------

def grad_matrix(layer: KFCLayer, weight_decay: float = 0.0, grads: tuple | None = None) -> torch.Tensor | None:
    """``[∇W + wd·W | ∇b + wd·b]`` per group, ``(groups, g_dim, a_dim)``; None if the layer has no gradient.

    ``grads`` overrides ``(weight.grad, bias.grad)``. A missing bias gradient (while the weight has one) is zero.
    """
    W, b = layer.weight, layer.bias
    gW, gb = grads if grads is not None else (W.grad, None if b is None else b.grad)
    if gW is None and gb is None:
        return None
    if gW is None:
        gW = torch.zeros_like(W)
    gW = gW.reshape(layer.groups, layer.g_dim, -1)
    if weight_decay:
        gW = gW + weight_decay * W.detach().reshape(layer.groups, layer.g_dim, -1)
    if b is None:
        return gW
    if gb is None:
        gb = torch.zeros_like(b)
    gb = gb.reshape(layer.groups, layer.g_dim, 1)
    if weight_decay:
        gb = gb + weight_decay * b.detach().reshape(layer.groups, layer.g_dim, 1)
    return torch.cat([gW.to(torch.promote_types(gW.dtype, gb.dtype)), gb.to(gW.dtype)], dim=-1)


def split_matrix(layer: KFCLayer, U: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Inverse of :func:`grad_matrix`'s layout: (update of W, update of b or None)."""
    a_in = layer.a_dim - (layer.bias is not None)
    dW = U[..., :a_in].reshape(layer.weight.shape)
    db = U[..., a_in].reshape(layer.bias.shape) if layer.bias is not None else None
    return dW, db


# -- damped inverses ---------------------------------------------------------------------------------------------

def pi_split(ta: torch.Tensor, tg: torch.Tensor) -> torch.Tensor:
    """π per group (trace norm) from the mean diagonals tr Ω / dim Ω and tr Γ / dim Γ: sqrt(ta / tg); 1 where
    a trace is not positive."""
    ok = (ta > 0) & (tg > 0)
    return torch.where(ok, (ta / torch.where(ok, tg, torch.ones_like(tg))).clamp_min(0).sqrt(), torch.ones_like(ta))


def _rounding_floor(M: torch.Tensor) -> torch.Tensor:
    """dim·eps·(mean eigenvalue) per group: the least damping that keeps a PSD factor stored in M's dtype
    positive definite despite rounding. It matters only when π puts a vanishing share of η on a factor whose
    scale is far from the other's (e.g. Γ's trace 1e14, Ω's 1e2): without it Cholesky fails on a rank-deficient
    Ω whose rounding errors are below π√η."""
    trace = torch.diagonal(M, dim1=-2, dim2=-1).sum(-1).clamp_min(0)
    return (trace * torch.finfo(M.dtype).eps)[:, None, None]


def _spd_inverse(M: torch.Tensor, what: str) -> torch.Tensor:
    """Inverse of a batch of SPD matrices by Cholesky; fp32 failures are retried in fp64."""
    L, info = torch.linalg.cholesky_ex(M)
    if not bool((info == 0).all()):
        if M.dtype != torch.float64:
            L64, info = torch.linalg.cholesky_ex(M.double())
            if bool((info == 0).all()):
                return torch.cholesky_inverse(L64).to(M.dtype)
        raise SingularFactorError(
            f"{what} is singular (not positive definite even in float64); use damping > 0 or weight_decay > 0")
    return torch.cholesky_inverse(L)


def factored_inverses(A: torch.Tensor, G: torch.Tensor, eta: float, scale: float = 1.0, name: str = "?",
                      live: torch.Tensor | None = None,
                      layout: Layout | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(Ω_d⁻¹, Γ_d⁻¹, Ω-side damping c) with Ω_d = scale·Ω + c I, c = π√η, Γ_d = Γ + √η/π I (stacked per group,
    or per block with a blocked ``layout``: one π per group, from the traces of all its blocks).

    ``live``: coordinates of Ω to invert (the others are silent: zero rows, so Ω_d is c there); π uses all of Ω."""
    A = A * scale if scale != 1.0 else A
    lay = layout or Layout(A.shape[0], A.shape[-1], G.shape[-1])
    if eta > 0:
        s = eta ** 0.5
        pi = pi_split(bl.group_traces(A, lay.groups) / lay.a_dim, bl.group_traces(G, lay.groups) / lay.g_dim)
        ca = torch.maximum((pi * s).repeat_interleave(lay.a_blocks)[:, None, None], _rounding_floor(A))
        cg = torch.maximum((s / pi).repeat_interleave(lay.g_blocks)[:, None, None], _rounding_floor(G))
    else:
        ca = torch.zeros(A.shape[0], 1, 1, dtype=A.dtype, device=A.device)
        cg = torch.zeros(G.shape[0], 1, 1, dtype=G.dtype, device=G.device)
    if live is not None:
        A = A.index_select(-1, live).index_select(-2, live)
    Ad = bl.pad_identity_(A + ca * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device), lay.a_blocks, lay.a_dim)
    Gd = bl.pad_identity_(G + cg * torch.eye(G.shape[-1], dtype=G.dtype, device=G.device), lay.g_blocks, lay.g_dim)
    return (_spd_inverse(Ad, f"factor Ω of layer {name!r}"), _spd_inverse(Gd, f"factor Γ of layer {name!r}"), ca)


def live_coordinates(A: torch.Tensor) -> torch.Tensor | None:
    """Indices of Ω's coordinates with a positive diagonal in some group, or None when too few are silent."""
    d = A.shape[-1]
    if d < SILENT_MIN_DIM:
        return None
    live = (torch.diagonal(A, dim1=-2, dim2=-1) > 0).any(0)
    n = int(live.sum())
    if n > (1.0 - SILENT_SHARE) * d or n == 0:
        return None
    return live.nonzero().squeeze(-1)


def _eigh(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        lam, Q = torch.linalg.eigh(M)
        if bool(torch.isfinite(lam).all()) and bool(torch.isfinite(Q).all()):
            return lam, Q
    except torch.linalg.LinAlgError:
        if M.dtype == torch.float64:
            raise
    lam, Q = torch.linalg.eigh(M.double())
    return lam.to(M.dtype), Q.to(M.dtype)


def eigendecompose(A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(QA, lA, QG, lG) of the symmetric factors, eigenvalues clamped at 0 (the factors are PSD)."""
    lA, QA = _eigh(A)
    lG, QG = _eigh(G)
    return QA, lA.clamp_min(0), QG, lG.clamp_min(0)


def check_eigen_invertible(lA: torch.Tensor, lG: torch.Tensor, name: str) -> None:
    """With η = 0 the exact damping needs every eigenvalue product to be positive."""
    for lam, what in ((lA, "Ω"), (lG, "Γ")):
        tol = lam.amax(-1) * lam.shape[-1] * torch.finfo(lam.dtype).eps
        if bool((lam.amin(-1) <= tol).any()):
            raise SingularFactorError(f"factor {what} of layer {name!r} is singular; use damping > 0 or "
                                      "weight_decay > 0")


# -- per-layer curvature state -----------------------------------------------------------------------------------

@dataclass(eq=False)
class LayerInverse:
    """What the preconditioner applies for one layer, and the (η, scale) it was built for."""

    method: str
    tensors: dict[str, torch.Tensor]  # factored: Ainv, Ginv; eigen: QA, lA, QG, lG
    eta: float
    scale: float
    layout: Layout | None = None  # blocked factors (per-block tensors); None: dense

    def state(self) -> dict:
        return {"method": self.method, "eta": self.eta, "scale": self.scale,
                "tensors": {k: v.clone() for k, v in self.tensors.items()},
                "layout": None if self.layout is None else astuple(self.layout)}

    @classmethod
    def from_state(cls, s: dict, device: torch.device) -> "LayerInverse":
        layout = s.get("layout")
        return cls(s["method"], {k: v.to(device) for k, v in s["tensors"].items()}, float(s["eta"]),
                   float(s["scale"]), None if layout is None else Layout(*layout))


def compute_inverse(method: str, A: torch.Tensor, G: torch.Tensor, eta: float, scale: float,
                    name: str, layout: Layout | None = None) -> LayerInverse:
    """The damped inverses (``"factored"``) or eigendecompositions (``"eigen"``) of one layer's factors, stored
    as ``layout`` says (dense when None or unblocked)."""
    if layout is not None and layout.blocked:
        return _blocked_inverse(method, A, G, eta, scale, name, layout)
    live = live_coordinates(A)
    if live is not None and eta <= 0:
        raise SingularFactorError(f"factor Ω of layer {name!r} is singular ({A.shape[-1] - live.numel()} "
                                  "coordinates never see a nonzero input); use damping > 0 or weight_decay > 0")
    extra = {}
    if live is not None:
        mask = torch.ones(A.shape[-1], dtype=torch.bool, device=A.device)
        mask[live] = False
        extra = {"live": live, "silent": mask.nonzero().squeeze(-1)}
    if method == "factored":
        Ainv, Ginv, ca = factored_inverses(A, G, eta, scale, name, live)
        if live is not None:
            extra["silent_scale"] = 1.0 / ca  # Ω_d⁻¹ on the silent coordinates, per group
        return LayerInverse(method, {"Ainv": Ainv, "Ginv": Ginv, **extra}, eta, scale)
    if live is not None:
        A = A.index_select(-1, live).index_select(-2, live)
    QA, lA, QG, lG = eigendecompose(A, G)
    if eta <= 0:
        check_eigen_invertible(lA, lG, name)
    return LayerInverse(method, {"QA": QA, "lA": lA, "QG": QG, "lG": lG, **extra}, eta, scale)


def _blocked_inverse(method: str, A: torch.Tensor, G: torch.Tensor, eta: float, scale: float, name: str,
                     layout: Layout) -> LayerInverse:
    if method == "factored":
        Ainv, Ginv, _ = factored_inverses(A, G, eta, scale, name, layout=layout)
        return LayerInverse(method, {"Ainv": Ainv, "Ginv": Ginv}, eta, scale, layout)
    A = bl.pad_identity_(A.clone(), layout.a_blocks, layout.a_dim)
    G = bl.pad_identity_(G.clone(), layout.g_blocks, layout.g_dim)
    QA, lA, QG, lG = eigendecompose(A, G)
    if eta <= 0:
        check_eigen_invertible(lA, lG, name)
    return LayerInverse(method, {"QA": QA, "lA": lA, "QG": QG, "lG": lG}, eta, scale, layout)


def rescale_inverse(inv: LayerInverse, eta: float, scale: float, A: torch.Tensor, G: torch.Tensor,
                    name: str) -> LayerInverse:
    """The inverse for a new (η, scale) from the same factors: free for eigen, a new Cholesky for factored."""
    if inv.method == "eigen":
        if eta <= 0:
            check_eigen_invertible(inv.tensors["lA"], inv.tensors["lG"], name)
        return LayerInverse("eigen", inv.tensors, eta, scale, inv.layout)
    return compute_inverse("factored", A, G, eta, scale, name, inv.layout)


@dataclass(eq=False)
class _Bucket:
    """Same-shape groups of several layers, applied in one batched kernel call."""

    members: list[int]  # layer indices
    counts: list[int]  # groups per member
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # stacked over all members' groups
    eta: float = 0.0
    layout: Layout | None = None  # a blocked layer's own bucket


def build_buckets(inverses: dict[int, LayerInverse]) -> list[_Bucket]:
    """Stack the inverses of layers with the same (method, shapes, dtype, device)."""
    keyed: dict[tuple, list[int]] = defaultdict(list)
    for i, inv in inverses.items():
        t = inv.tensors
        ref = t["Ainv"] if inv.method == "factored" else t["QA"]
        other = t["Ginv"] if inv.method == "factored" else t["QG"]
        # live-block and blocked layers are applied one by one (their own gathers / block products)
        own = i if "live" in t or inv.layout is not None else None
        keyed[(inv.method, ref.shape[-1], other.shape[-1], ref.dtype, str(ref.device), inv.eta, own)].append(i)
    buckets = []
    for (method, *_rest, eta, own), members in keyed.items():
        invs = [inverses[i] for i in members]
        b = _Bucket(members, [v.layout.groups if v.layout is not None else next(iter(v.tensors.values())).shape[0]
                              for v in invs], eta=eta)
        if own is not None:
            (v,) = invs
            b.tensors, b.layout = dict(v.tensors), v.layout
            if method == "eigen":
                b.tensors["lA"] = v.tensors["lA"] * v.scale
        elif method == "factored":
            b.tensors = {"Ainv": torch.cat([v.tensors["Ainv"] for v in invs]),
                         "Ginv": torch.cat([v.tensors["Ginv"] for v in invs])}
        else:
            b.tensors = {"QA": torch.cat([v.tensors["QA"] for v in invs]),
                         "lA": torch.cat([v.tensors["lA"] * v.scale for v in invs]),
                         "QG": torch.cat([v.tensors["QG"] for v in invs]),
                         "lG": torch.cat([v.tensors["lG"] for v in invs])}
        buckets.append(b)
    return buckets


def apply_buckets(buckets: list[_Bucket], mats: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Preconditioned matrices for every layer in ``mats`` (layer index → (groups, g, a)); one kernel call per
    bucket whose members all have a gradient, per-layer calls otherwise."""
    out: dict[int, torch.Tensor] = {}
    for b in buckets:
        present = [i for i in b.members if i in mats]
        if not present:
            continue
        t = b.tensors
        dtype = (t["Ainv"] if "Ainv" in t else t["QA"]).dtype
        if len(present) == len(b.members):
            g = torch.cat([mats[i].to(dtype) for i in b.members]) if len(b.members) > 1 else mats[b.members[0]].to(dtype)
            U = _apply(t, g, b.eta, b.layout)
            for i, part in zip(b.members, torch.split(U, b.counts)):
                out[i] = part
            continue
        offsets = [0]
        for c in b.counts:
            offsets.append(offsets[-1] + c)
        for pos, i in enumerate(b.members):
            if i in mats:
                sl = slice(offsets[pos], offsets[pos + 1])
                out[i] = _apply({k: v[sl] for k, v in t.items()}, mats[i].to(dtype), b.eta, b.layout)
    return out


def _apply(t: dict[str, torch.Tensor], g: torch.Tensor, eta: float, layout: Layout | None = None) -> torch.Tensor:
    if layout is not None:
        return _apply_blocked(t, g, eta, layout)
    live = t.get("live")
    if live is not None:  # silent coordinates: the damped identity there, the live block's inverse elsewhere
        out = torch.zeros_like(g)
        silent = t["silent"]
        gs = g.index_select(-1, silent)
        if bool(gs.any()):  # their gradient is exactly 0 unless weight decay pulls on those weights
            out[..., silent] = torch.matmul(t["Ginv"], gs) * t["silent_scale"] if "Ainv" in t else gs / eta
        inner = {k: v for k, v in t.items() if k not in ("live", "silent", "silent_scale")}
        out[..., live] = _apply(inner, g.index_select(-1, live), eta)
        return out
    if "Ainv" in t:
        return tk.kron_precondition(g, t["Ginv"], t["Ainv"])
    return tk.eigen_precondition(g, t["QG"], t["lG"], t["QA"], t["lA"], eta)


def _apply_blocked(t: dict[str, torch.Tensor], g: torch.Tensor, eta: float, lay: Layout) -> torch.Tensor:
    """Γ⁻¹ G Ω⁻¹ (or the eigen-damped solve) with block-diagonal factors: the gradient matrix, zero-padded to whole
    blocks, as (groups, Γ block i, row, Ω block j, column); each (i, j) tile meets only blocks i and j."""
    ga, gg = g.shape[-1], g.shape[-2]
    ka, kg = lay.a_blocks, lay.g_blocks
    first = t["Ainv"] if "Ainv" in t else t["QA"]
    ba, bg = first.shape[-1], (t["Ginv"] if "Ginv" in t else t["QG"]).shape[-1]
    n = lay.groups
    M = torch.nn.functional.pad(g, (0, ka * ba - ga, 0, kg * bg - gg)).reshape(n, kg, bg, ka, ba)
    if "Ainv" in t:
        U = torch.einsum("nicd,nidjb->nicjb", t["Ginv"].reshape(n, kg, bg, bg), M)
        U = torch.einsum("nicjb,njbe->nicje", U, t["Ainv"].reshape(n, ka, ba, ba))
    else:
        QG, QA = t["QG"].reshape(n, kg, bg, bg), t["QA"].reshape(n, ka, ba, ba)
        V = torch.einsum("nidc,nidjb->nicjb", QG, M)
        V = torch.einsum("nicjb,njbe->nicje", V, QA)
        V = V / (t["lG"].reshape(n, kg, bg)[:, :, :, None, None] * t["lA"].reshape(n, ka, ba)[:, None, None] + eta)
        U = torch.einsum("nicd,nidjb->nicjb", QG, V)
        U = torch.einsum("nicjb,njeb->nicje", U, QA)
    return U.reshape(n, kg * bg, ka * ba)[:, :gg, :ga]


def precondition_layer(inv: LayerInverse, mat: torch.Tensor) -> torch.Tensor:
    """One layer's Γ⁻¹ G Ω⁻¹ (or the exact eigen-damped solve), ``(groups, g, a)``."""
    t = dict(inv.tensors)
    if inv.method == "eigen" and inv.scale != 1.0:
        t["lA"] = t["lA"] * inv.scale
    return _apply(t, mat.to((t["Ainv"] if "Ainv" in t else t["QA"]).dtype), inv.eta, inv.layout)
