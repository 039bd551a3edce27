"""Launch configurations for the Triton kernels: heuristics, an override hook and an opt-in autotuner.

Why not ``triton.autotune``: the symmetric kernels choose a split count that changes the workspace the launcher
allocates, and the in-place epilogues read what they write (``beta != 0``), so timing a candidate must run on
scratch copies. The launchers therefore ask :func:`pick` for a config; by default it returns a heuristic choice,
with ``KFC_TRITON_AUTOTUNE=1`` it times the candidates once per shape key (on scratch buffers the launcher
provides) and caches the fastest. Tests and ``bench/gpu_check.py`` force configs with :func:`override`.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import torch

log = logging.getLogger(__name__)

FP32_PRECISIONS = ("tf32x3", "ieee", "tf32")


@dataclass(frozen=True)
class SymConfig:
    """Symmetric rank-k kernels (syrk, patch covariance): square output tiles, a reduction chunk, a split count."""

    block_d: int = 64
    block_m: int = 32
    split: int = 0          # 0: choose from the problem size; >= 1: exactly this many reduction slices
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class GemmConfig:
    """Batched strided GEMM used by the preconditioners."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# read-only default: ``override`` sets a fresh mapping, nothing mutates one in place
_OVERRIDE: contextvars.ContextVar[Mapping[str, object]] = contextvars.ContextVar(
    "kfc_triton_override", default=MappingProxyType({}))
_CACHE: dict[tuple, object] = {}


@contextlib.contextmanager
def override(**configs: object) -> Iterator[None]:
    """Force configs for kernel kinds ``syrk``, ``patch``, ``patch_sum``, ``gemm`` inside the block (tests, sweeps)."""
    token = _OVERRIDE.set({**_OVERRIDE.get(), **configs})
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def fp32_precision() -> str:
    """``tl.dot`` input precision for fp32 operands: env ``KFC_TRITON_FP32_PRECISION`` (default tf32x3).

    tf32x3 (three TF32 products) keeps roughly fp32 accuracy at tensor-core speed; ``ieee`` is exact fp32 FMA
    (slow on GPU); ``tf32`` is ~1e-3 relative and only for experiments.
    """
    p = os.environ.get("KFC_TRITON_FP32_PRECISION", "tf32x3").lower()
    if p not in FP32_PRECISIONS:
        raise ValueError(f"KFC_TRITON_FP32_PRECISION={p!r}; expected one of {FP32_PRECISIONS}")
    return p


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_split(n_programs: int, M: int, block_m: int, device: torch.device, interpreted: bool) -> int:
    """Reduction slices so that tiles x slices fill the GPU; each slice keeps >= 8 chunks of work."""
    if interpreted:
        return 1
    target = 2 * _sm_count(device)
    if n_programs >= target:
        return 1
    return max(1, min(math.ceil(target / n_programs), M // (8 * block_m), 64))


def sym_default(kind: str, Dp: int, M: int, batch: int, dtype: torch.dtype, device: torch.device,
                interpreted: bool) -> SymConfig:
    """Heuristic tile config for syrk / patch covariance."""
    if interpreted:
        return SymConfig(block_d=16, block_m=32, split=1, num_warps=1, num_stages=1)
    block_d = 32 if Dp <= 48 else (64 if Dp <= 1536 else 128)
    block_m = 64 if dtype in (torch.bfloat16, torch.float16) else 32
    warps = 8 if block_d == 128 else 4
    n_tiles = math.ceil(Dp / block_d)
    split = choose_split(n_tiles * (n_tiles + 1) // 2 * batch, M, block_m, device, interpreted)
    return SymConfig(block_d=block_d, block_m=block_m, split=split, num_warps=warps, num_stages=3)


def sym_candidates(kind: str, Dp: int, M: int, batch: int, dtype: torch.dtype, device: torch.device) -> list[SymConfig]:
    """A small sweep of symmetric-kernel configs for the autotuner and ``bench/gpu_check.py``.

    Three tile shapes with the heuristic split (and twice it when that needs no new compile). Kept short because
    every tile shape is a new compile.
    """
    out = []
    # fp32 128x128 tiles with 64-row chunks need 256 KiB of shared memory at 3 stages (over an H100's 227 KiB)
    shapes = [(64, 32, 4), (64, 64, 4), (128, 32, 8)]
    if Dp <= 96:
        shapes = [(32, 32, 4), (32, 64, 4), (64, 32, 4)]
    for bd, bm, w in shapes:
        n_tiles = math.ceil(Dp / bd)
        split = choose_split(n_tiles * (n_tiles + 1) // 2 * batch, M, bm, device, False)
        splits = [split, 2 * split] if split > 1 and M // (8 * bm) >= 2 * split else [split]
        out += [SymConfig(block_d=bd, block_m=bm, split=s, num_warps=w, num_stages=3) for s in splits]
    return out


def gemm_default(M: int, N: int, K: int, batch: int, device: torch.device, interpreted: bool) -> GemmConfig:
    """Heuristic tile config for the batched (M, K) @ (K, N) GEMM of the preconditioners."""
    if interpreted:
        return GemmConfig(block_m=32, block_n=32, block_k=16, group_m=2, num_warps=1, num_stages=1)
    if M * N >= 256 * 1024:
        return GemmConfig(block_m=128, block_n=128, block_k=32, group_m=8, num_warps=8, num_stages=3)
    return GemmConfig(block_m=64, block_n=64, block_k=32, group_m=8, num_warps=4, num_stages=3)


def gemm_candidates() -> list[GemmConfig]:
    """The GEMM configs the autotuner times besides the default."""
    return [GemmConfig(64, 64, 32, 8, 4, 3), GemmConfig(128, 64, 32, 8, 4, 3), GemmConfig(128, 128, 32, 8, 8, 3),
            GemmConfig(32, 64, 32, 8, 4, 4)]


def autotune_enabled() -> bool:
    """Whether ``KFC_TRITON_AUTOTUNE`` asks for autotuning (read at every call)."""
    return os.environ.get("KFC_TRITON_AUTOTUNE", "0") not in ("", "0", "false", "False")


def pick(kind: str, key: tuple, default: object, candidates: Callable[[], list], bench: Callable[[object], float]
         | None, interpreted: bool) -> object:
    """The config to launch: an override, else (autotune on GPU) the cached fastest candidate, else the default.

    ``bench(cfg)`` must run the kernel on scratch buffers and return a time in ms.
    """
    forced = _OVERRIDE.get().get(kind)
    if forced is not None:
        return forced
    if interpreted or bench is None or not autotune_enabled():
        return default
    ck = (kind, *key)
    if ck not in _CACHE:
        best, best_t = default, math.inf
        for cfg in [default, *candidates()]:
            try:
                t = bench(cfg)
            except Exception as e:  # a config may not fit (shared memory, registers): skip it
                log.debug("config %s failed for %s: %s", cfg, ck, e)
                continue
            if t < best_t:
                best, best_t = cfg, t
        log.info("autotuned %s -> %s (%.4f ms)", ck, best, best_t)
        _CACHE[ck] = best
    return _CACHE[ck]


def tuned_configs() -> dict[tuple, object]:
    """The autotuner's choices so far, keyed by (kind, shape key...)."""
    return dict(_CACHE)


def clear_tuned() -> None:
    """Forget the autotuner's choices (the next launch of each shape is timed again)."""
    _CACHE.clear()
