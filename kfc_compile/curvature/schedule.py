"""Which steps collect statistics and which recompute inverses: the periods and the warm start (docs/algorithm.md §4.3).

Step k is 1-based. Statistics: k ≤ ``warmup`` or (k − 1) mod ``stats_every`` = 0 (so step 1 always is). Inverses:
k ≤ max(3, ``warmup``) or k mod ``inverse_every`` = 0. The warm start makes the first updates use factors that
average several batches (a single batch's factors, estimated from a small subset, are mostly noise) and inverses
that follow them, at the cost of full statistics/inverse steps only while k ≤ ``warmup``.
"""
from __future__ import annotations

INVERSE_START = 3  # inverses are always recomputed at steps 1-3 (K-FAC's schedule)


def statistics_due(k: int, stats_every: int, warmup: int = 0) -> bool:
    """Whether step k (1-based) is a statistics step: a warm-start step (k ≤ warmup) or a period's first."""
    return k <= warmup or (k - 1) % stats_every == 0


def inverses_due(k: int, inverse_every: int, warmup: int = 0) -> bool:
    """Whether step k (1-based) recomputes the inverses: k ≤ max(3, warmup) or a multiple of ``inverse_every``."""
    return k <= max(INVERSE_START, warmup) or k % inverse_every == 0
