"""Inverse kinds: what the preconditioner applies for one layer, one class per damping method.

Conventions (docs/algorithm.md §5, docs/architecture.md):

* A layer's gradient matrix is ``[∇W | ∇b]`` per group, ``(groups, g_dim, a_dim)``, bias column last
  (``precondition.grad_matrix``).
* ``kron(Γ, Ω)`` (factors in the paper's scaling) is the Fisher block of the *per-example* loss. The objective h
  being preconditioned may be a sum over N examples; its curvature is then ``scale · kron(Γ, Ω)`` with
  ``scale = N`` (``scale = 1`` for a batch mean). The scale is applied to Ω before damping.
* ``eta`` is the total identity weight: damping + weight decay.

The damping methods (public strings in :data:`INVERSES`):

* ``"factored"`` (:class:`FactoredInverse`, KFC Eqs. 20–22): ``(scale·Ω + π√η I) ⊗ (Γ + √η/π I)`` with the
  trace-norm split π = sqrt((tr(scale·Ω)/dim Ω) / (tr Γ/dim Γ)), per group; inverses by Cholesky.
* ``"eigen"`` (:class:`EigenInverse`, KFC-S App. B.2, Eqs. 33–38): ``(scale·kron(Γ, Ω) + η I)⁻¹`` exactly, via
  the eigendecompositions of Ω and Γ; the eigenvalue products and η meet inside the kernel.

Silent inputs: a coordinate of Ω whose diagonal is exactly 0 in every group (a kernel offset that only ever reads
zero padding, e.g. a 3×3 conv on a 1×1 feature map, or an input feature that is always 0) has an all-zero row and
column, so the damped curvature is block diagonal there. Where such coordinates are at least
``decompositions.SILENT_SHARE`` of Ω, the inverse / eigendecomposition is computed on the live block only
(``live``) and the silent columns of the update are the damped identity's (``Γ_d⁻¹ g / (π√η)`` factored,
``g / η`` eigen); the result is the same, and on resnet18 at 32×32 the 4609-wide factors of layer4 shrink to 513.

Block-diagonal factors (``KFC(max_factor_dim=m)``, ``blocks.py``): a layer whose Ω or Γ is wider than m stores
it as diagonal blocks (``layout``); its inverses are per block (π from the whole group's traces), silent
coordinates are not looked for, and its update is applied block by block in torch (its own bucket).

Without damping the inverses are exact and a singular factor raises ``SingularFactorError`` (the criterion is in
``decompositions.py``). The products themselves go through ``triton_kernels`` (``kron_precondition`` /
``eigen_precondition``); ``precondition.py`` stacks the same-shape groups of several layers into one call.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import astuple, dataclass, replace
from typing import ClassVar

import torch

import triton_kernels as tk
from kfc_compile.curvature import blocks as bl
from kfc_compile.curvature.blocks import Layout
from kfc_compile.curvature.decompositions import check_eigen_invertible, eigendecompose, factored_inverses, silent_split


@dataclass(eq=False, kw_only=True)
class LayerInverse(ABC):
    """One layer's inverse curvature for the (η, scale) it was built for, stored as ``layout`` says.

    ``live``/``silent``: Ω's coordinate indices when the inverse covers the live block only (dense layouts).
    """

    method: ClassVar[str]  # the public damping-method string
    state_tensors: ClassVar[tuple[str, ...]]  # tensor attributes saved by state(), in the saved order

    eta: float
    scale: float
    layout: Layout | None = None  # blocked factors (per-block tensors); None: dense
    live: torch.Tensor | None = None
    silent: torch.Tensor | None = None

    @classmethod
    @abstractmethod
    def compute(cls, A: torch.Tensor, G: torch.Tensor, eta: float, scale: float, name: str,
                layout: Layout | None = None) -> LayerInverse:
        """The inverse of one layer's factors (stacked per group, or per block with a blocked ``layout``)."""

    @abstractmethod
    def rescale(self, eta: float, scale: float, A: torch.Tensor, G: torch.Tensor, name: str) -> LayerInverse:
        """The inverse for a new (η, scale) from the same factors ``A``, ``G``."""

    @abstractmethod
    def folded(self) -> LayerInverse:
        """The same inverse with ``scale`` folded into its tensors (``scale`` 1), ready for :meth:`solve`."""

    @classmethod
    @abstractmethod
    def concatenate(cls, inverses: list[LayerInverse]) -> LayerInverse:
        """Dense inverses of equal :attr:`bucket_key` as one, their groups stacked in order, scales folded."""

    @abstractmethod
    def part(self, rows: slice) -> LayerInverse:
        """The inverse of the stacked groups ``rows`` of a dense inverse without silent coordinates."""

    @property
    @abstractmethod
    def sides(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The stacked Ω-side and Γ-side matrices (inverses or eigenbases)."""

    @abstractmethod
    def _kernel(self, g: torch.Tensor) -> torch.Tensor:
        """The dense product on stacked gradient matrices ``g`` (folded inverse, g in :attr:`dtype`)."""

    @abstractmethod
    def _silent_update(self, gs: torch.Tensor) -> torch.Tensor:
        """The update of the silent columns ``gs`` of the gradient matrices (the damped identity's)."""

    @abstractmethod
    def _block_product(self, M: torch.Tensor) -> torch.Tensor:
        """The blocked product on M ``(groups, Γ block i, row, Ω block j, column)``, same shape."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the inverse is stored and applied in (the factors')."""
        return self.sides[0].dtype

    @property
    def groups(self) -> int:
        """Groups of the layer (stacked matrices of a dense inverse)."""
        return self.layout.groups if self.layout is not None else self.sides[0].shape[0]

    @property
    def bucket_key(self) -> tuple | None:
        """Inverses with equal keys are applied in one batched kernel call; None: this one is applied alone.

        Live-block and blocked layers have their own gathers / block products, so they are applied alone.
        """
        if self.live is not None or self.layout is not None:
            return None
        a, g = self.sides
        return self.method, a.shape[-1], g.shape[-1], a.dtype, str(a.device), self.eta

    def apply(self, mat: torch.Tensor) -> torch.Tensor:
        """One layer's Γ⁻¹ G Ω⁻¹ (or the exact eigen-damped solve) on its gradient matrix ``(groups, g, a)``."""
        return self.folded().solve(mat.to(self.dtype))

    def solve(self, g: torch.Tensor) -> torch.Tensor:
        """The preconditioned matrices for stacked gradient matrices ``g`` (a folded inverse; g in its dtype)."""
        if self.layout is not None:
            return self._solve_blocked(g)
        if self.live is None:
            return self._kernel(g)
        out = torch.zeros_like(g)  # silent coordinates: the damped identity there, the live block's inverse elsewhere
        gs = g.index_select(-1, self.silent)
        if bool(gs.any()):  # their gradient is exactly 0 unless weight decay pulls on those weights
            out[..., self.silent] = self._silent_update(gs)
        out[..., self.live] = self._kernel(g.index_select(-1, self.live))
        return out

    def _solve_blocked(self, g: torch.Tensor) -> torch.Tensor:
        """With block-diagonal factors: the gradient matrix, zero-padded to whole blocks, as tiles.

        The shape is (groups, Γ block i, row, Ω block j, column); each (i, j) tile meets only blocks i and j.
        """
        lay = self.layout
        ga, gg = g.shape[-1], g.shape[-2]
        ba, bg = self.sides[0].shape[-1], self.sides[1].shape[-1]
        M = torch.nn.functional.pad(g, (0, lay.a_blocks * ba - ga, 0, lay.g_blocks * bg - gg))
        U = self._block_product(M.reshape(lay.groups, lay.g_blocks, bg, lay.a_blocks, ba))
        return U.reshape(lay.groups, lay.g_blocks * bg, lay.a_blocks * ba)[:, :gg, :ga]

    def tensors(self) -> list[torch.Tensor]:
        """The tensors this inverse holds (memory accounting)."""
        return [t for t in (getattr(self, k) for k in self.state_tensors) if t is not None]

    def state(self) -> dict:
        """A checkpoint entry: ``{"method", "eta", "scale", "tensors": {name: tensor}, "layout": tuple | None}``."""
        tensors = {k: getattr(self, k) for k in self.state_tensors}
        return {"method": self.method, "eta": self.eta, "scale": self.scale,
                "tensors": {k: v.clone() for k, v in tensors.items() if v is not None},
                "layout": None if self.layout is None else astuple(self.layout)}

    @classmethod
    def from_state(cls, s: dict, device: torch.device, dtype: torch.dtype | None = None) -> LayerInverse:
        """The inverse saved by :meth:`state` (of any kind: its ``"method"`` decides), on ``device``.

        ``dtype`` (optional) casts its floating-point tensors (the index tensors stay integer).
        """
        layout = s.get("layout")

        def put(v: torch.Tensor) -> torch.Tensor:
            return v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)

        return inverse_kind(s["method"])(eta=float(s["eta"]), scale=float(s["scale"]),
                                         layout=None if layout is None else Layout(*layout),
                                         **{k: put(v) for k, v in s["tensors"].items()})

    @classmethod
    @abstractmethod
    def identity(cls, layout: Layout, eta: float, scale: float, dtype: torch.dtype,
                 device: torch.device) -> LayerInverse:
        """The damped identity's inverse (zero factors: F̂ = η I, so the update is ∇h / η), built without decompositions.

        It stands in for a layer whose first decomposition failed.
        """


@dataclass(eq=False, kw_only=True)
class FactoredInverse(LayerInverse):
    """Ω_d⁻¹ and Γ_d⁻¹ of the factored damping (``scale`` is inside Ainv)."""

    method: ClassVar[str] = "factored"
    state_tensors: ClassVar[tuple[str, ...]] = ("Ainv", "Ginv", "live", "silent", "silent_scale")

    Ainv: torch.Tensor
    Ginv: torch.Tensor
    silent_scale: torch.Tensor | None = None  # Ω_d⁻¹ on the silent coordinates, per group (groups, 1, 1)

    @classmethod
    def compute(cls, A: torch.Tensor, G: torch.Tensor, eta: float, scale: float, name: str,
                layout: Layout | None = None) -> FactoredInverse:
        """Cholesky inverses of the damped factors (on Ω's live block when enough coordinates are silent)."""
        if layout is not None and layout.blocked:
            Ainv, Ginv, _ = factored_inverses(A, G, eta, scale, name, layout=layout)
            return cls(eta=eta, scale=scale, layout=layout, Ainv=Ainv, Ginv=Ginv)
        live, silent = silent_split(A, eta, name)
        Ainv, Ginv, ca = factored_inverses(A, G, eta, scale, name, live)
        return cls(eta=eta, scale=scale, live=live, silent=silent, Ainv=Ainv, Ginv=Ginv,
                   silent_scale=None if live is None else 1.0 / ca)

    @classmethod
    def identity(cls, layout: Layout, eta: float, scale: float, dtype: torch.dtype,
                 device: torch.device) -> FactoredInverse:
        """Ω_d = Γ_d = √η I (π = 1 for zero traces): Ω_d⁻¹ = Γ_d⁻¹ = I / √η."""
        (na, ba, _), (ng, bg, _) = layout.shapes()
        c = 1.0 / eta ** 0.5
        Ainv = (c * torch.eye(ba, dtype=dtype, device=device)).expand(na, ba, ba).clone()
        Ginv = (c * torch.eye(bg, dtype=dtype, device=device)).expand(ng, bg, bg).clone()
        return cls(eta=eta, scale=scale, layout=layout if layout.blocked else None, Ainv=Ainv, Ginv=Ginv)

    def rescale(self, eta: float, scale: float, A: torch.Tensor, G: torch.Tensor, name: str) -> FactoredInverse:
        """A new Cholesky (the damping enters the factors before inversion)."""
        return self.compute(A, G, eta, scale, name, self.layout)

    def folded(self) -> FactoredInverse:
        """Itself: the scale is already inside Ainv."""
        return self

    @classmethod
    def concatenate(cls, inverses: list[LayerInverse]) -> FactoredInverse:
        """Ainv and Ginv of all ``inverses`` stacked."""
        return cls(eta=inverses[0].eta, scale=1.0, Ainv=torch.cat([v.Ainv for v in inverses]),
                   Ginv=torch.cat([v.Ginv for v in inverses]))

    def part(self, rows: slice) -> FactoredInverse:
        """Ainv and Ginv of the stacked groups ``rows``."""
        return replace(self, Ainv=self.Ainv[rows], Ginv=self.Ginv[rows])

    @property
    def sides(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ainv, Ginv)."""
        return self.Ainv, self.Ginv

    def _kernel(self, g: torch.Tensor) -> torch.Tensor:
        return tk.kron_precondition(g, self.Ginv, self.Ainv)

    def _silent_update(self, gs: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.Ginv, gs) * self.silent_scale

    def _block_product(self, M: torch.Tensor) -> torch.Tensor:
        n, kg, bg, ka, ba = M.shape
        U = torch.einsum("nicd,nidjb->nicjb", self.Ginv.reshape(n, kg, bg, bg), M)
        return torch.einsum("nicjb,njbe->nicje", U, self.Ainv.reshape(n, ka, ba, ba))


@dataclass(eq=False, kw_only=True)
class EigenInverse(LayerInverse):
    """Eigenbases and eigenvalues of Ω and Γ for the exact damping (``scale`` multiplies lA when applied)."""

    method: ClassVar[str] = "eigen"
    state_tensors: ClassVar[tuple[str, ...]] = ("QA", "lA", "QG", "lG", "live", "silent")

    QA: torch.Tensor
    lA: torch.Tensor
    QG: torch.Tensor
    lG: torch.Tensor

    @classmethod
    def compute(cls, A: torch.Tensor, G: torch.Tensor, eta: float, scale: float, name: str,
                layout: Layout | None = None) -> EigenInverse:
        """Eigendecompositions of the factors.

        On Ω's live block when enough coordinates are silent; blocked factors with their padding coordinates set
        to 1.
        """
        if layout is not None and layout.blocked:
            live = silent = None
            A = bl.pad_identity_(A.clone(), layout.a_blocks, layout.a_dim)
            G = bl.pad_identity_(G.clone(), layout.g_blocks, layout.g_dim)
        else:
            layout = None
            live, silent = silent_split(A, eta, name)
            if live is not None:
                A = A.index_select(-1, live).index_select(-2, live)
        QA, lA, QG, lG = eigendecompose(A, G, name)
        if eta <= 0:
            check_eigen_invertible(lA, lG, name)
        return cls(eta=eta, scale=scale, layout=layout, live=live, silent=silent, QA=QA, lA=lA, QG=QG, lG=lG)

    @classmethod
    def identity(cls, layout: Layout, eta: float, scale: float, dtype: torch.dtype,
                 device: torch.device) -> EigenInverse:
        """Identity eigenbases and zero eigenvalues: the update is ∇h / η."""
        (na, ba, _), (ng, bg, _) = layout.shapes()
        return cls(eta=eta, scale=scale, layout=layout if layout.blocked else None,
                   QA=torch.eye(ba, dtype=dtype, device=device).expand(na, ba, ba).clone(),
                   lA=torch.zeros(na, ba, dtype=dtype, device=device),
                   QG=torch.eye(bg, dtype=dtype, device=device).expand(ng, bg, bg).clone(),
                   lG=torch.zeros(ng, bg, dtype=dtype, device=device))

    def rescale(self, eta: float, scale: float, A: torch.Tensor, G: torch.Tensor, name: str) -> EigenInverse:
        """Free: the eigendecompositions do not depend on (η, scale)."""
        if eta <= 0:
            check_eigen_invertible(self.lA, self.lG, name)
        return replace(self, eta=eta, scale=scale)

    def folded(self) -> EigenInverse:
        """With lA multiplied by the scale."""
        return self if self.scale == 1.0 else replace(self, lA=self.lA * self.scale, scale=1.0)

    @classmethod
    def concatenate(cls, inverses: list[LayerInverse]) -> EigenInverse:
        """Eigenbases and eigenvalues of all ``inverses`` stacked, each lA times its scale."""
        return cls(eta=inverses[0].eta, scale=1.0, QA=torch.cat([v.QA for v in inverses]),
                   lA=torch.cat([v.lA * v.scale for v in inverses]), QG=torch.cat([v.QG for v in inverses]),
                   lG=torch.cat([v.lG for v in inverses]))

    def part(self, rows: slice) -> EigenInverse:
        """Eigenbases and eigenvalues of the stacked groups ``rows``."""
        return replace(self, QA=self.QA[rows], lA=self.lA[rows], QG=self.QG[rows], lG=self.lG[rows])

    @property
    def sides(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(QA, QG)."""
        return self.QA, self.QG

    def _kernel(self, g: torch.Tensor) -> torch.Tensor:
        return tk.eigen_precondition(g, self.QG, self.lG, self.QA, self.lA, self.eta)

    def _silent_update(self, gs: torch.Tensor) -> torch.Tensor:
        return gs / self.eta

    def _block_product(self, M: torch.Tensor) -> torch.Tensor:
        n, kg, bg, ka, ba = M.shape
        QG, QA = self.QG.reshape(n, kg, bg, bg), self.QA.reshape(n, ka, ba, ba)
        V = torch.einsum("nidc,nidjb->nicjb", QG, M)
        V = torch.einsum("nicjb,njbe->nicje", V, QA)
        V = V / (self.lG.reshape(n, kg, bg)[:, :, :, None, None] * self.lA.reshape(n, ka, ba)[:, None, None]
                 + self.eta)
        U = torch.einsum("nicd,nidjb->nicjb", QG, V)
        return torch.einsum("nicjb,njeb->nicje", U, QA)


INVERSES: dict[str, type[LayerInverse]] = {k.method: k for k in (FactoredInverse, EigenInverse)}
DAMPING_METHODS = tuple(INVERSES)


def inverse_kind(method: str) -> type[LayerInverse]:
    """The class of a damping method (one of :data:`DAMPING_METHODS`)."""
    if method not in INVERSES:
        raise ValueError(f"unknown damping method {method!r}: expected one of {DAMPING_METHODS}")
    return INVERSES[method]


def compute_inverse(method: str, A: torch.Tensor, G: torch.Tensor, eta: float, scale: float,
                    name: str, layout: Layout | None = None) -> LayerInverse:
    """The damped inverses (``"factored"``) or eigendecompositions (``"eigen"``) of one layer's factors.

    They are stored as ``layout`` says (dense when None or unblocked).

    Raises:
        SingularFactorError: with ``eta`` = 0, for a singular factor.
    """
    return inverse_kind(method).compute(A, G, eta, scale, name, layout)


def rescale_inverse(inv: LayerInverse, eta: float, scale: float, A: torch.Tensor, G: torch.Tensor,
                    name: str) -> LayerInverse:
    """The inverse for a new (η, scale) from the same factors: free for eigen, a new Cholesky for factored."""
    return inv.rescale(eta, scale, A, G, name)


def precondition_layer(inv: LayerInverse, mat: torch.Tensor) -> torch.Tensor:
    """One layer's Γ⁻¹ G Ω⁻¹ (or the exact eigen-damped solve), ``(groups, g, a)``."""
    return inv.apply(mat)
