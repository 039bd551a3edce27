"""The KFC optimizer (``KFC``) and its pieces.

Options, model routing, parameter groups, the update rules (``rules``, applied to the groups by ``updates``) and
exact Fisher products (``fvp``). The curvature itself is
estimated by ``curvature.estimator``; inverses and preconditioning live in ``kfc_compile.curvature``.
"""
from kfc_compile.curvature.decompositions import DecompositionError, SingularFactorError
from kfc_compile.curvature.health import Health
from kfc_compile.curvature.memory import MemoryBudgetError
from kfc_compile.optim.kfc import KFC
from kfc_compile.optim.safety import TrainingDivergedError

__all__ = ["KFC", "DecompositionError", "Health", "MemoryBudgetError", "SingularFactorError", "TrainingDivergedError"]
