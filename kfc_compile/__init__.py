"""kfc_compile: KFC / K-FAC natural-gradient training for any PyTorch model, as a graph pass.

Public API (docs/architecture.md): ``transform``, ``report``, ``curvature``, ``KFC``, ``compile_step``; ``Factors``
is the (Ω, Γ) record. ``torch.compile(model, backend="kfc")`` is registered through an entry point.
"""
from kfc_compile.curvature.estimate import curvature
from kfc_compile.curvature.factors import Factors
from kfc_compile.curvature.losses import MSE, BCEWithLogits, CrossEntropy
from kfc_compile.optim import KFC, SingularFactorError
from kfc_compile.report import report
from kfc_compile.step import compile_step
from kfc_compile.transform import InvalidModelError, transform

__all__ = ["BCEWithLogits", "CrossEntropy", "Factors", "InvalidModelError", "KFC", "MSE", "SingularFactorError",
           "compile_step", "curvature", "report", "transform"]
__version__ = "0.1.0"
