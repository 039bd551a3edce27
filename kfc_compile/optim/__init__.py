"""The KFC optimizer (``KFC``) and its pieces.

Options, model routing, parameter groups, the update rules (``rules``, applied to the groups by ``updates``) and
exact Fisher products (``fvp``). The curvature itself is
estimated by ``curvature.estimator``; inverses and preconditioning live in ``kfc_compile.curvature``.
"""
from kfc_compile.curvature.decompositions import SingularFactorError
from kfc_compile.optim.kfc import KFC

__all__ = ["KFC", "SingularFactorError"]
