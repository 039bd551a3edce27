"""Compiled training: the ``kfc`` torch.compile backend (``backend.py``), its compile-clean capture op
(``ops.py``, also used by ``capture.tap`` inside dynamo graphs), the attention decomposition it uses (``mha.py``)
and ``compile_step`` (``step.py``). The backend names load lazily (``capture`` imports ``ops`` from here)."""
__all__ = ["CompiledKFCInfo", "kfc_backend", "registry_for"]


def __getattr__(name: str):
    if name in __all__:
        from kfc_compile.compile import backend

        return getattr(backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
