"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

triton decides between interpreter and compiler when ``@triton.jit`` decorates a kernel, reading
``TRITON_INTERPRET`` at that moment (triton 3.x reads it through ``triton.knobs`` lazily). ``triton_kernels``
imports its kernel modules lazily, so setting the variable here is enough as long as no kernel module was built
before. The guard below turns the ways this can go wrong into one clear error instead of confusing failures.
"""
from __future__ import annotations

import os
import sys

import pytest

_PRESET = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

_KERNEL_MODULES = ("triton_kernels.syrk", "triton_kernels.patch_cov", "triton_kernels.precondition")


def _guard() -> None:
    if "triton" in sys.modules and _PRESET != "1":
        import triton
        if not triton.knobs.runtime.interpret:
            raise pytest.UsageError(
                "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1, and it does not "
                "see the variable now (triton.knobs.runtime.interpret was pinned). Run with TRITON_INTERPRET=1 in "
                "the environment.")
    for name in _KERNEL_MODULES:
        mod = sys.modules.get(name)
        if mod is None:
            continue
        from triton.runtime.interpreter import InterpretedFunction
        if not all(isinstance(k, InterpretedFunction) for k in mod.KERNELS):
            raise pytest.UsageError(
                f"{name} was imported (its Triton kernels built for the GPU compiler) before "
                "tests/kernels/conftest.py set TRITON_INTERPRET=1. Run with TRITON_INTERPRET=1 in the environment.")


_guard()


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch) -> str:
    """Run a test once per backend, forcing it with KFC_KERNELS."""
    monkeypatch.setenv("KFC_KERNELS", request.param)
    return request.param


@pytest.fixture
def use(monkeypatch):
    """``use("triton")`` switches KFC_KERNELS inside a test."""
    def _set(mode: str) -> None:
        monkeypatch.setenv("KFC_KERNELS", mode)
    return _set
