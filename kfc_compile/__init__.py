"""kfc_compile: KFC / K-FAC natural-gradient training for any PyTorch model, as a graph pass.

Public API (docs/architecture.md): ``transform``, ``report``, ``curvature``, ``KFC``, ``compile_step``; ``Factors``
is the (Ω, Γ) record, ``Health`` the fault record ``KFC.health``; the errors a run can end with are
``SingularFactorError``, ``DecompositionError``, ``TrainingDivergedError`` and ``MemoryBudgetError``.
``torch.compile(model, backend="kfc")`` is registered through an entry point.
"""
from kfc_compile.curvature.estimate import curvature
from kfc_compile.curvature.factors import Factors
from kfc_compile.curvature.losses import MSE, BCEWithLogits, CrossEntropy
from kfc_compile.optim import (
    KFC,
    DecompositionError,
    Health,
    MemoryBudgetError,
    SingularFactorError,
    TrainingDivergedError,
)
from kfc_compile.report import report
from kfc_compile.step import compile_step
from kfc_compile.transform import InvalidModelError, transform

__all__ = ["BCEWithLogits", "CrossEntropy", "DecompositionError", "Factors", "Health", "InvalidModelError", "KFC",
           "MSE", "MemoryBudgetError", "SingularFactorError", "TrainingDivergedError", "compile_step", "curvature",
           "report", "transform"]
__version__ = "0.1.0"
