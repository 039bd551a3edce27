"""The one place that decides, per call, whether a kernel runs in Triton or as its torch reference.

``KFC_KERNELS`` (read at every call):

* ``auto`` (default): CUDA tensors -> Triton, anything else -> torch reference; if triton cannot be imported,
  torch everywhere.
* ``triton``: always Triton. CPU tensors need ``TRITON_INTERPRET=1`` set before the kernel modules are first
  imported (triton decides interpreter vs compiler when ``@triton.jit`` runs); otherwise a RuntimeError says so.
* ``torch``: always the reference.

The Triton modules are imported lazily, on the first call that needs them, so importing ``triton_kernels`` (or
``kfc_compile``) never decorates kernels and never fixes the interpreter choice early. The kernels call only
``triton.language`` builtins, never its own ``@jit`` helpers (``tl.zeros``, ``tl.cdiv``, ``tl.sum``, ...), which are
built when ``triton`` itself is imported: so it does not matter whether something imported triton before the
variable was set (a test checks this).

:func:`direct` decides, per call, whether an op may skip the ``torch.library`` dispatcher (``ops.call``): only in
plain eager execution, where the dispatcher would do nothing but call the op's implementation.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator, Sequence
from types import ModuleType

import torch
from torch import Tensor
from torch._C._functorch import peek_interpreter_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode

log = logging.getLogger(__name__)

MODES = ("auto", "triton", "torch")
_KERNEL_MODULES = ("syrk", "patch_cov", "precondition")
_triton_ok: bool | None = None
_triton_err: str = ""
_warned: set[str] = set()
_direct_ok = True  # False inside through_ops()


def mode() -> str:
    """Current ``KFC_KERNELS`` value, validated."""
    m = os.environ.get("KFC_KERNELS", "auto").strip().lower() or "auto"
    if m not in MODES:
        raise ValueError(f"KFC_KERNELS={m!r} is not one of {MODES}")
    return m


def triton_available() -> bool:
    """Whether ``import triton`` works (cached)."""
    global _triton_ok, _triton_err
    if _triton_ok is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _triton_ok = True
        except Exception as e:  # ImportError, or a broken install raising something else
            _triton_ok, _triton_err = False, f"{type(e).__name__}: {e}"
    return _triton_ok


def interpreter_requested() -> bool:
    """Whether triton would build interpreted kernels now (``TRITON_INTERPRET=1``)."""
    import triton
    return bool(triton.knobs.runtime.interpret)


def kernel_module(name: str) -> ModuleType:
    """Import (lazily) and return ``triton_kernels.<name>``."""
    if name not in _KERNEL_MODULES:
        raise KeyError(name)
    return importlib.import_module(f"{__package__}.{name}")


def kernels_interpreted(mod: ModuleType) -> bool:
    """Whether the module's ``@triton.jit`` kernels were built for the interpreter."""
    from triton.runtime.interpreter import InterpretedFunction
    return all(isinstance(k, InterpretedFunction) for k in mod.KERNELS)


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(msg)


def backend(kernel: str, *tensors: Tensor) -> str:
    """``"triton"`` or ``"torch"`` for this call of ``kernel`` (a module in ``_KERNEL_MODULES``) on ``tensors``.

    Raises RuntimeError when ``KFC_KERNELS=triton`` cannot be honoured.
    """
    m = mode()
    if m == "torch":
        return "torch"
    devices = {t.device.type for t in tensors}
    if m == "auto":
        if devices != {"cuda"}:
            return "torch"
        if not triton_available():
            _warn_once("no-triton", f"triton cannot be imported ({_triton_err}); using torch reference kernels")
            return "torch"
        return "triton"
    # m == "triton"
    if not triton_available():
        raise RuntimeError(f"KFC_KERNELS=triton but triton cannot be imported: {_triton_err}")
    if not devices <= {"cuda", "cpu"}:
        raise RuntimeError(f"KFC_KERNELS=triton supports CUDA tensors (or CPU under TRITON_INTERPRET=1), "
                           f"got devices {sorted(devices)}")
    mod = kernel_module(kernel)
    interpreted = kernels_interpreted(mod)
    if "cpu" in devices and not interpreted:
        if interpreter_requested():
            raise RuntimeError(
                f"KFC_KERNELS=triton on CPU tensors: TRITON_INTERPRET=1 is set now, but the Triton kernels in "
                f"{mod.__name__} were already built for the GPU compiler (the variable was set after they were "
                f"imported). Set TRITON_INTERPRET=1 before anything imports {mod.__name__}.")
        raise RuntimeError(
            "KFC_KERNELS=triton on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before the kernels are imported, or use CUDA tensors, or KFC_KERNELS=auto/torch.")
    if "cuda" in devices and interpreted:
        _warn_once("interp-cuda", "Triton kernels are running under TRITON_INTERPRET=1 on CUDA tensors (slow)")
    return "triton"


def direct(args: Sequence[object]) -> bool:
    """Whether an op on ``args`` may run its implementation as a plain Python call, without the dispatcher.

    Only in plain eager execution: not while dynamo compiles (the graph must hold the opaque op), not under a
    dispatch mode (fake tensors, ``make_fx``'s proxy mode, functionalization) or a torch-function mode, not under a
    functorch transform (``vmap``, ``grad``, ``jvp``), and only when every tensor argument is a plain
    ``torch.Tensor`` (no subclass: FakeTensor, FunctionalTensor, DTensor, ``nn.Parameter``) that autograd would not
    record (the ops have no autograd formula: the dispatcher's handling of such a call is kept). There the dispatcher
    only calls the implementation, so both paths give identical results.
    """
    if not _direct_ok or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None \
            or peek_interpreter_stack() is not None or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for a in args:
        if isinstance(a, Tensor) and (type(a) is not Tensor or (grad and a.requires_grad)):
            return False
    return True


@contextlib.contextmanager
def through_ops() -> Iterator[None]:
    """Within the block every op goes through ``torch.ops.kfc`` (the dispatcher), as before :func:`direct` existed.

    For tests (both paths agree) and benchmarks (what the dispatcher costs).
    """
    global _direct_ok
    previous, _direct_ok = _direct_ok, False
    try:
        yield
    finally:
        _direct_ok = previous
