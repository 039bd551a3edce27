"""Dynamo capture for plain modules: the front end for the models the fx pass cannot take whole.

That is keyword arguments, ``None`` defaults, ``ModelOutput`` returns, ``*args``/``**kwargs``, untraceable Python
(HF transformers, ...), for ``kc.transform`` and ``kc.KFC``.

The module's forward runs through ``torch.compile`` with the ``kfc`` backend and a light inner backend: the
instrumented dynamo graphs run as they are (``"eager"``: no AOTAutograd, no inductor compile time, the same numerics
as the plain module), unless another inner backend is asked for. Dynamo guards on ``self.training`` and on
everything else the forward reads, so ``train()``/``eval()`` select (or compile) the right graph, and keyword
arguments work as in the plain module. Layers join the model's live registry when dynamo compiles a graph (the
first call, recompiles, each graph around a graph break), exactly as under ``torch.compile(model, backend="kfc")``:
the same scan, the same site-kind table, the same coverage rules.

Dynamo runs a frame it cannot trace eagerly (it skips any frame holding an ``nn.LSTM``/``nn.GRU``: its experimental
``allow_rnn`` does not survive AOTAutograd); no graph then reaches the backend and ``kc.KFC`` says so at its first
step. The auto front end takes such models with the fx pass, where the recurrent module is a leaf.
"""
from __future__ import annotations

import copy
import functools
import warnings

import torch
from torch import nn

from kfc_compile.frontend.dynamo.backend import _ModelBackend, kfc_backend
from kfc_compile.frontend.dynamo.registry import CompiledKFCInfo, module_registry
from kfc_compile.runtime.taps import forward_signature, output_tap, replay_inputs

LIGHT_INNER = "eager"


def shallow_copy(m: nn.Module) -> nn.Module:
    """A new module object sharing ``m``'s parameters, buffers and submodules (its own containers and flags)."""
    new = copy.copy(m)
    new._modules = dict(m._modules)
    new._parameters = dict(m._parameters)
    new._buffers = dict(m._buffers)
    new.__dict__.pop("forward", None)  # the class's forward, not an instance-level routing of ``m``
    return new


def capture(module: nn.Module, approx: str, inner: str = LIGHT_INNER) -> CompiledKFCInfo:
    """Route ``module``'s forward through dynamo with the ``kfc`` backend, in place, and return its live registry.

    ``module.kfc`` becomes the registry and ``module.forward`` the captured forward (an instance attribute: the
    class is untouched, ``del module.forward`` undoes it). ``info.eager`` keeps an uninstrumented twin (same
    parameters and submodules) for the forward-mode Fisher products.
    """
    info = module_registry(module, approx)
    info.eager = shallow_copy(module)
    backend = _ModelBackend(functools.partial(kfc_backend, options={"inner": inner}))
    bound_forward = type(module).forward.__get__(module)
    compiled = torch.compile(bound_forward, backend=backend)
    state = info.state
    signature = forward_signature(bound_forward)

    def forward(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*is deprecated", category=FutureWarning)
            out = compiled(*args, **kwargs)
        return output_tap(out, state, replay_inputs(signature, args, kwargs))

    forward._kfc_captured = True
    module.forward = forward
    module.__dict__["kfc"] = info
    return info


def is_captured(module: nn.Module) -> bool:
    """Whether ``module``'s forward was routed through :func:`capture`."""
    return getattr(module.__dict__.get("forward"), "_kfc_captured", False)
