"""Block-diagonal factors for wide layers (``KFC(max_factor_dim=m)``), against dense float64 references."""
from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc
from kfc_compile.curvature import blocks as bl
from kfc_compile.curvature import inverses as P
from kfc_compile.curvature.blocks import Layout
from kfc_compile.curvature.precondition import apply_buckets, build_buckets, grad_matrix, split_matrix

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

CAP = 5  # every factor of the net below wider than 5 is blocked, most with padding in the last block


def net() -> nn.Module:
    """Ω sizes 28 (6 blocks, 2 padding), 27 per group (bias-free, groups=2), 17, 8; Γ sizes 6, 2, 7, 5."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU(), nn.Conv2d(6, 4, 3, groups=2, bias=False),
                         nn.Flatten(), nn.Linear(16, 7), nn.Tanh(), nn.Linear(7, 5)).double()


def data(seed: int = 0, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 9, 9, dtype=torch.float64, generator=g), torch.randint(0, 5, (n,), generator=g)


def block_mask(d: int, k: int) -> torch.Tensor:
    b = bl.block_size(d, k)
    idx = torch.arange(d) // b
    return idx[:, None] == idx[None, :]


def spd(groups: int, d: int, gen: torch.Generator, rank: int | None = None) -> torch.Tensor:
    X = torch.randn(groups, rank or 2 * d, d, dtype=torch.float64, generator=gen)
    return X.mT @ X / X.shape[1]


# -- the helpers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("d,k", [(7, 1), (7, 2), (9, 3), (10, 4), (5, 5)])
def test_block_helpers_match_the_dense_block_diagonal(d, k):
    """block_rows gives the diagonal blocks of XᵀX.

    diagonal_blocks and dense are inverse of each other on block-diagonal matrices; the padding coordinates are 0 and
    pad_identity_ sets exactly them to 1.
    """
    gen = torch.Generator().manual_seed(d * 10 + k)
    X = torch.randn(2, 11, d, dtype=torch.float64, generator=gen)
    R = bl.block_rows(X, k)
    blocks = R.mT @ R
    full = X.mT @ X
    masked = full * block_mask(d, k)
    torch.testing.assert_close(bl.dense(blocks, k, d), masked, rtol=0, atol=1e-12)
    torch.testing.assert_close(bl.diagonal_blocks(full, k), blocks, rtol=0, atol=1e-12)
    b = bl.block_size(d, k)
    pad = k * b - d
    assert blocks.shape == (2 * k, b, b) and pad < k
    padded = bl.pad_identity_(blocks.clone(), k, d)
    diff = padded - blocks
    expected = torch.zeros(2 * k, b, b, dtype=torch.float64)
    for g in range(2):
        for p in range(b - pad, b):
            expected[g * k + k - 1, p, p] = 1.0
    torch.testing.assert_close(diff, expected, rtol=0, atol=0)
    torch.testing.assert_close(bl.group_traces(blocks, 2), torch.diagonal(full, dim1=-2, dim2=-1).sum(-1))


# -- inverses and preconditioning ----------------------------------------------------------------------------------

def _dense_update(method, A, G, M, eta, scale):
    """float64 reference on the dense block-diagonal factors.

    The factored Γ_d⁻¹ M Ω_d⁻¹ with π from the whole traces, or the exact (scale·kron(Γ, Ω) + η I)⁻¹ vec(M).
    """
    A = scale * A
    out = []
    for g in range(A.shape[0]):
        a, gg, m = A[g], G[g], M[g]
        if method == "factored":
            if eta > 0:
                pi = ((a.trace() / a.shape[0]) / (gg.trace() / gg.shape[0])).sqrt()
                a = a + pi * eta ** 0.5 * torch.eye(a.shape[0], dtype=a.dtype)
                gg = gg + eta ** 0.5 / pi * torch.eye(gg.shape[0], dtype=a.dtype)
            out.append(torch.linalg.solve(gg, m) @ torch.linalg.inv(a))
        else:
            K = torch.kron(gg, a) + eta * torch.eye(gg.shape[0] * a.shape[0], dtype=a.dtype)
            out.append(torch.linalg.solve(K, m.reshape(-1)).reshape(m.shape))
    return torch.stack(out)


@pytest.mark.parametrize("method", P.DAMPING_METHODS)
@pytest.mark.parametrize("eta,scale", [(0.0, 1.0), (0.3, 1.0), (0.05, 4.0)])
@pytest.mark.parametrize("groups,a_dim,g_dim,cap", [(1, 11, 7, 4), (2, 9, 3, 3), (1, 6, 13, 5)])
def test_blocked_inverse_equals_dense_block_diagonal_solve(method, eta, scale, groups, a_dim, g_dim, cap):
    """compute_inverse + precondition_layer on the stored blocks give the update of the dense block-diagonal factors.

    Checked in fp64 to 1e-9, with and without damping (the padding never makes a factor singular), for both damping
    methods, a curvature scale, groups, and blocks on either side.
    """
    gen = torch.Generator().manual_seed(a_dim * 100 + g_dim)
    lay = Layout.of(groups, a_dim, g_dim, cap)
    assert lay.blocked
    A, G = lay.to_blocks(spd(groups, a_dim, gen), spd(groups, g_dim, gen))
    Ad, Gd = lay.to_dense(A, G)
    M = torch.randn(groups, g_dim, a_dim, dtype=torch.float64, generator=gen)
    inv = P.compute_inverse(method, A, G, eta, scale, "x", lay)
    got = P.precondition_layer(inv, M)
    torch.testing.assert_close(got, _dense_update(method, Ad, Gd, M, eta, scale), rtol=1e-9, atol=1e-11)
    # the same through a bucket, and after a round trip through state()
    again = P.LayerInverse.from_state(inv.state(), torch.device("cpu"))
    out = apply_buckets(build_buckets({0: again}), {0: M})[0]
    torch.testing.assert_close(out, got, rtol=1e-12, atol=1e-14)


def test_blocked_undamped_singular_block_raises():
    """Without damping a singular diagonal block is reported (the padding is not what makes it singular)."""
    gen = torch.Generator().manual_seed(3)
    lay = Layout.of(1, 10, 3, 4)
    A, G = lay.to_blocks(spd(1, 10, gen, rank=3), spd(1, 3, gen))
    for method in P.DAMPING_METHODS:
        with pytest.raises(kc.SingularFactorError, match="layer 'fc'"):
            P.compute_inverse(method, A, G, 0.0, 1.0, "fc", lay)


# -- the optimizer -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_optimizer_factors_are_the_diagonal_blocks_of_the_dense_factors(approx):
    """With max_factor_dim the captured factors are exactly the diagonal blocks of kc.curvature's dense factors.

    Checked for a conv with stride, a grouped bias-free conv and a linear, on the same batch (type-2 Fisher, fp64); the
    factors are stored at d·b size; kc.curvature on the optimizer's own model stays dense.
    """
    model = net()
    x, y = data()
    ref = kc.curvature(copy.deepcopy(model), "cross_entropy", x, y, fisher="type-2", approx=approx)
    opt = kc.KFC(model, lr=0.1, fisher="type-2", stats_fraction=1.0, approx=approx, clip=None, max_factor_dim=CAP)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert len(opt.layers) == 4
    for layer, state in zip(opt.layers, opt.layer_states(), strict=True):
        lay = state.layout
        assert lay.a_blocks == -(-layer.a_dim // CAP) and lay.g_blocks == -(-layer.g_dim // CAP)
        rf = state.running
        assert (tuple(rf.A.shape), tuple(rf.G.shape)) == lay.shapes()
        got = opt.factors(layer.name)
        for what, full, d, k in (("A", ref[layer.name].A, layer.a_dim, lay.a_blocks),
                                 ("G", ref[layer.name].G, layer.g_dim, lay.g_blocks)):
            torch.testing.assert_close(getattr(got, what), full * block_mask(d, k), rtol=1e-10, atol=1e-12,
                                       msg=lambda m, name=layer.name, what=what: f"{name} {what}: {m}")
    dense = kc.curvature(model, "cross_entropy", x, y, fisher="type-2", approx=approx)
    name = opt.layers[0].name
    assert dense[name].A.shape == (28, 28) and bool((dense[name].A * ~block_mask(28, 6)).abs().sum() > 0)


@pytest.mark.parametrize("method", P.DAMPING_METHODS)
def test_optimizer_update_uses_the_block_diagonal_curvature(method):
    """opt.precondition() on a blocked model equals the dense fp64 solve with the block-diagonal factors it reports.

    Inverses are refreshed at steps 1-3, so after 3 steps they match the reported factors; the KFC steps decrease the
    loss.
    """
    model = net()
    x, y = data(1)
    opt = kc.KFC(model, lr=0.2, damping=0.05, fisher="type-2", stats_fraction=1.0, clip=None,
                 damping_method=method, max_factor_dim=CAP)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    reported = {layer.name: opt.factors(layer.name) for layer in opt.layers}  # the next backward averages into Ω
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    nat = opt.precondition()
    for layer in opt.layers:
        f = reported[layer.name]
        A = f.A if f.A.dim() == 3 else f.A[None]
        G = f.G if f.G.dim() == 3 else f.G[None]
        M = grad_matrix(layer)
        want = _dense_update(method, A, G, M, 0.05, 1.0)
        dW, db = split_matrix(layer, want)
        torch.testing.assert_close(nat[layer.weight], dW, rtol=1e-8, atol=1e-10)
        if db is not None:
            torch.testing.assert_close(nat[layer.bias], db, rtol=1e-8, atol=1e-10)


def test_set_factors_keeps_the_diagonal_blocks_and_state_dict_checks_the_layout():
    model = net()
    x, y = data(2)
    opt = kc.KFC(model, lr=0.1, max_factor_dim=CAP)
    layer = opt.layers[2]  # Linear(16, 7): Ω 17 in 4 blocks, Γ 7 in 2
    gen = torch.Generator().manual_seed(0)
    A, G = spd(1, 17, gen)[0], spd(1, 7, gen)[0]
    opt.set_factors(layer.name, A, G)
    got = opt.factors(layer.name)
    torch.testing.assert_close(got.A, A * block_mask(17, 4), rtol=0, atol=0)
    torch.testing.assert_close(got.G, G * block_mask(7, 2), rtol=0, atol=0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=False)
    same = kc.KFC(copy.deepcopy(model), lr=0.1, max_factor_dim=CAP)
    same.load_state_dict(sd)
    torch.testing.assert_close(same.factors(layer.name).A, opt.factors(layer.name).A, rtol=0, atol=0)
    other = kc.KFC(copy.deepcopy(model), lr=0.1)  # dense factors: the saved blocks do not fit
    with pytest.raises(ValueError, match="max_factor_dim"):
        other.load_state_dict(sd)
    assert other.steps == 0 and other.factors(layer.name) is None  # nothing was loaded


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_max_factor_dim_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match="max_factor_dim"):
        kc.KFC(net(), lr=0.1, max_factor_dim=bad)
