"""The live registry of a model compiled with the ``kfc`` backend, and which registry owns which parameter.

Layers found when dynamo compiles (first call, recompiles, each graph of a model with graph breaks) join the
registry of the model whose parameters they use (``CompiledKFCInfo``, a ``KFCInfo``); ``info.version`` changes
whenever the layer list does, so an optimizer can follow it. Graphs compiled before any registry exists for their
parameters go to an *orphan* registry, which the model's registry adopts (``merge``) when it is created.
"""
from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from kfc_compile.registry import KFCInfo
from kfc_compile.runtime import record
from kfc_compile.runtime.state import CaptureState
from kfc_compile.sites import coverage

# parameter -> weakref to its CompiledKFCInfo. The registry itself holds its parameters, so a strong value would
# keep the key alive forever; registries live on the compiled module (``model.kfc``) or, for graphs compiled before
# one exists, on the compiled graph (``backend.kfc_backend``).
_OWNER: WeakIdKeyDictionary = WeakIdKeyDictionary()
_SLOTS: dict[torch.device, nn.Parameter] = {}
_MODELS: WeakIdKeyDictionary = WeakIdKeyDictionary()  # original module -> its registry (lives as long as it)


def owner(p: torch.Tensor) -> CompiledKFCInfo | None:
    """The registry that owns parameter ``p``, if any."""
    ref = _OWNER.get(p)
    return ref() if ref is not None else None


def own(p: torch.Tensor, info: CompiledKFCInfo) -> None:
    """Make ``info`` the owner of ``p``."""
    _OWNER[p] = weakref.ref(info)


def _slot(device: torch.device) -> nn.Parameter:
    """One statistics slot per device, shared by every registry (merging registries keeps compiled graphs valid)."""
    device = torch.device(device)
    if device not in _SLOTS:
        _SLOTS[device] = nn.Parameter(torch.zeros((), device=device))
    return _SLOTS[device]


@dataclass(eq=False)
class CompiledKFCInfo(KFCInfo):
    """``KFCInfo`` of a model compiled with the ``kfc`` backend.

    ``layers`` grows as dynamo compiles graphs (and may lose a layer whose weight turns out to have another use);
    ``version`` counts those changes.
    """

    names: dict = field(default_factory=dict, repr=False)  # id(param) -> qualified name
    params: list = field(default_factory=list, repr=False)  # the model's parameters (None for an orphan)
    rejected: dict = field(default_factory=dict, repr=False)  # id(param) -> reason
    site_keys: list = field(default_factory=list, repr=False)  # kfc::record keys of the taps feeding ``state``
    version: int = 0
    graphs: int = 0  # dynamo graphs instrumented for this model
    orphan: bool = False
    eager: nn.Module | None = field(default=None, repr=False)  # the uninstrumented module (forward-mode products)

    def use_approx(self, approx: str) -> None:
        """Switch to ``approx`` while no statistics were taken; an error after that."""
        if self.approx != approx and self.layers and self.state.stats:
            raise ValueError(f"model's kfc registry uses approx={self.approx!r}, not {approx!r}")
        self.approx = self.state.approx = approx

    def layer_of(self, weight: torch.Tensor) -> int | None:
        """Index of the layer whose weight is ``weight``, or None."""
        return next((i for i, layer in enumerate(self.layers) if layer.weight is weight), None)

    def layer_name(self, weight: torch.Tensor, guess: str) -> str:
        """The layer name of ``weight``: its qualified parameter name without ``.weight``, else ``guess``."""
        name = self.names.get(id(weight))
        if name is None:
            return guess
        return name[: -len(".weight")] if name.endswith(".weight") else name

    def refresh(self) -> None:
        """Recompute ``uncovered``, ``frozen`` and ``total_numel`` from the current layers."""
        default = ("not used by any conv/linear call in the graphs compiled so far" if self.graphs
                   else "no graph compiled yet (layers are found at the first call)")
        named = ((self.names.get(id(p), "<unnamed>"), p) for p in self.params)
        uncovered, frozen, total = coverage.account(named, self.layers,
                                                    lambda p: self.rejected.get(id(p)) or default)
        self.uncovered[:] = uncovered
        self.frozen[:] = frozen
        self.total_numel = total

    def reject(self, param: torch.Tensor, reason: str) -> None:
        """Keep ``param`` out of KFC from now on; drops its layer if an earlier graph made it one."""
        self.rejected.setdefault(id(param), reason)
        i = self.layer_of(param)
        if i is None:
            return
        layer = self.layers.pop(i)
        if layer.bias is not None:
            self.rejected.setdefault(id(layer.bias), reason)
        for entry in self.state.sites:
            if entry.layer == i:
                entry.layer = None
            elif entry.layer is not None and entry.layer > i:
                entry.layer -= 1
        self.version += 1
        warnings.warn(f"kfc backend: layer {layer.name!r} leaves KFC ({reason}); it is now trained by the fallback",
                      stacklevel=4)

    def merge(self, src: CompiledKFCInfo) -> None:
        """Move ``src``'s layers, sites and taps into this registry (their parameters are disjoint)."""
        offset = len(self.layers)
        self.layers.extend(src.layers)
        for key in src.site_keys:
            entry = src.state.sites[record.site_ref(key).index]
            if entry.layer is not None:
                entry.layer += offset
            self.state.sites.append(entry)
            record.retarget(key, self.state, len(self.state.sites) - 1)
            self.site_keys.append(key)
        self.rejected.update(src.rejected)
        self.graphs += src.graphs
        for p in src.params:
            own(p, self)
            if not any(p is q for q in self.params):
                self.params.append(p)
        for pid, name in src.names.items():
            self.names.setdefault(pid, name)
        src.layers.clear(), src.state.sites.clear(), src.site_keys.clear(), src.params.clear()
        self.version += 1


