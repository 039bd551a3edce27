"""GPU check of the KFC Triton kernels: correctness against float64 references, then timing against plain torch.

    python bench/gpu_check.py             # on a CUDA machine, under 5 minutes on an H100
    python bench/gpu_check.py --dry-run   # tiny sizes on CPU through the Triton interpreter (logic check only)

Writes the tables to stdout and, if the environment variable OUT is set, to $OUT/gpu_check.md (rewritten after
every row, so a run cut short still leaves what it measured). Options: --budget-s (wall-clock budget for the timing
section, default 240), --no-autotune, --quick.

What is measured:
* correctness: fresh random inputs, outputs poisoned with NaN before beta=0 calls, odd sizes, fp32 operands with
  tl.dot input precision ieee / tf32x3 (default) / tf32, bf16 and fp16 inputs (compared with the fp64 result of the
  rounded values), fp64 factors, the split-reduction path (and its bitwise determinism), exact symmetry;
* timing (``triton.testing.do_bench``, median ms): Triton with the heuristic config, Triton after the built-in
  autotuner's sweep (KFC_TRITON_AUTOTUNE=1), and the plain torch path: ``F.addmm_(X.T, X)`` for syrk,
  ``F.unfold`` + ``addmm_`` for the patch covariance, four matmuls + divide + ``add_`` for the eigenbasis
  preconditioner, two matmuls + ``add_`` for the factored inverse. Torch matmuls run with TF32 off (PyTorch's
  default, i.e. fp32 accuracy) unless a row says otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    p.add_argument("--budget-s", type=float, default=240.0, help="wall-clock budget for the timing section")
    p.add_argument("--no-autotune", action="store_true", help="time the heuristic configs only")
    p.add_argument("--quick", action="store_true", help="fewer timing rows")
    return p.parse_args()


ARGS = _parse()
if ARGS.dry_run:
    os.environ["TRITON_INTERPRET"] = "1"           # must precede the first kernel import
os.environ["KFC_KERNELS"] = "triton"
os.environ.pop("KFC_TRITON_AUTOTUNE", None)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as tF  # noqa: E402
import triton  # noqa: E402

import triton_kernels as tk  # noqa: E402
from triton_kernels import checks, reference, tuning  # noqa: E402

DRY = ARGS.dry_run
if not DRY and not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device; use --dry-run for the CPU interpreter check")
DEV = torch.device("cpu" if DRY else "cuda")
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
T0 = time.perf_counter()
OUT_MD = Path(os.environ["OUT"]) / "gpu_check.md" if os.environ.get("OUT") else None


# ---------------------------------------------------------------------------------------------------------------
# output


class Table:
    def __init__(self, title: str, cols: list[str]):
        self.title, self.cols, self.rows = title, cols, []
        print(f"\n## {title}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols), flush=True)

    def add(self, *vals) -> None:
        row = [_fmt(v) for v in vals]
        self.rows.append(row)
        print("| " + " | ".join(row) + " |", flush=True)
        _write_md()

    def md(self) -> str:
        head = f"## {self.title}\n\n| " + " | ".join(self.cols) + " |\n|" + "---|" * len(self.cols) + "\n"
        return head + "".join("| " + " | ".join(r) + " |\n" for r in self.rows)


TABLES: list[Table] = []
HEADER: list[str] = []


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:
            return "nan"
        if v == 0:
            return "0"
        return f"{v:.3g}" if (abs(v) >= 1e-3 and abs(v) < 1e4) else f"{v:.2e}"
    return str(v)


def _write_md() -> None:
    if OUT_MD is None:
        return
    OUT_MD.parent.mkdir(parents=True, exist_ok=True)
    OUT_MD.write_text("# gpu_check\n\n" + "\n".join(HEADER) + "\n\n" + "\n".join(t.md() for t in TABLES))


def table(title: str, cols: list[str]) -> Table:
    t = Table(title, cols)
    TABLES.append(t)
    return t


# ---------------------------------------------------------------------------------------------------------------
# helpers


def rnd(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEV).to(dtype)


def nan_like(shape, dtype=torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=DEV)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.double().abs().max().item()
    return (got.double() - ref.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def symmetric(F: torch.Tensor) -> bool:
    return bool(torch.equal(F, F.mT)) and not bool(torch.isnan(F).any())


class precision:
    """Set KFC_TRITON_FP32_PRECISION inside a block."""

    def __init__(self, p: str):
        self.p = p

    def __enter__(self):
        self.old = os.environ.get("KFC_TRITON_FP32_PRECISION")
        os.environ["KFC_TRITON_FP32_PRECISION"] = self.p

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("KFC_TRITON_FP32_PRECISION", None)
        else:
            os.environ["KFC_TRITON_FP32_PRECISION"] = self.old


def ref_syrk(X: torch.Tensor, ones: bool) -> torch.Tensor:
    Xd = X.double()
    if ones:
        Xd = torch.cat([Xd, torch.ones(*Xd.shape[:-1], 1, dtype=torch.float64, device=X.device)], -1)
    return Xd.mT @ Xd


def ref_patch(x, ks, st, pad, dil, groups, ones) -> torch.Tensor:
    """fp64 patch covariance through the torch reference (validated against brute-force loops in the tests)."""
    geom = checks.conv_geometry(x, ks, st, pad, dil, groups)
    F = torch.empty((groups, geom.dp(ones), geom.dp(ones)), dtype=torch.float64, device=x.device)
    return reference.patch_cov_update_(F, x.double(), geom, 1.0, 0.0, ones)


def ref_eigen(g, QG, lG, QA, lA, d) -> torch.Tensor:
    g, QG, QA = g.double(), QG.double(), QA.double()
    return QG @ ((QG.mT @ g @ QA) / (lG.double()[..., :, None] * lA.double()[..., None, :] + d)) @ QA.mT


def eig_inputs(B, DG, D):
    QG = torch.linalg.qr(torch.randn(B, DG, DG, device=DEV, dtype=torch.float64))[0].float()
    QA = torch.linalg.qr(torch.randn(B, D, D, device=DEV, dtype=torch.float64))[0].float()
    return rnd(B, DG, D), QG, torch.rand(B, DG, device=DEV), QA, torch.rand(B, D, device=DEV)


def bench(fn) -> float:
    """Median ms. Dry run: one wall-clock call (the interpreter is not a performance model)."""
    if DRY:
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return triton.testing.do_bench(fn, warmup=10, rep=40)


# ---------------------------------------------------------------------------------------------------------------
# correctness


def correctness() -> None:
    t = table("Correctness against float64 references", ["check", "shape", "fp32 dot", "max rel err", "tol",
                                                         "symmetric", "status"])

    def row(name, shape, prec, err, tol, sym=None):
        ok = err <= tol and sym is not False
        t.add(name, shape, prec, err, tol, "-" if sym is None else ("yes" if sym else "NO"), "ok" if ok else "FAIL")

    s = 1 if DRY else 8
    M, D = (37, 21) if DRY else (1000, 333)
    X = rnd(M, D)
    for prec, tol in (("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 5e-3)):
        with precision(prec):
            F = tk.syrk_update_(nan_like((D + 1, D + 1)), X, ones=True)
        row("syrk", f"M={M} D={D} ones", prec, rel_err(F, ref_syrk(X, True)), tol, symmetric(F))
    B, M2, D2 = (2, 19, 17) if DRY else (3, 517, 129)
    X = rnd(B, M2, D2)
    F0 = ref_syrk(rnd(B, 5, D2 + 1), False).float()
    F = tk.syrk_update_(F0.clone(), X, alpha=0.1, beta=0.9, ones=True)
    row("syrk batched EMA", f"B={B} M={M2} D={D2}", "tf32x3", rel_err(F, 0.9 * F0.double() + 0.1 * ref_syrk(X, True)),
        1e-5, symmetric(F))
    for dt in (torch.bfloat16, torch.float16):
        X = rnd(M, D, dtype=dt)
        F = tk.syrk_update_(nan_like((D, D)), X)
        row(f"syrk {str(dt)[6:]} X", f"M={M} D={D}", "native", rel_err(F, ref_syrk(X, False)), 1e-5, symmetric(F))
    X = rnd(M, D)
    F = tk.syrk_update_(nan_like((D + 1, D + 1), torch.float64), X, ones=True)
    row("syrk fp64 factor", f"M={M} D={D}", "ieee(fp64)", rel_err(F, ref_syrk(X, True)), 1e-12, symmetric(F))
    X = rnd(D, M).mT
    F = tk.syrk_update_(nan_like((D, D)), X)
    row("syrk column-major X", f"M={M} D={D}", "tf32x3", rel_err(F, ref_syrk(X, False)), 1e-5, symmetric(F))
    Mbig, Dsmall = (300, 10) if DRY else (65537, 67)
    X = rnd(Mbig, Dsmall)
    outs = []
    for _ in range(2):
        with tuning.override(syrk=tuning.SymConfig(block_d=16 if DRY else 32, block_m=16 if DRY else 64, split=5)):
            outs.append(tk.syrk_update_(nan_like((Dsmall + 1, Dsmall + 1)), X, ones=True))
    row("syrk split=5 (deterministic: %s)" % ("yes" if torch.equal(outs[0], outs[1]) else "NO"),
        f"M={Mbig} D={Dsmall}", "tf32x3", rel_err(outs[0], ref_syrk(X, True)) if torch.equal(outs[0], outs[1])
        else float("inf"), 1e-5, symmetric(outs[0]))

    convs = [
        ("patch 2d NCHW", (5, 7, 13, 11), (3, 2), (2, 1), (1, 2, 0, 1), (1, 2), 1, False),
        ("patch 2d channels_last", (5, 7, 13, 11), (3, 2), (2, 1), (1, 2, 0, 1), (1, 2), 1, True),
        ("patch depthwise", (4, 32 // s * s if not DRY else 4, 9, 9), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1),
         32 if not DRY else 4, True),
        ("patch 3d grouped", (2, 6, 5, 6, 7), (2, 3, 3), (1, 2, 1), (0, 1, 1, 1, 1, 1), (1, 1, 2), 3, False),
        ("patch 1d dilated", (3, 5, 50), (5,), (1,), (4, 3), (2,), 1, False),
    ]
    if not DRY:
        convs.append(("patch resnet 3x3", (8, 64, 16, 16), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True))
    for name, shape, ks, st, pad, dil, groups, cl in convs:
        x = rnd(*shape)
        if cl:
            x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
        ref = ref_patch(x, ks, st, pad, dil, groups, True)
        for prec in ("ieee", "tf32x3") if name == "patch 2d NCHW" else ("tf32x3",):
            with precision(prec):
                F = tk.patch_cov_update_(nan_like(tuple(ref.shape)), x, ks, st, pad, dil, groups, ones=True)
            row(name, f"x={tuple(shape)} k={ks} s={st} p={pad} d={dil} g={groups}", prec, rel_err(F, ref), 1e-5,
                symmetric(F))
        if name in ("patch 2d channels_last", "patch 3d grouped", "patch resnet 3x3"):
            xb = x.to(torch.bfloat16)
            F = tk.patch_cov_update_(nan_like(tuple(ref.shape)), xb, ks, st, pad, dil, groups, ones=True)
            row(name + " bf16", f"x={tuple(shape)}", "native",
                rel_err(F, ref_patch(xb, ks, st, pad, dil, groups, True)), 1e-5, symmetric(F))
        if name in ("patch 2d NCHW", "patch depthwise", "patch 3d grouped"):
            ps = tk.patch_sum(x, ks, st, pad, dil, groups, ones=True)
            want = reference.patch_sum(x.double(), checks.conv_geometry(x, ks, st, pad, dil, groups), True,
                                       torch.float64)
            row("patch_sum " + name[6:], f"x={tuple(shape)}", "-", rel_err(ps, want), 1e-5)
    x = rnd(*((3, 4, 9, 8) if DRY else (16, 64, 32, 32))).contiguous(memory_format=torch.channels_last)
    F0 = ref_patch(x[:2], (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True).float()
    outs = []
    for _ in range(2):
        with tuning.override(patch=tuning.SymConfig(block_d=16 if DRY else 64, block_m=16 if DRY else 32, split=7)):
            outs.append(tk.patch_cov_update_(F0.clone(), x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, alpha=0.05,
                                             beta=0.95, ones=True))
    want = 0.95 * F0.double() + 0.05 * ref_patch(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, True)
    det = torch.equal(outs[0], outs[1])
    row(f"patch split=7 EMA (deterministic: {'yes' if det else 'NO'})", f"x={tuple(x.shape)} CL", "tf32x3",
        rel_err(outs[0], want) if det else float("inf"), 1e-5, symmetric(outs[0]))

    DG, Dd = (13, 21) if DRY else (37, 101)
    g, QG, lG, QA, lA = eig_inputs(1, DG, Dd)
    want = ref_eigen(g, QG, lG, QA, lA, 1e-3)
    for prec, tol in (("ieee", 1e-5), ("tf32x3", 1e-5), ("tf32", 5e-2)):
        with precision(prec):
            U = tk.eigen_precondition(g[0], QG[0], lG[0], QA[0], lA[0], 1e-3)
        row("eigen precondition", f"I={DG} D={Dd}", prec, rel_err(U, want[0]), tol)
    Bb, Ib, Db = (3, 5, 19) if DRY else (5, 16, 73)
    g, QG, lG, QA, lA = eig_inputs(Bb, Ib, Db)
    want = ref_eigen(g, QG, lG, QA, lA, 0.01)
    p = rnd(Bb, Ib, Db, dtype=torch.bfloat16)
    p0 = p.double()
    tk.eigen_precondition(g, QG, lG, QA, lA, 0.01, out=p, alpha=-0.1, beta=1.0)
    row("eigen fused p -= 0.1 U (bf16 param)", f"B={Bb} I={Ib} D={Db}", "tf32x3", rel_err(p, p0 - 0.1 * want), 1e-2)
    o = nan_like((Bb, Ib, Db))
    tk.eigen_precondition(g, QG, lG, QA, lA, 0.01, out=o, alpha=2.0, beta=0.0)
    row("eigen out, beta=0 on NaN buffer", f"B={Bb} I={Ib} D={Db}", "tf32x3", rel_err(o, 2 * want), 1e-5)
    Gi, Ai = QG @ QG.mT / 2, QA @ QA.mT / 3
    m = rnd(Bb, Ib, Db)
    m0 = m.double()
    tk.kron_precondition(g, Gi, Ai, out=m, alpha=1.0, beta=0.9)
    row("kron fused m = 0.9 m + U", f"B={Bb} I={Ib} D={Db}", "tf32x3",
        rel_err(m, 0.9 * m0 + Gi.double() @ g.double() @ Ai.double()), 1e-5)
    U = tk.kron_precondition(g.double(), Gi.double(), Ai.double())
    row("kron fp64", f"B={Bb} I={Ib} D={Db}", "ieee(fp64)", rel_err(U, Gi.double() @ g.double() @ Ai.double()), 1e-12)


# ---------------------------------------------------------------------------------------------------------------
# timing


def timed(t: Table, name: str, shape: str, run_triton, run_torch, flops: float, err_fn, note: str = "") -> None:
    if time.perf_counter() - T0 > ARGS.budget_s:
        t.add(name, shape, "-", "-", "-", "-", "-", "-", "skipped (time budget)")
        return
    ms_def = bench(run_triton)
    ms_tuned, cfg = ms_def, "heuristic"
    tune = not ARGS.no_autotune and not DRY and time.perf_counter() - T0 < 0.75 * ARGS.budget_s
    if tune:
        os.environ["KFC_TRITON_AUTOTUNE"] = "1"
        before = tuning.tuned_configs()
        try:
            run_triton()                       # the sweep happens on this call (scratch buffers), then cached
            ms_tuned = bench(run_triton)
            err = err_fn()                     # same shape key: checks the tuned config
        finally:
            os.environ.pop("KFC_TRITON_AUTOTUNE", None)
        new = {k: v for k, v in tuning.tuned_configs().items() if k not in before}
        cfg = "tuned " + ("; ".join(_cfg_str(v) for v in new.values()) or "(cached)")
    else:
        err = err_fn()
    ms_torch = bench(run_torch)
    best = min(ms_def, ms_tuned)
    t.add(name, shape, ms_def, ms_tuned, ms_torch, ms_torch / best, flops / best / 1e9, err, cfg + note)


def _cfg_str(c) -> str:
    if isinstance(c, tuning.SymConfig):
        return f"D{c.block_d}/M{c.block_m}/split{c.split}/w{c.num_warps}"
    return f"{c.block_m}x{c.block_n}x{c.block_k}/w{c.num_warps}/s{c.num_stages}"


def timing() -> None:
    t = table("Timing (ms, median of do_bench) vs the plain torch path",
              ["kernel", "shape", "triton heuristic", "triton tuned", "torch", "speedup (torch/best)",
               "TFLOP/s (best)", "max rel err", "config / notes"])

    # --- syrk: F <- 0.95 F + 0.05 X^T X
    Ms, Ds = (64, [24, 40]) if DRY else (8192, [1024, 2048, 4096])
    for D in Ds[:2] if ARGS.quick else Ds:
        X = rnd(Ms, D)
        F0 = ref_syrk(rnd(16, D), False).float()
        Ft, Fr = F0.clone(), F0.clone()
        ref = 0.95 * F0.double() + 0.05 * ref_syrk(X, False)
        chk = F0.clone()

        def err(X=X, chk=chk, F0=F0, ref=ref):
            chk.copy_(F0)
            return rel_err(tk.syrk_update_(chk, X, alpha=0.05, beta=0.95), ref)
        timed(t, "syrk fp32 (EMA)", f"M={Ms} D={D}", lambda X=X, Ft=Ft: tk.syrk_update_(Ft, X, alpha=0.05, beta=0.95),
              lambda X=X, Fr=Fr: Fr.addmm_(X.T, X, beta=0.95, alpha=0.05), 2.0 * Ms * D * D, err)
    D = Ds[0]
    X = rnd(Ms, D, dtype=torch.bfloat16)
    Ft, Fr = nan_like((D, D)), torch.zeros(D, D, device=DEV)
    timed(t, "syrk bf16 X", f"M={Ms} D={D}", lambda: tk.syrk_update_(Ft, X),
          lambda: Fr.addmm_(X.float().T, X.float(), beta=0.0), 2.0 * Ms * D * D,
          lambda: rel_err(tk.syrk_update_(nan_like((D, D)), X), ref_syrk(X, False)), " (torch: upcast + addmm)")
    Mg = 2048 if DRY else 131072
    for Dg in ([16] if DRY else [64, 256]):
        X = rnd(Mg, Dg)
        Ft, Fr = nan_like((Dg, Dg)), torch.zeros(Dg, Dg, device=DEV)
        timed(t, "syrk conv-G shape", f"M={Mg} D={Dg}", lambda X=X, Ft=Ft: tk.syrk_update_(Ft, X),
              lambda X=X, Fr=Fr: Fr.addmm_(X.T, X, beta=0.0), 2.0 * Mg * Dg * Dg,
              lambda X=X, Dg=Dg: rel_err(tk.syrk_update_(nan_like((Dg, Dg)), X), ref_syrk(X, False)))

    # --- patch covariance with bias coordinate: F <- 0.95 F + 0.05 sum pbar pbar^T
    layers = [(32, 64, 32, 3, 1), (128, 64, 32, 3, 1), (128, 128, 16, 3, 1), (128, 256, 8, 3, 1),
              (32, 256, 8, 3, 1), (128, 32, 16, 5, 2)]
    if DRY:
        layers = [(2, 3, 6, 3, 1), (2, 2, 5, 5, 2)]
    if ARGS.quick:
        layers = layers[1:3] + layers[-1:]
    variants = [(lay, "NCHW", torch.float32) for lay in layers]
    variants += [(layers[1 if len(layers) > 2 else 0], "channels_last", torch.float32),
                 (layers[1 if len(layers) > 2 else 0], "channels_last", torch.bfloat16)]
    for (N, C, S, k, p), layout, dt in variants:
        x = rnd(N, C, S, S, dtype=dt)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        Dp = C * k * k + 1
        T = S * S
        F0 = torch.eye(Dp, device=DEV)[None]
        Ft, Fr = F0.clone(), F0.clone()[0]
        ones = torch.ones(N * T, 1, device=DEV)

        def run_torch(x=x, Fr=Fr, ones=ones, k=k, p=p, C=C):
            cols = tF.unfold(x.float(), k, padding=p).transpose(1, 2).reshape(-1, C * k * k)
            A = torch.cat([cols, ones], 1)
            Fr.addmm_(A.T, A, beta=0.95, alpha=0.05)

        def err(x=x, k=k, p=p, F0=F0):
            ref = 0.95 * F0.double() + 0.05 * ref_patch(x, (k, k), (1, 1), (p,) * 4, (1, 1), 1, True)
            got = tk.patch_cov_update_(F0.clone(), x, (k, k), (1, 1), (p,) * 4, (1, 1), 1, alpha=0.05, beta=0.95,
                                       ones=True)
            return rel_err(got, ref)
        im2col_mb = N * T * Dp * 4 / 2**20
        timed(t, f"patch cov {layout} {str(dt)[6:]}", f"N={N} C={C} {S}x{S} k{k} p{p}",
              lambda x=x, Ft=Ft, k=k, p=p: tk.patch_cov_update_(Ft, x, (k, k), (1, 1), (p,) * 4, (1, 1), 1,
                                                                 alpha=0.05, beta=0.95, ones=True),
              run_torch, 2.0 * N * T * Dp * Dp, err, f" (im2col avoided: {im2col_mb:.0f} MiB)")

    # --- preconditioners, fused into a parameter update p <- p - lr U
    shapes = [(1, 64, 577), (1, 256, 2305), (1, 512, 4609), (32, 64, 577), (64, 32, 289)]
    if DRY:
        shapes = [(1, 9, 28), (4, 5, 19)]
    if ARGS.quick:
        shapes = shapes[1:2] + shapes[3:4]
    lr, dmp = 0.1, 1e-3
    for B, DG, D in shapes:
        g, QG, lG, QA, lA = eig_inputs(B, DG, D)
        pt, pr = rnd(B, DG, D), rnd(B, DG, D)

        def run_torch(g=g, QG=QG, lG=lG, QA=QA, lA=lA, pr=pr):
            U = QG @ ((QG.mT @ g @ QA) / (lG[:, :, None] * lA[:, None, :] + dmp)) @ QA.mT
            pr.add_(U, alpha=-lr)

        def err(g=g, QG=QG, lG=lG, QA=QA, lA=lA):
            return rel_err(tk.eigen_precondition(g, QG, lG, QA, lA, dmp), ref_eigen(g, QG, lG, QA, lA, dmp))
        timed(t, "eigen precondition, fused p -= lr U", f"B={B} I={DG} D={D}",
              lambda g=g, QG=QG, lG=lG, QA=QA, lA=lA, pt=pt: tk.eigen_precondition(g, QG, lG, QA, lA, dmp, out=pt,
                                                                                  alpha=-lr, beta=1.0),
              run_torch, 4.0 * B * DG * D * (DG + D), err)
    for B, DG, D in shapes[:3] if not DRY else shapes[:1]:
        g, QG, _, QA, _ = eig_inputs(B, DG, D)
        pt, pr = rnd(B, DG, D), rnd(B, DG, D)
        timed(t, "kron precondition, fused p -= lr U", f"B={B} I={DG} D={D}",
              lambda g=g, QG=QG, QA=QA, pt=pt: tk.kron_precondition(g, QG, QA, out=pt, alpha=-0.1, beta=1.0),
              lambda g=g, QG=QG, QA=QA, pr=pr: pr.add_(QG @ g @ QA, alpha=-0.1), 2.0 * B * DG * D * (DG + D),
              lambda g=g, QG=QG, QA=QA: rel_err(tk.kron_precondition(g, QG, QA),
                                                QG.double() @ g.double() @ QA.double()))


def main() -> None:
    dev = "CPU (TRITON_INTERPRET=1, dry run: tiny sizes, timings meaningless)" if DRY else \
        torch.cuda.get_device_name(DEV)
    HEADER.extend([f"- device: {dev}", f"- torch {torch.__version__}, triton {triton.__version__}",
                   "- torch matmuls: allow_tf32=False; Triton fp32 dots: tf32x3 unless a row says otherwise",
                   "- TFLOP/s counts the useful GEMM-equivalent flops (2·M·D² for the symmetric kernels, "
                   "although only the upper triangle is computed)"])
    print("# gpu_check\n\n" + "\n".join(HEADER), flush=True)
    torch.manual_seed(0)
    correctness()
    timing()
    fails = sum(r[-1] == "FAIL" for r in TABLES[0].rows)
    summary = f"\n{fails} correctness check(s) failed; total {time.perf_counter() - T0:.0f} s"
    HEADER.append(f"- result: {fails} correctness failure(s); wall time {time.perf_counter() - T0:.0f} s")
    _write_md()
    print(summary, flush=True)
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
