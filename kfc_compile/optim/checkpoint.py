"""What ``KFC.load_state_dict`` checks before it changes anything: the entry's version, layers and layouts.

A state_dict that does not fit the optimizer raises ``ValueError`` naming the mismatch, so a failed load leaves the
optimizer as it was.
"""
from __future__ import annotations

from collections.abc import Sequence

STATE_VERSION = 1


def checked_entry(state_dict: dict, states: Sequence, damping_method: str) -> dict:
    """The ``"kfc"`` entry of a ``KFC.state_dict()``, checked against this optimizer's layer states.

    Args:
        state_dict: what ``KFC.state_dict()`` returned (possibly on another process or world size).
        states: the optimizer's ``LayerState`` list.
        damping_method: the optimizer's damping method (its inverses are of that kind).

    Raises:
        ValueError: not a KFC state_dict, another version, other layers, another damping method, or factors of
            another layout.
    """
    kfc = state_dict.get("kfc")
    if kfc is None:
        raise ValueError("not a KFC state_dict (no 'kfc' entry)")
    if kfc.get("version") != STATE_VERSION:
        raise ValueError(f"unsupported KFC state_dict version {kfc.get('version')!r}")
    saved_names = [entry["name"] for entry in kfc["layers"]]
    names = [s.layer.name for s in states]
    if saved_names != names:
        raise ValueError(f"state_dict layers {saved_names} do not match this optimizer's {names}")
    if kfc["damping_method"] != damping_method:
        raise ValueError(f"state_dict was saved with damping_method={kfc['damping_method']!r}, "
                         f"this optimizer uses {damping_method!r}")
    for s, entry in zip(states, kfc["layers"], strict=True):
        s.check(entry)
    return kfc
