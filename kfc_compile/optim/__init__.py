"""The KFC optimizer (``KFC``) and its exact Fisher products (``fvp``); the inverses and the preconditioning live
in ``kfc_compile.curvature`` (``inverses``, ``precondition``)."""
from kfc_compile.curvature.decompositions import SingularFactorError
from kfc_compile.optim.kfc import KFC

__all__ = ["KFC", "SingularFactorError"]
