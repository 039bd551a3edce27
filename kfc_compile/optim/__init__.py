"""The KFC optimizer (``KFC``) and its pieces: options, model routing, parameter groups, the update rules
(``rules``, applied to the groups by ``updates``), preconditioning (``precondition``) and exact Fisher products
(``fvp``). The curvature itself is estimated by ``curvature.estimator``."""
from kfc_compile.optim.kfc import KFC
from kfc_compile.optim.precondition import SingularFactorError

__all__ = ["KFC", "SingularFactorError"]
