"""What ``transform`` found: the layers under KFC, the parameters left out (with reasons), the black boxes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(eq=False)
class KFCLayer:
    """One weight parameter under KFC, with all its call sites.

    ``name`` is the module's qualified name, or for a functional call the weight's qualified name without
    ``.weight``. ``a_dim``/``g_dim`` are the sizes of Ω (bias coordinate included) and Γ per group.
    """

    name: str
    kind: str
    weight: torch.nn.Parameter
    bias: torch.nn.Parameter | None
    a_dim: int
    g_dim: int
    groups: int
    uses: int
    sites: list = field(default_factory=list, repr=False)

    @property
    def numel(self) -> int:
        """Parameter elements of the layer (weight and bias)."""
        return self.weight.numel() + (self.bias.numel() if self.bias is not None else 0)


@dataclass(frozen=True)
class Uncovered:
    """A trainable parameter left to the fallback optimizer, and why."""

    name: str
    shape: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class BlackBox:
    """A submodule that could not be traced; kept as an opaque call, its conv/linear modules still instrumented."""

    name: str
    reason: str


@dataclass(eq=False)
class KFCInfo:
    """Attached to a transformed model as ``tm.kfc``."""

    approx: str
    layers: list[KFCLayer]
    uncovered: list[Uncovered]
    black_boxes: list[BlackBox]
    frozen: list[str]
    state: object  # CaptureState
    total_numel: int  # trainable parameter elements

    @property
    def covered_numel(self) -> int:
        """Trainable parameter elements under KFC (the layers' weights and biases)."""
        return sum(layer.numel for layer in self.layers)

    @property
    def coverage(self) -> float:
        """Share of trainable parameter elements under KFC."""
        return self.covered_numel / self.total_numel if self.total_numel else 0.0

    def layer(self, name: str) -> KFCLayer:
        """The layer named ``name``; a KeyError listing the layer names when there is none."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no KFC layer named {name!r}; layers: {[layer.name for layer in self.layers]}")
