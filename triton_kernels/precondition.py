"""Triton preconditioned updates, batched over same-shape layers (leading dim B, one launch per GEMM).

One batched strided GEMM kernel (transposes are strides) with three epilogues:

* ``EPI_STORE``: C = A @ B
* ``EPI_DIVIDE``: C = (A @ B) / (lG[i] * lA[j] + damping)      (the eigenbasis rescaling, fused)
* ``EPI_AXPBY``: C = beta*C + alpha*(A @ B)                     (write into a momentum buffer or parameter)

Eigenbasis: U = QG [(QG^T grad QA) / (lG lA^T + damping)] QA^T is four launches (QG^T grad; (. QA)/den; QG .;
. QA^T with axpby); the factored inverse Ginv grad Ainv is two. Intermediates stay in the compute dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import tuning

EPI_STORE, EPI_DIVIDE, EPI_AXPBY = 0, 1, 2
_MAX_GRID = 65535


@triton.jit
def _bmm_kernel(a_ptr, b_ptr, c_ptr, lg_ptr, la_ptr, M, N, K,
                s_ab, s_am, s_ak, s_bb, s_bk, s_bn, s_cb, s_cm, s_cn, s_lgb, s_lab,
                damping, alpha, beta,
                EPI: tl.constexpr, BETA_ZERO: tl.constexpr, ACC64: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    # grouped ordering: GROUP_M row blocks share column blocks while they are hot in L2
    n_m = (M + BLOCK_M - 1) // BLOCK_M
    n_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * n_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    if ACC64:
        acc_dt = tl.float64
    else:
        acc_dt = tl.float32
    a_rows = a_ptr + bid * s_ab + offs_m.to(tl.int64)[:, None] * s_am
    b_cols = b_ptr + bid * s_bb + offs_n.to(tl.int64)[None, :] * s_bn
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0, acc_dt)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(a_rows + kk.to(tl.int64)[None, :] * s_ak, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + kk.to(tl.int64)[:, None] * s_bk, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(acc_dt), b.to(acc_dt), acc, input_precision=PREC, out_dtype=acc_dt)
    mask = m_ok[:, None] & n_ok[None, :]
    c = c_ptr + bid * s_cb + offs_m.to(tl.int64)[:, None] * s_cm + offs_n.to(tl.int64)[None, :] * s_cn
    if EPI == 1:
        lg = tl.load(lg_ptr + bid * s_lgb + offs_m, mask=m_ok, other=1.0).to(acc_dt)
        la = tl.load(la_ptr + bid * s_lab + offs_n, mask=n_ok, other=1.0).to(acc_dt)
        acc = acc / (lg[:, None] * la[None, :] + damping)
    if EPI == 2:
        acc = acc * alpha
        if not BETA_ZERO:
            acc += beta * tl.load(c, mask=mask, other=0.0).to(acc_dt)
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=mask)


KERNELS = (_bmm_kernel,)


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float64 else tuning.fp32_precision()


def bmm(A: Tensor, Bm: Tensor, C: Tensor, cfg: tuning.GemmConfig, epi: int = EPI_STORE, lG: Tensor | None = None,
        lA: Tensor | None = None, damping: float = 0.0, alpha: float = 1.0, beta: float = 0.0) -> None:
    """C[b] <- epi(A[b] @ Bm[b]) for 3-d tensors with any strides; accumulates in C's compute dtype."""
    nb, M, K = A.shape
    N = Bm.shape[-1]
    acc64 = C.dtype == torch.float64 or A.dtype == torch.float64
    lg = lG if lG is not None else C
    la = lA if lA is not None else C
    for b0 in range(0, nb, _MAX_GRID):
        sl = slice(b0, b0 + _MAX_GRID)
        Ab, Bb, Cb = A[sl], Bm[sl], C[sl]
        lgb = lg[sl] if lG is not None else lg
        lab = la[sl] if lA is not None else la
        grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), Ab.shape[0])
        _bmm_kernel[grid](Ab, Bb, Cb, lgb, lab, M, N, K, Ab.stride(0), Ab.stride(1), Ab.stride(2), Bb.stride(0),
                          Bb.stride(1), Bb.stride(2), Cb.stride(0), Cb.stride(1), Cb.stride(2),
                          lgb.stride(0) if lG is not None else 0, lab.stride(0) if lA is not None else 0,
                          float(damping), float(alpha), float(beta), EPI=epi, BETA_ZERO=(beta == 0), ACC64=acc64,
                          PREC=_prec(torch.float64 if acc64 else torch.float32), BLOCK_M=cfg.block_m,
                          BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, num_warps=cfg.num_warps,
                          num_stages=cfg.num_stages)


