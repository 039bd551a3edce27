"""The statistics step before issue 17's statistics-cost work, as patches for A/B runs in one process.

``PATCHES`` is a list of (object, attribute, old value) (``overhead_baseline.applied`` sets them for a block).
Restored together they give the code before these changes (same factors, more work per statistics step):

* the torch twin's symmetrisation (``reference.sym_axpby_``): a product by β and by α also when 1, and every
  block symmetrised by ``triu(B) + triu(B, 1)ᵀ`` (two ``triu``, an add and a copy);
* the torch twin's im2col patch covariance with the patch matrix built in three copies (im2col, the ones row
  concatenated, the (groups, Dg', N·T) permute);
* fresh Ω / Γ accumulators zero-filled and updated with β = 1 (instead of written whole with β = 0);
* the moving averages layer by layer (``mul_`` / ``add_`` per factor, instead of foreach ops over all layers);
* the shifted-product patch covariance of stride-1 convs (``shift_cov.patch_cov_update_``) with its products
  concatenated per cell and stacked, and the window sums by prefix sums and signed corner gathers
  (``shift_cov_before.py``).

Used by ``step_breakdown.py --baseline stats``.
"""
from __future__ import annotations

import torch
from shift_cov_before import patch_cov_update_ as _shift_patch_cov_update_
from torch import Tensor

from kfc_compile.curvature import estimator as estimator_mod
from kfc_compile.curvature.factors import Factors, RunningFactors
from kfc_compile.curvature.statistics import ExpandStatistics, products_are_finite
from triton_kernels import reference, shift_cov


def _sym_axpby_(F: Tensor, G: Tensor, alpha: float, beta: float) -> Tensor:
    if beta == 0:
        F.copy_(G).mul_(alpha)
    else:
        F.mul_(beta).add_(G, alpha=alpha)
    d, bs = F.shape[-1], 256
    for a in range(0, d, bs):
        b = min(a + bs, d)
        if a:
            F[..., a:b, :a] = F[..., :a, a:b].mT
        blk = F[..., a:b, a:b]
        blk.copy_(torch.triu(blk) + torch.triu(blk, 1).mT)
    return F


def _patch_cov_update_(F: Tensor, x: Tensor, geom, alpha: float, beta: float, ones: bool) -> Tensor:
    cols = reference.im2col(x.to(F.dtype), geom, ones)
    P = cols.permute(1, 2, 0, 3).reshape(geom.groups, cols.shape[2], geom.N * geom.T)
    return reference.sym_axpby_(F, P @ P.mT, alpha, beta)


def _add_rows(self, site, x: Tensor) -> None:
    if self.ema is not None and not products_are_finite(x, self.a_dim, self.dtype):
        self.poisoned = True
        return
    ones = site.has_bias
    target_dim = site.a_dim + ones
    alpha, beta = 1.0, 1.0
    if self.A is None:
        if self.ema is not None:
            self.A, beta, alpha = self.ema
            self.a_is_average = True
        else:
            self.A = self._new(self.a_dim, self.a_blocks).zero_()
    elif self.a_is_average:
        alpha = self.ema[2]
    if self.a_blocks > 1:
        rows = site.input_rows(x)
        if ones:
            rows = torch.cat([rows, rows.new_ones(*rows.shape[:-1], 1)], dim=-1)
        self._blocked_update(self.A, rows, self.a_blocks, self.a_dim, alpha, beta)
    elif target_dim == self.a_dim:
        site.accumulate_input_cov(self.A, x, alpha=alpha, beta=beta, ones=ones)
    else:
        if beta != 1.0:
            self.A.mul_(beta)
        part = self._new(target_dim)
        site.accumulate_input_cov(part, x, alpha=alpha, beta=0.0, ones=ones)
        self.A[:, :target_dim, :target_dim] += part


def _add_output_grad(self, site, gy: Tensor, scale: float) -> None:
    if self.poisoned:
        return
    if self.G is None:
        self.G = self._new(self.g_dim, self.g_blocks).zero_()
    self._blocked_update(self.G, site.output_rows(gy), self.g_blocks, self.g_dim, scale * scale, 1.0)


def _update(self, batch: Factors, decay: float) -> None:
    eps = self.next_eps(decay)
    self.updates += 1
    if batch.A is not self.A:
        self.A.mul_(eps).add_(batch.A, alpha=1.0 - eps)
    self.G.mul_(eps).add_(batch.G, alpha=1.0 - eps)


def _fold_into(states, batch: dict[int, Factors], decay: float) -> None:
    for i, f in batch.items():
        s = states[i]
        if s.running is None:
            s.running = RunningFactors(f.A, f.G, updates=1)
        else:
            _update(s.running, f, decay)


PATCHES = [(reference, "sym_axpby_", _sym_axpby_), (reference, "patch_cov_update_", _patch_cov_update_),
           (ExpandStatistics, "_add_rows", _add_rows),
           (ExpandStatistics, "_add_output_grad", _add_output_grad), (estimator_mod, "fold_into", _fold_into),
           (shift_cov, "patch_cov_update_", _shift_patch_cov_update_)]
