"""Shared test helpers: dense float64 GGN / empirical-Fisher blocks built with ``torch.func``, and Kronecker blocks.

Parameter layout everywhere is the library's: for a layer with weight ``W`` (out, ...) and bias ``b``, the block is
over the row-major ``[W | b]`` (row i = ``W[i].flatten()`` then ``b[i]``).

Test modules import these as ``from kfc_test_helpers import ...``: ``tests/kernels`` has its own ``conftest``,
so the bare name ``conftest`` is ambiguous in a full run.
"""
from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, hessian, jacrev, vmap


def wb_jacobians(model: torch.nn.Module, X: torch.Tensor, layers: dict[str, tuple[str, str | None]]):
    """Per-example Jacobians of the flattened model output w.r.t. each layer's ``[W | b]``.

    ``layers`` maps a label to (weight name, bias name or None). Returns (outputs (N, K), {label: (N, K, D)}).
    """
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    sel = {n: params[n] for pair in layers.values() for n in pair if n is not None}

    def f(p, x):
        return functional_call(model, ({**params, **p}, buffers), (x.unsqueeze(0),)).reshape(-1)

    J = vmap(jacrev(f), in_dims=(None, 0))(sel, X)
    out = vmap(lambda x: f(sel, x))(X)
    N, K = out.shape
    blocks = {}
    for label, (w, b) in layers.items():
        jw = J[w].reshape(N, K, params[w].shape[0], -1)
        if b is not None:
            jw = torch.cat([jw, J[b].unsqueeze(-1)], dim=-1)
        blocks[label] = jw.reshape(N, K, -1)
    return out, blocks


def per_example_loss(kind: str):
    """ℓ_n(f_n, y_n) on one example's flattened output (library convention, docs/algorithm.md / README)."""
    if kind == "ce":  # one term per example: mean and sum reductions give the same ℓ_n
        return lambda f, y: F.cross_entropy(f.unsqueeze(0), y.unsqueeze(0))
    if kind == "mse_mean":
        return lambda f, y: ((f - y) ** 2).mean()
    if kind == "mse_sum":
        return lambda f, y: ((f - y) ** 2).sum()
    raise ValueError(kind)


def dense_blocks(model, X, Y, layers, loss_kind: str):
    """Exact GGN and empirical-Fisher blocks of the per-example loss, averaged over examples (float64).

    Returns {label: (ggn (D, D), ef (D, D))}.
    """
    out, jac = wb_jacobians(model, X, layers)
    N = out.shape[0]
    Yf = Y.reshape(N, -1) if loss_kind != "ce" else Y
    loss = per_example_loss(loss_kind)
    H = vmap(hessian(loss))(out, Yf)  # (N, K, K)
    g = vmap(grad(loss))(out, Yf)  # (N, K)
    res = {}
    for label, J in jac.items():
        ggn = torch.einsum("nka,nkl,nlb->ab", J, H, J) / N
        pg = torch.einsum("nka,nk->na", J, g)
        res[label] = (ggn, pg.T @ pg / N)
    return res


def kron_block(factors) -> torch.Tensor:
    """kron(G, A) for the row-major [W | b]; block-diagonal over groups for stacked (groups, d, d) factors."""
    A, G = factors.A, factors.G
    if A.dim() == 2:
        return torch.kron(G, A)
    return torch.block_diag(*[torch.kron(G[i], A[i]) for i in range(A.shape[0])])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def output_grads(model: torch.nn.Module, layer: torch.nn.Module, x: torch.Tensor,
                 y: torch.Tensor) -> list[torch.Tensor]:
    """Per-example output gradients of every call of ``layer``.

    A sum-reduced MSE on the model, so each example's gradient is its own loss's.
    """
    outs = []

    def hook(mod, inp, out):
        out.retain_grad()
        outs.append(out)

    h = layer.register_forward_hook(hook)
    try:
        F.mse_loss(model(x), y, reduction="sum").backward()
    finally:
        h.remove()
    model.zero_grad()
    return [o.grad.detach() for o in outs]


def dense_ce_fisher(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Exact Fisher of the per-example softmax cross-entropy, averaged over examples, all parameters (float64)."""
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}

    def f(p, xi):
        return functional_call(model, p, (xi.unsqueeze(0),))[0]

    J = vmap(jacrev(f), in_dims=(None, 0))(params, x)
    Jf = torch.cat([J[n].reshape(x.shape[0], -1, params[n].numel()) for n in names], -1)
    p = torch.softmax(vmap(lambda xi: f(params, xi))(x), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("nka,nkl,nlb->ab", Jf, H, Jf) / x.shape[0]


@pytest.fixture
def one_thread():
    """One intra-op thread for tiny nets (faster, and robust on a loaded machine); the count is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def guard_check(loss, grads):
    """``StepGuard.check`` of ``loss`` and a stand-in optimizer whose parameters carry ``grads`` (its result)."""
    from torch import nn

    from kfc_compile.curvature.health import Health
    from kfc_compile.optim.safety import StepGuard

    class Opt:
        param_groups = [{"params": []}]
    opt = Opt()
    for g in grads:
        p = nn.Parameter(torch.zeros_like(g))
        p.grad = g
        opt.param_groups[0]["params"].append(p)
    return StepGuard(None, Health(), set()).check(opt, loss, 1.0)  # check() reads no option

sys.modules.setdefault("kfc_test_helpers", sys.modules[__name__])
