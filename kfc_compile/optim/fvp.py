"""Exact Fisher products on a batch (subset) with forward-mode JVPs.

For directions u, w in parameter space, ``uᵀ F w = mean_n (J_n u)ᵀ H_n (J_n w)`` where J_n is the Jacobian of
example n's model output and H_n the Hessian of its per-example loss ℓ_n w.r.t. that output (the output-space
Fisher, exact for these exponential-family losses: ``Loss.fisher_inner`` in ``curvature/losses.py``).
F is the Fisher of the per-example loss averaged over examples, i.e. the curvature of a batch-mean objective;
``scale`` (N for a sum objective) multiplies it. One JVP per direction gives all inner products among the
directions (2 JVPs for the 4 scalars of §6.1).
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from kfc_compile.curvature.losses import Loss
from kfc_compile.runtime.taps import model_output


class FisherProducts:
    """JVPs of a (transformed) model's output w.r.t. its parameters.

    Buffers are copied so that BatchNorm running statistics are not touched by these extra forwards.
    """

    def __init__(self, model: nn.Module, spec: Loss, select=None):
        self.model = model
        self.spec = spec
        self.select = select  # picks the logits from the model's output (``model_output``)
        self.names: dict[int, str] = {}
        for name, p in model.named_parameters():
            self.names.setdefault(id(p), name)

    def outputs_and_jvps(self, inputs: tuple, directions: list[dict[torch.Tensor, torch.Tensor]]
                         ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Model output f on ``inputs`` and ``J·d`` for each direction (dict parameter → tensor of its shape).

        Parameters missing from a direction get a zero tangent; parameters the model does not use are ignored.
        """
        model = self.model
        params = {n: p.detach() for n, p in model.named_parameters()}
        buffers = {n: b.detach() for n, b in model.named_buffers()}
        named = [{self.names[id(p)]: v for p, v in d.items() if id(p) in self.names} for d in directions]
        moving = {n: params[n] for d in named for n in d}
        if not moving:
            with torch.no_grad():
                bufs = {n: b.clone() for n, b in buffers.items()}
                f = model_output(functional_call(model, (params, bufs), inputs), self.select)
            return f, [torch.zeros_like(f) for _ in directions]

        f = None
        outs = []
        # the fused scaled-dot-product-attention kernels have no forward-mode AD: the math backend (composite ops)
        # gives the same values and JVPs through attention
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            for d in named:
                with fwAD.dual_level():
                    duals = {n: fwAD.make_dual(prim, d[n].to(prim.dtype) if n in d else torch.zeros_like(prim))
                             for n, prim in moving.items()}
                    # fresh buffer copies per pass: BatchNorm's in-place running-stat updates stay local
                    bufs = {n: b.clone() for n, b in buffers.items()}
                    out = model_output(functional_call(self.model, ({**params, **duals}, bufs), inputs), self.select)
                    primal, tangent = fwAD.unpack_dual(out)
                    f = primal.detach().clone()
                    outs.append(torch.zeros_like(f) if tangent is None else tangent.detach().clone())
        return f, outs


def gram(spec: Loss, f: torch.Tensor, jvps: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """Matrix of ``scale·(J u_i)ᵀ H (J u_j)`` over the given JVPs (fp64, symmetric)."""
    k = len(jvps)
    C = torch.zeros(k, k, dtype=torch.float64)
    for i in range(k):
        for j in range(i, k):
            C[i, j] = C[j, i] = float(spec.fisher_inner(f, jvps[i], jvps[j])) * scale
    return C

