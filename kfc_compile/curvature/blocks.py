"""Block-diagonal factors for wide layers (``KFC(max_factor_dim=m)``).

A factor wider than m (VGG's first classifier layer has a 25089-wide Ω) costs d² memory and d³ time to invert.
Such a factor is approximated by its k = ceil(d / m) diagonal blocks of equal size b = ceil(d / k): the input
(or output) coordinates are split into k contiguous chunks assumed uncorrelated, as Shampoo does with its
``max_preconditioner_dim``. Because kron(Γ, blockdiag(Ω_j)) is a permutation of blockdiag(kron(Γ, Ω_j)), the
approximate Fisher block stays an exactly invertible Kronecker structure, at d·b memory and d·b² time.

Storage: a factor with k blocks per group is ``(groups·k, b, b)`` (group-major, block-minor). When k·b > d the
last block has ``k·b − d`` padding coordinates: their rows and columns are 0 (they are fed zero columns) and
they are never read back (the gradient matrix is padded with zeros and the update cropped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def block_count(d: int, max_dim: int | None) -> int:
    """Blocks for a factor of size d under the cap (1: dense)."""
    return 1 if max_dim is None or d <= max_dim else math.ceil(d / max_dim)


def block_size(d: int, k: int) -> int:
    """Size of each of the k diagonal blocks of a factor of size d (the last one zero-padded)."""
    return math.ceil(d / k)


def block_rows(rows: torch.Tensor, k: int) -> torch.Tensor:
    """(B, M, d) rows → (B·k, M, b): the coordinates split into k chunks of b (zero-padded to k·b)."""
    if k == 1:
        return rows
    B, M, d = rows.shape
    b = block_size(d, k)
    if k * b > d:
        rows = torch.nn.functional.pad(rows, (0, k * b - d))
    return rows.reshape(B, M, k, b).permute(0, 2, 1, 3).reshape(B * k, M, b)


def diagonal_blocks(F: torch.Tensor, k: int) -> torch.Tensor:
    """(B, d, d) dense factor → its (B·k, b, b) diagonal blocks (the padding coordinates 0)."""
    B, d, _ = F.shape
    b = block_size(d, k)
    P = torch.nn.functional.pad(F, (0, k * b - d, 0, k * b - d)) if k * b > d else F
    idx = torch.arange(k, device=F.device)
    return P.reshape(B, k, b, k, b)[:, idx, :, idx, :].permute(1, 0, 2, 3).reshape(B * k, b, b)


def dense(F: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """(B·k, b, b) blocks → the (B, d, d) block-diagonal matrix they stand for."""
    b = F.shape[-1]
    B = F.shape[0] // k
    out = F.new_zeros(B, k * b, k * b)
    for j in range(k):
        out[:, j * b:(j + 1) * b, j * b:(j + 1) * b] = F[j::k]
    return out[:, :d, :d]


def pad_identity_(F: torch.Tensor, k: int, d: int) -> torch.Tensor:
    """Put 1 on the diagonal of the padding coordinates (in place).

    This makes a damped block invertible even without damping; the padding never meets a nonzero gradient, so the
    value is immaterial.
    """
    b = F.shape[-1]
    pad = k * b - d
    if pad:
        last = F[k - 1::k]
        last.diagonal(dim1=-2, dim2=-1)[..., b - pad:] += 1.0
    return F


def group_traces(F: torch.Tensor, groups: int) -> torch.Tensor:
    """Trace per group of a (groups·k, b, b) blocked factor (the padding contributes 0)."""
    return torch.diagonal(F, dim1=-2, dim2=-1).sum(-1).reshape(groups, -1).sum(-1)


@dataclass(frozen=True)
class Layout:
    """How one layer's factors are stored: per group, Ω in ``a_blocks`` and Γ in ``g_blocks`` diagonal blocks."""

    groups: int
    a_dim: int
    g_dim: int
    a_blocks: int = 1
    g_blocks: int = 1

    @classmethod
    def of(cls, groups: int, a_dim: int, g_dim: int, max_dim: int | None) -> Layout:
        """The layout of a layer's factors with blocks capped at ``max_dim`` (None: dense)."""
        return cls(groups, a_dim, g_dim, block_count(a_dim, max_dim), block_count(g_dim, max_dim))

    @property
    def blocked(self) -> bool:
        """Whether either factor has more than one diagonal block."""
        return self.a_blocks > 1 or self.g_blocks > 1

    def shapes(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """Stored shapes of (Ω, Γ)."""
        ba, bg = block_size(self.a_dim, self.a_blocks), block_size(self.g_dim, self.g_blocks)
        return (self.groups * self.a_blocks, ba, ba), (self.groups * self.g_blocks, bg, bg)

    def to_blocks(self, A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense (groups, d, d) factors → the stored blocks (entries off the diagonal blocks are dropped)."""
        return diagonal_blocks(A, self.a_blocks), diagonal_blocks(G, self.g_blocks)

    def to_dense(self, A: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored blocks → the dense block-diagonal (groups, d, d) factors they stand for."""
        return dense(A, self.a_blocks, self.a_dim), dense(G, self.g_blocks, self.g_dim)
