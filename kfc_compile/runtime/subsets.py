"""How many leading examples of a batch feed the statistics (``stats_fraction``) and the exact Fisher products.

One rule for both subsets, used by the in-pass capture (``runtime/state.py``) and by the separate passes on the
step's recorded micro-batches (``curvature/subset.py``): ceil(fraction·N) examples, at least 2 (train-mode
BatchNorm needs more than one), and for the defaults (:func:`default_share`) at least :data:`MIN_STATS_SUBSET` for
the statistics and :data:`MIN_CLIP_SUBSET` for the exact ν. A fraction alone leaves a small batch a handful of
examples — 1/8 of 16 is 2 for Ω and Γ, 1/4 is 4 for the trust region's ν — and the noisy ν made the default
learning-rate grid diverge at batch 16 and 32 (docs/benchmarks.md, "Small batches"; docs/algorithm.md §4.3). The
statistics need fewer: with the factored ν (the default) a floor of 16 trains as a floor of 32 at batch 16, 32 and
128 and costs half the statistics pass at batch 128.
"""
from __future__ import annotations

import math

#: the fewest examples the default statistics subset holds, where the batch has them (docs/algorithm.md §4.3)
MIN_STATS_SUBSET = 16
#: the fewest examples the default subset of the exact ν's Fisher products holds, where the batch has them
MIN_CLIP_SUBSET = 32


class Share(float):
    """A fraction of the batch whose leading subset holds at least ``floor`` examples where the batch has them.

    A float everywhere a fraction is read (comparisons, arithmetic); only :func:`subset_size` reads the floor.
    A plain float is a share with the floor 2.
    """

    floor: int

    def __new__(cls, fraction: float, floor: int) -> Share:
        """The share ``fraction`` with the floor ``floor``."""
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 2:
            raise ValueError(f"a subset floor must be an integer >= 2, got {floor!r}")
        share = super().__new__(cls, fraction)
        share.floor = floor
        return share

    def __getnewargs__(self) -> tuple[float, int]:
        return float(self), self.floor

    def __repr__(self) -> str:
        return f"Share({float(self)!r}, floor={self.floor})"


def default_share(fraction: float, floor: int) -> Share:
    """A default subset's share: ``fraction`` of the batch, at least ``floor`` examples."""
    return Share(fraction, floor)


def subset_size(n: int, fraction: float) -> int:
    """Examples in a leading subset of a batch of n: min(n, max(ceil(fraction·n), floor)).

    ``floor`` is a :class:`Share`'s own (the defaults': :data:`MIN_STATS_SUBSET`,
    :data:`MIN_CLIP_SUBSET`), else 2: a subset of a batch of n ≥ 2
    has at least 2 examples, which train-mode BatchNorm needs.
    """
    return min(n, max(math.ceil(fraction * n), getattr(fraction, "floor", 2)))
