"""The KFC optimizer (``KFC``) and its pieces: preconditioning (``precondition``) and exact Fisher products
(``fvp``)."""
from kfc_compile.optim.kfc import KFC
from kfc_compile.optim.precondition import SingularFactorError

__all__ = ["KFC", "SingularFactorError"]
