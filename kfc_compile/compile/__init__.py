"""Compiled training: the ``kfc`` torch.compile backend (``backend.py``), its compile-clean capture op
(``ops.py``), the attention decomposition it uses (``mha.py``) and ``compile_step`` (``step.py``)."""
from kfc_compile.compile.backend import CompiledKFCInfo, kfc_backend, registry_for

__all__ = ["CompiledKFCInfo", "kfc_backend", "registry_for"]
