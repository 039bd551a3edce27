"""Training-loss plots (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os
from collections.abc import Sequence

COLORS = {"kfc": "tab:red", "sgd": "tab:blue", "adam": "tab:green"}


def plot_curves(curves: Sequence[tuple[str, str, list, list, list]], path: str, title: str,
                target: float | None = None, bands: Sequence[tuple[str, list, list, list]] = ()) -> str:
    """Training loss against steps (left) and seconds (right), one line per curve, saved to ``path``.

    ``curves``: (optimizer key, label, steps, seconds, losses). ``bands``: optional (optimizer key, steps,
    low, high) shaded ranges on the step plot (e.g. min/max over seeds).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2))
    for key, label, steps, secs, losses in curves:
        c = COLORS.get(key)
        ax_s.plot(steps, losses, label=label, color=c, lw=1.6)
        ax_t.plot(secs, losses, label=label, color=c, lw=1.6)
    for key, steps, lo, hi in bands:
        ax_s.fill_between(steps, lo, hi, color=COLORS.get(key), alpha=0.15, lw=0)
    for ax, xl in ((ax_s, "steps"), (ax_t, "seconds (training only)")):
        if target is not None:
            ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:g}")
        ax.set_yscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("training loss")
        ax.grid(True, which="both", alpha=0.3)
    ax_s.legend()
    fig.suptitle(title)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
