"""Dispatch (KFC_KERNELS), input validation, torch.compile integration and autocast behaviour."""
from __future__ import annotations

import pytest
import torch

import triton_kernels as tk
from triton_kernels import dispatch, reference

import kernel_refs as R


def test_modes_choose_backend(use):
    x = torch.randn(3, 3)
    use("auto")
    assert dispatch.backend("syrk", x) == "torch"          # CPU tensors -> reference
    use("torch")
    assert dispatch.backend("syrk", x) == "torch"
    use("triton")
    assert dispatch.backend("syrk", x) == "triton"          # CPU works here because TRITON_INTERPRET=1
    use("bogus")
    with pytest.raises(ValueError, match="KFC_KERNELS"):
        dispatch.backend("syrk", x)


def test_triton_mode_never_calls_reference(use, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("reference called in triton mode")
    for name in ("syrk_update_", "patch_cov_update_", "patch_sum", "eigen_precondition", "kron_precondition"):
        monkeypatch.setattr(reference, name, boom)
    use("triton")
    F = torch.empty(4, 4)
    tk.syrk_update_(F, torch.randn(5, 3), ones=True)
    x = torch.randn(1, 2, 4, 4)
    tk.patch_cov_update_(torch.empty(2, 5, 5), x, (2, 2), (1, 1), (0, 0, 0, 0), (1, 1), 2, ones=True)
    tk.patch_sum(x, (2, 2), (1, 1), (0, 0, 0, 0), (1, 1), 1)
    g = torch.randn(3, 4)
    tk.eigen_precondition(g, torch.eye(3), torch.ones(3), torch.eye(4), torch.ones(4), 0.1)
    tk.kron_precondition(g, torch.eye(3), torch.eye(4), out=torch.zeros(3, 4), alpha=2.0)
    use("auto")
    with pytest.raises(AssertionError, match="reference called"):
        tk.syrk_update_(F, torch.randn(5, 3), ones=True)


def test_triton_mode_on_cpu_without_interpreter_is_a_clear_error(use, monkeypatch):
    use("triton")
    monkeypatch.setattr(dispatch, "kernels_interpreted", lambda mod: False)
    monkeypatch.setattr(dispatch, "interpreter_requested", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        tk.syrk_update_(torch.empty(3, 3), torch.randn(4, 3))
    monkeypatch.setattr(dispatch, "interpreter_requested", lambda: True)
    with pytest.raises(RuntimeError, match="already built for the GPU compiler"):
        tk.syrk_update_(torch.empty(3, 3), torch.randn(4, 3))


def test_missing_triton(use, monkeypatch):
    monkeypatch.setattr(dispatch, "_triton_ok", False)
    monkeypatch.setattr(dispatch, "_triton_err", "ImportError: no module named triton")
    use("auto")
    F = tk.syrk_update_(torch.empty(3, 3), torch.randn(4, 3))       # falls back silently on CPU
    assert torch.equal(F, F.mT)
    use("triton")
    with pytest.raises(RuntimeError, match="cannot be imported"):
        tk.syrk_update_(torch.empty(3, 3), torch.randn(4, 3))


def test_triton_mode_rejects_other_devices(use):
    use("triton")
    with pytest.raises(RuntimeError, match="meta"):
        dispatch.backend("syrk", torch.empty(3, 3, device="meta"))


# ---------------------------------------------------------------------------------------------------------------
# validation


@pytest.mark.parametrize("call,match", [
    (lambda: tk.syrk_update_(torch.empty(4, 4), torch.randn(5, 3)), r"must be \(3, 3\)"),
    (lambda: tk.syrk_update_(torch.empty(4, 4), torch.randn(5, 4), ones=True), r"must be \(5, 5\)"),
    (lambda: tk.syrk_update_(torch.empty(2, 3, 3), torch.randn(3, 5, 3)), "batch mismatch"),
    (lambda: tk.syrk_update_(torch.empty(3, 3), torch.randn(2, 5, 3)), "dims"),
    (lambda: tk.syrk_update_(torch.empty(3, 3), torch.randn(5)), "X must be"),
    (lambda: tk.syrk_update_(torch.empty(3, 3, dtype=torch.bfloat16), torch.randn(5, 3)), "F has dtype"),
    (lambda: tk.syrk_update_(torch.empty(3, 3), torch.randint(0, 3, (5, 3))), "X has dtype"),
    (lambda: tk.patch_cov_update_(torch.empty(1, 9, 9), torch.randn(1, 3, 4, 4), (2, 2), (1, 1), (0, 0, 0, 0),
                                  (1, 1), 2), "does not divide"),
    (lambda: tk.patch_cov_update_(torch.empty(1, 9, 9), torch.randn(1, 2, 4, 4), (2, 2), (1, 1), (0, 0),
                                  (1, 1), 1), "padding must have 4 entries"),
    (lambda: tk.patch_cov_update_(torch.empty(1, 9, 9), torch.randn(1, 2, 4, 4), (2,), (1, 1), (0, 0, 0, 0),
                                  (1, 1), 1), "kernel_size must have 2"),
    (lambda: tk.patch_cov_update_(torch.empty(1, 8, 8), torch.randn(1, 2, 4, 4), (2, 2), (1, 1), (0, 0, 0, 0),
                                  (1, 1), 1, ones=True), r"expected \(groups, Dg', Dg'\) = \(1, 9, 9\)"),
    (lambda: tk.patch_cov_update_(torch.empty(1, 9, 9), torch.randn(1, 2, 2, 2), (3, 3), (1, 1), (0, 0, 0, 0),
                                  (1, 1), 1), "smaller than the dilated kernel"),
    (lambda: tk.patch_cov_update_(torch.empty(1, 9, 9), torch.randn(1, 2, 4, 4), (2, 2), (0, 1), (0, 0, 0, 0),
                                  (1, 1), 1), "stride entries must be >= 1"),
    (lambda: tk.patch_sum(torch.randn(2, 4), (1,), (1,), (0, 0), (1,), 1), "spatial dims"),
    (lambda: tk.eigen_precondition(torch.randn(3, 4), torch.eye(3), torch.ones(4), torch.eye(4), torch.ones(4), 0.1),
     r"lG has shape \(4,\), expected \(3,\)"),
    (lambda: tk.eigen_precondition(torch.randn(2, 3, 4), torch.eye(3), torch.ones(3), torch.eye(4), torch.ones(4),
                                   0.1), "QG must have 3 dims"),
    (lambda: tk.kron_precondition(torch.randn(3, 4), torch.eye(3), torch.eye(5)), r"Ainv has shape \(5, 5\)"),
    (lambda: tk.kron_precondition(torch.randn(3, 4), torch.eye(3), torch.eye(4), out=torch.empty(4, 3)),
     r"out has shape \(4, 3\)"),
])
@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_bad_input_is_a_clear_value_error(use, mode, call, match):
    use(mode)
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------------------------------------------------
# torch.compile: opaque custom ops, no graph break


def _step(F, G, x, rows, grad, QG, lG, QA, lA, out):
    tk.patch_cov_update_(F, x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, alpha=0.5, beta=0.5, ones=True)
    tk.syrk_update_(G, rows, alpha=1.0, beta=0.9)
    s = tk.patch_sum(x, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, ones=True)
    U = tk.eigen_precondition(grad, QG, lG, QA, lA, 0.1)
    tk.kron_precondition(grad, QG, QA, out=out, alpha=-0.1, beta=1.0)
    return U.sum() + s.sum()


def _step_args():
    torch.manual_seed(0)
    DG, D = 5, 19
    return (R.random_sym((1, 19, 19), torch.float32), R.random_sym((5, 5), torch.float32), torch.randn(2, 2, 4, 4),
            torch.randn(7, 5), torch.randn(DG, D), torch.eye(DG), torch.rand(DG), torch.eye(D), torch.rand(D),
            torch.randn(DG, D))


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_compile_fullgraph_no_break(use, mode):
    use(mode)
    eager = _step_args()
    r_eager = _step(*eager)
    explain = torch._dynamo.explain(_step)(*_step_args())
    assert explain.graph_break_count == 0 and explain.graph_count == 1
    torch._dynamo.reset()
    compiled = _step_args()
    r_comp = torch.compile(_step, backend="aot_eager", fullgraph=True)(*compiled)
    torch._dynamo.reset()
    assert torch.allclose(r_eager, r_comp, rtol=1e-5)
    for a, b in zip(eager, compiled, strict=True):        # the in-place updates were written back
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_fake_impl_catches_bad_shapes_while_tracing():
    def f(F, X):
        tk.syrk_update_(F, X)
        return F
    with pytest.raises(Exception, match=r"must be \(3, 3\)"):
        torch.compile(f, backend="aot_eager", fullgraph=True)(torch.empty(4, 4), torch.randn(5, 3))
    torch._dynamo.reset()


def test_statistics_ignore_autocast(backend):
    """Under CPU bf16 autocast the factor still accumulates in fp32 from the fp32 activations."""
    X = torch.randn(40, 12)
    F = torch.empty(13, 13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tk.syrk_update_(F, X, ones=True)
        U = tk.kron_precondition(X[:5], torch.eye(5), F[:12, :12])
    assert F.dtype == torch.float32 and U.dtype == torch.float32
    assert R.rel_err(F, R.syrk(X, True)) < 1e-5
    assert R.rel_err(U, R.kron(X[:5], torch.eye(5), R.syrk(X, True)[:12, :12])) < 1e-5


def test_kernels_use_only_triton_builtins():
    """Kernels call no triton.language helper that is itself a @jit function (tl.zeros, tl.cdiv, tl.sum, ...).

    Those are built when triton is imported, so if anything imported triton before TRITON_INTERPRET=1 was set they
    are compiler-only and the interpreter cannot call them from our kernels.
    """
    import inspect
    import re

    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    stdlib_jit = {n for n in dir(tl) if isinstance(getattr(tl, n), (JITFunction, InterpretedFunction))}
    assert {"zeros", "cdiv", "sum"} <= stdlib_jit        # the check itself sees them
    for name in ("syrk", "patch_cov", "precondition", "symstore"):
        src = inspect.getsource(dispatch.kernel_module(name) if name != "symstore"
                                else __import__("triton_kernels.symstore", fromlist=["x"]))
        used = set(re.findall(r"\btl\.(\w+)\(", src))
        assert not used & stdlib_jit, f"{name} uses jit-defined tl helpers {sorted(used & stdlib_jit)}"
