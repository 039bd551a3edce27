"""Kernel tests run the Triton kernels on CPU through the Triton interpreter (``TRITON_INTERPRET=1``).

When triton decides interpreter vs GPU compiler: at ``@triton.jit`` decoration time, reading ``TRITON_INTERPRET``
through ``triton.knobs`` (triton 3.x), not at ``import triton``. ``triton_kernels`` imports its kernel modules
lazily, on the first Triton call. So:

* the variable is set here, at conftest import, before any test in this directory imports a kernel module;
* the variable is scoped: a module-scoped fixture sets it for each test module here and restores the previous
  value afterwards, and drops the kernel modules from ``sys.modules`` on both sides. Other test directories (which
  may run inductor's own Triton kernels on a GPU machine) never see it, and kernels built earlier in the session
  for the GPU compiler are rebuilt for the interpreter instead of failing;
* a guard turns the one unrecoverable case (triton's interpret knob pinned so the variable is ignored) into a clear
  error.
"""
from __future__ import annotations

import os
import sys

import pytest

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"          # before anything in this directory imports a kernel module

_KERNEL_MODULES = ("syrk", "patch_cov", "precondition", "symstore")


def _purge_kernel_modules() -> None:
    """Forget built kernels so the next Triton call re-imports (re-decorates) them under the current variable."""
    pkg = sys.modules.get("triton_kernels")
    for name in _KERNEL_MODULES:
        sys.modules.pop(f"triton_kernels.{name}", None)
        if pkg is not None and name in vars(pkg):
            delattr(pkg, name)


def _guard() -> None:
    if "triton" not in sys.modules:
        return
    import triton
    if not triton.knobs.runtime.interpret:
        raise pytest.UsageError(
            "tests/kernels: TRITON_INTERPRET=1 is set but triton ignores it (triton.knobs.runtime.interpret was "
            "pinned by code imported earlier in this session); the Triton kernels cannot run on CPU. Run the kernel "
            "tests on their own, e.g. `TRITON_INTERPRET=1 python -m pytest tests/kernels`.")


def _restore() -> None:
    if _PREVIOUS is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS


@pytest.fixture(autouse=True, scope="module")
def _triton_interpreter():
    os.environ["TRITON_INTERPRET"] = "1"
    _guard()
    _purge_kernel_modules()
    yield
    _purge_kernel_modules()
    _restore()


def pytest_collection_finish(session) -> None:
    """Collection is over: stop exporting the variable to tests outside this directory (the fixture re-sets it)."""
    _restore()


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
