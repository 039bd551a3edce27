"""Compile every Triton kernel variant ahead of time for an NVIDIA target, on a machine without a GPU.

    python bench/kernels_cpu.py [--arch 90] [--quick] [--jobs 2] [--only patch]

The interpreter tests run the kernels' logic on CPU but never the GPU compiler. This script runs the real
pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for the dtype / epilogue / tile variants
that the launchers and ``bench/gpu_check.py`` use, and reports per variant: shared memory, registers, spills and
whether the dot lowered to Hopper ``wgmma``. Exit status 1 if a variant fails to compile or needs more shared
memory than the target has. Nothing here says anything about speed.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)          # build real JITFunctions
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from triton_kernels import patch_cov, precondition, symstore, syrk, tuning  # noqa: E402

SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448, 100: 232448}
FLOAT_ARGS = {"alpha", "beta", "damping"}


def _signature(fn, ptrs: dict[str, str], constexprs: dict) -> dict[str, str]:
    return {n: ("constexpr" if n in constexprs else ptrs.get(n, "fp32" if n in FLOAT_ARGS else "i32"))
            for n in fn.arg_names}


def _ptxas_info(ptx: str, arch: int) -> tuple[int, int]:
    """(registers, spill store bytes) from ptxas -v."""
    from triton.backends.nvidia.compiler import get_ptxas
    exe = get_ptxas(arch).path
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        r = subprocess.run([exe, "-v", f"--gpu-name=sm_{arch}{suffix}", str(src), "-o", str(Path(d) / "k.cubin")],
                           capture_output=True, text=True)
    log = r.stdout + r.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores", log)
    return int(regs.group(1)) if regs else -1, int(spill.group(1)) if spill else -1


def variants(quick: bool) -> list[tuple[str, str, object, dict, dict, int, int]]:
    """(kernel, variant label, fn, pointer types, constexprs, num_warps, num_stages)."""
    out = []
    sym_tiles = [(64, 32, 4), (128, 32, 8)] if quick else [(32, 32, 4), (32, 64, 4), (64, 32, 4), (64, 64, 4),
                                                            (128, 32, 8), (128, 64, 8)]
    dtypes = [("fp32", "fp32", False, "tf32x3"), ("bf16", "fp32", False, "ieee"), ("fp32", "fp32", False, "ieee"),
              ("fp16", "fp32", False, "ieee"), ("fp32", "fp64", True, "ieee")]
    for bd, bm, w in sym_tiles:
        for xdt, fdt, cast, prec in (dtypes[:2] if (bd, bm) != (64, 32) else dtypes):
            for use_ws in (False, True):
                ce = dict(ONES=True, BETA_ZERO=False, USE_WS=use_ws, CAST=cast, PREC=prec, BLOCK_D=bd, BLOCK_M=bm)
                lab = f"x={xdt} F={fdt} {prec} D{bd}/M{bm} ws={int(use_ws)}"
                out.append(("syrk", lab, syrk._syrk_kernel, {"x_ptr": "*" + xdt, "f_ptr": "*" + fdt,
                                                             "ws_ptr": "*" + fdt}, ce, w, 3))
                ce = dict(ce, K0=1, K1=3, K2=3, ST0=1, ST1=1, ST2=1, DL0=1, DL1=1, DL2=1, NDIM=2)
                out.append(("patch_cov", lab + " k3x3", patch_cov._patch_cov_kernel,
                            {"x_ptr": "*" + xdt, "f_ptr": "*" + fdt, "ws_ptr": "*" + fdt}, ce, w, 3))
    for bd, w in ((32, 4), (64, 4)):
        for fdt in ("fp32", "fp64"):
            out.append(("finalize", f"F={fdt} BLOCK={bd}", symstore.split_finalize_kernel,
                        {"ws_ptr": "*" + fdt, "f_ptr": "*" + fdt}, dict(BETA_ZERO=False, BLOCK=bd), w, 1))
    for xdt, odt in (("fp32", "fp32"), ("bf16", "fp32"), ("fp64", "fp64")):
        ce = dict(K0=2, K1=3, K2=3, ST0=1, ST1=2, ST2=1, DL0=1, DL1=1, DL2=2, NDIM=3, ONES=True, BLOCK_D=64,
                  BLOCK_T=32)
        out.append(("patch_sum", f"x={xdt} out={odt}", patch_cov._patch_sum_kernel,
                    {"x_ptr": "*" + xdt, "out_ptr": "*" + odt}, ce, 4, 1))
    gemms = [tuning.GemmConfig(64, 64, 32, 8, 4, 3), tuning.GemmConfig(128, 128, 32, 8, 8, 3)] if quick else \
        tuning.gemm_candidates()
    for cfg in gemms:
        for epi in (0, 1, 2):
            for acc64, prec, cdt in ((False, "tf32x3", "fp32"), (False, "ieee", "fp32"), (True, "ieee", "fp64"),
                                     (False, "tf32x3", "bf16")):
                if (acc64 or prec == "ieee") and cfg != gemms[0]:
                    continue
                if cdt == "bf16" and epi != 2:
                    continue
                ce = dict(EPI=epi, BETA_ZERO=False, ACC64=acc64, PREC=prec, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                          BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
                adt = "fp64" if acc64 else "fp32"
                lab = f"EPI={epi} {prec} acc={adt} out={cdt} {cfg.block_m}x{cfg.block_n}x{cfg.block_k}"
                out.append(("bmm", lab, precondition._bmm_kernel,
                            {"a_ptr": "*" + adt, "b_ptr": "*" + adt, "c_ptr": "*" + cdt, "lg_ptr": "*" + adt,
                             "la_ptr": "*" + adt}, ce, cfg.num_warps, cfg.num_stages))
    return out


def compile_one(v, arch: int) -> list:
    kernel, label, fn, ptrs, ce, warps, stages = v
    t = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, _signature(fn, ptrs, ce), ce), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=warps, num_stages=stages))
    except Exception as e:  # report and go on
        msg = str(e).strip().splitlines()
        return [kernel, label, warps, stages, "-", "-", "-", "-", f"{time.perf_counter() - t:.1f}",
                "FAIL: " + (msg[-1] if msg else type(e).__name__)[:120]]
    regs, spill = _ptxas_info(k.asm["ptx"], arch)
    ttgir = k.asm["ttgir"]
    mma = "wgmma" if "warp_group_dot" in ttgir else ("mma" if "nvidia_mma" in ttgir else "fma/none")
    smem = k.metadata.shared
    ok = smem <= SMEM_LIMIT.get(arch, 232448)
    return [kernel, label, warps, stages, f"{smem / 1024:.0f}", regs, spill, mma, f"{time.perf_counter() - t:.1f}",
            "ok" if ok else "FAIL: shared memory over the limit"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--only", default="", help="compile only kernels whose name contains this")
    a = p.parse_args()
    vs = [v for v in variants(a.quick) if a.only in v[0]]
    print(f"# AOT compile report: sm_{a.arch}, triton {triton.__version__}, {len(vs)} variants\n")
    cols = ["kernel", "variant", "warps", "stages", "smem KiB", "regs", "spill B", "dot", "compile s", "status"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)
    fails = 0
    with ThreadPoolExecutor(a.jobs) as ex:
        for row in ex.map(lambda v: compile_one(v, a.arch), vs):
            fails += str(row[-1]).startswith("FAIL")
            print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
    print(f"\n{fails} failure(s)")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