def _cfg(DG: int, D: int, nb: int, device: torch.device, interpreted: bool, key: tuple, run) -> tuning.GemmConfig:
    default = tuning.gemm_default(DG, D, max(DG, D), nb, device, interpreted)

    def bench(cfg: tuning.GemmConfig) -> float:
        return triton.testing.do_bench(lambda: run(cfg))

    return tuning.pick("gemm", key, default, tuning.gemm_candidates, bench, interpreted)


def _tuned_launch(kind: str, run, grad: Tensor, out: Tensor | None, alpha: float, beta: float,
                  dtype: torch.dtype, interpreted: bool) -> Tensor:
    """Pick the GEMM config for this shape, then ``run(cfg, dst, a, b)`` into ``out`` or a new tensor.

    Autotuning times ``run`` into a scratch buffer on first use; into ``out`` it runs the axpby epilogue with
    alpha, beta.
    """
    nb, DG, D = grad.shape
    dst = out if out is not None else torch.empty((nb, DG, D), dtype=dtype, device=grad.device)
    a, b = (alpha, beta) if out is not None else (1.0, 0.0)
    key = (kind, nb, DG, D, dtype, str(grad.device), tuning.fp32_precision())
    scratch = None

    def trial(cfg: tuning.GemmConfig) -> None:
        nonlocal scratch
        if scratch is None:
            scratch = torch.empty((nb, DG, D), dtype=dst.dtype, device=grad.device)
        run(cfg, scratch, 1.0, 0.0)

    cfg = _cfg(DG, D, nb, grad.device, interpreted, key, trial)
    run(cfg, dst, a, b)
    return dst


def eigen_precondition(grad: Tensor, QG: Tensor, lG: Tensor, QA: Tensor, lA: Tensor, damping: float,
                       out: Tensor | None, alpha: float, beta: float, dtype: torch.dtype,
                       interpreted: bool) -> Tensor:
    """Triton path on validated batched views; returns U (new, ``dtype``) or ``out`` after the axpby epilogue."""
    nb, DG, D = grad.shape
    lG, lA = lG.contiguous(), lA.contiguous()          # the epilogue indexes eigenvalues with unit stride
    T13 = torch.empty((nb, DG, D), dtype=dtype, device=grad.device)   # QG^T grad, later QG T2
    T2 = torch.empty_like(T13)

    def run(cfg: tuning.GemmConfig, dst: Tensor, a: float, b: float) -> None:
        bmm(QG.mT, grad, T13, cfg)
        bmm(T13, QA, T2, cfg, EPI_DIVIDE, lG=lG, lA=lA, damping=damping)
        bmm(QG, T2, T13, cfg)
        bmm(T13, QA.mT, dst, cfg, EPI_AXPBY, alpha=a, beta=b)

    return _tuned_launch("eigen", run, grad, out, alpha, beta, dtype, interpreted)


def kron_precondition(grad: Tensor, Ginv: Tensor, Ainv: Tensor, out: Tensor | None, alpha: float, beta: float,
                      dtype: torch.dtype, interpreted: bool) -> Tensor:
    """Triton path on validated batched views: Ginv grad Ainv, optionally accumulated into ``out``."""
    nb, DG, D = grad.shape
    T1 = torch.empty((nb, DG, D), dtype=dtype, device=grad.device)

    def run(cfg: tuning.GemmConfig, dst: Tensor, a: float, b: float) -> None:
        bmm(Ginv, grad, T1, cfg)
        bmm(T1, Ainv, dst, cfg, EPI_AXPBY, alpha=a, beta=b)

    return _tuned_launch("kron", run, grad, out, alpha, beta, dtype, interpreted)