def new_info(approx: str, device: torch.device, orphan: bool) -> CompiledKFCInfo:
    """An empty registry whose taps use the shared statistics slot of ``device``."""
    state = CaptureState([], [], approx)
    state.slot = _slot(device)
    return CompiledKFCInfo(approx=approx, layers=state.layers, uncovered=[], black_boxes=[], frozen=[], state=state,
                           total_numel=0, orphan=orphan)


def registry_for_graph(params: list[nn.Parameter], device) -> CompiledKFCInfo:
    """The registry a new graph over ``params`` reports to.

    Their owners merged (a named one preferred), or a new orphan registry.
    """
    owners = []
    for p in params:
        o = owner(p)
        if o is not None and o not in owners:
            owners.append(o)
    if not owners:
        owners = [new_info("expand", device, orphan=True)]
    info = next((o for o in owners if not o.orphan), owners[0])
    for other in owners:
        if other is not info:
            info.merge(other)
    for p in params:
        if owner(p) is not info:
            own(p, info)
            if info.orphan:
                info.params.append(p)
    return info


def module_registry(orig: nn.Module, approx: str, on_new: Callable[[], None] | None = None) -> CompiledKFCInfo:
    """The live registry of module ``orig``.

    Its own, else one adopting the registries that already own some of its parameters (graphs compiled before it
    existed), else a new one (``on_new`` is then called first).
    Names the parameters after ``orig``'s qualified names and renames layers an orphan registry had to guess.
    """
    info = _MODELS.get(orig)
    if info is not None:  # the same module compiled again
        info.use_approx(approx)
        return info
    params = list(orig.parameters())
    device = params[0].device if params else torch.device("cpu")
    found = []
    for p in params:
        o = owner(p)
        if o is not None and o not in found:
            found.append(o)
    if not found and on_new is not None:  # nothing compiled for this module yet
        on_new()
    named = [o for o in found if not o.orphan]
    info = named[0] if named else new_info(approx, device, orphan=False)
    info.orphan = False
    for other in found:
        if other is not info:
            info.merge(other)
    for name, p in orig.named_parameters(remove_duplicate=False):
        info.names.setdefault(id(p), name)
    for p in params:
        own(p, info)
        if not any(p is q for q in info.params):
            info.params.append(p)
    info.use_approx(approx)
    for layer in info.layers:  # names seen by an orphan registry were guessed from dynamo sources
        layer.name = info.layer_name(layer.weight, layer.name)
    info.refresh()
    _MODELS[orig] = info
    return info
