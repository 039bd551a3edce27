"""Exact-by-theory cases (docs/algorithm.md §11.2), each against a dense float64 GGN / EF built with ``torch.func``.

``kron(G, A)`` must equal the exact block of the per-example loss (averaged over examples) for the row-major
``[W | b]`` where theory says KFAC is exact, and must differ from it in the negative controls.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import kfc_compile as kc

from kfc_test_helpers import dense_blocks, kron_block, rel_err

EXACT = 1e-10


class ChannelsLast(nn.Module):
    """b c h w -> b h w c (one MSE term per location and channel)."""

    def forward(self, x):
        return x.permute(0, 2, 3, 1)


def layer_pairs(model: nn.Module) -> dict[str, tuple[str, str | None]]:
    return {name: (f"{name}.weight", f"{name}.bias" if m.bias is not None else None)
            for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def kfac_blocks(model, loss, x, y, fisher, approx="expand"):
    return {name: kron_block(f) for name, f in kc.curvature(model, loss, x, y, fisher=fisher, approx=approx).items()}


def test_one_datum_mlp_cross_entropy():
    """N = 1: type-2 KFAC is the GGN block and empirical KFAC is the EF block, for every layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4, bias=False), nn.Sigmoid(),
                          nn.Linear(4, 3)).double()
    x = torch.randn(1, 4, dtype=torch.float64)
    y = torch.tensor([2])
    dense = dense_blocks(model, x, y, layer_pairs(model), "ce")
    type2 = kfac_blocks(model, nn.CrossEntropyLoss(), x, y, "type-2")
    emp = kfac_blocks(model, nn.CrossEntropyLoss(), x, y, "empirical")
    assert set(type2) == set(dense) == {"0", "2", "4"}
    for name, (ggn, ef) in dense.items():
        assert rel_err(type2[name], ggn) < EXACT, name
        assert rel_err(emp[name], ef) < EXACT, name
        assert ggn.norm() > 1e-3 and ef.norm() > 1e-3


def test_deep_linear_mse_type2_is_exact():
    """Deep linear network, square loss, N > 1: type-2 KFAC = GGN for every layer; empirical KFAC != EF."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randn(6, 2, dtype=torch.float64)
    dense = dense_blocks(model, x, y, layer_pairs(model), "mse_mean")
    type2 = kfac_blocks(model, nn.MSELoss(), x, y, "type-2")
    emp = kfac_blocks(model, nn.MSELoss(), x, y, "empirical")
    for name, (ggn, ef) in dense.items():
        assert rel_err(type2[name], ggn) < EXACT, name
        assert rel_err(emp[name], ef) > 0.05, name  # negative control: KFAC of the EF is not the EF


def test_conv_expand_exact():
    """Conv2d(3,2,4,padding=2) -> (b,h,w,c) -> MSE: one loss term per location, KFAC-expand type-2 = GGN."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 2, 4, padding=2), ChannelsLast()).double()
    x = torch.randn(3, 3, 5, 4, dtype=torch.float64)
    y = torch.randn_like(model(x))
    ggn, _ = dense_blocks(model, x, y, layer_pairs(model), "mse_mean")["0"]
    assert rel_err(kfac_blocks(model, nn.MSELoss(), x, y, "type-2", "expand")["0"], ggn) < EXACT
    assert rel_err(kfac_blocks(model, nn.MSELoss(), x, y, "type-2", "reduce")["0"], ggn) > 0.05  # wrong setting


def test_conv_reduce_exact():
    """Conv2d(3,2,4,padding=2) -> AdaptiveAvgPool2d(1) -> Flatten -> MSE: KFAC-reduce type-2 = GGN, expand is not."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 2, 4, padding=2), nn.AdaptiveAvgPool2d(1), nn.Flatten()).double()
    x = torch.randn(4, 3, 5, 6, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    ggn, _ = dense_blocks(model, x, y, layer_pairs(model), "mse_mean")["0"]
    assert rel_err(kfac_blocks(model, nn.MSELoss(), x, y, "type-2", "reduce")["0"], ggn) < EXACT
    assert rel_err(kfac_blocks(model, nn.MSELoss(), x, y, "type-2", "expand")["0"], ggn) > 0.05  # negative control


@pytest.mark.parametrize("fisher", ["type-2", "empirical"])
def test_reduce_equals_expand_when_one_position(fisher):
    """T = 1 for every layer (a conv whose output is 1x1, linears on rank-2 inputs): the two flavours coincide."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 5, 3), nn.Flatten(), nn.ReLU(), nn.Linear(5, 4), nn.Tanh(),
                          nn.Linear(4, 3)).double()
    x = torch.randn(5, 2, 3, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    exp = kc.curvature(model, nn.CrossEntropyLoss(), x, y, fisher=fisher, approx="expand")
    red = kc.curvature(model, nn.CrossEntropyLoss(), x, y, fisher=fisher, approx="reduce")
    assert set(exp) == set(red) == {"0", "3", "5"}
    for name in exp:
        torch.testing.assert_close(red[name].A, exp[name].A, rtol=EXACT, atol=EXACT)
        torch.testing.assert_close(red[name].G, exp[name].G, rtol=EXACT, atol=EXACT)


def test_reduce_and_expand_differ_by_position_scaling():
    """With T > 1, equal inputs at every position and gradients g = v/T: the reduce block is T times the expand one.

    The gradients are those of average pooling. Ω_reduce = Ω_expand / T (x̃ is a mean) and Γ_reduce = T²·Γ_expand
    ((Σ_t g)(Σ_t g)ᵀ vs the position average of g gᵀ), so the reduce block is T times the expand block, as the
    reduce-exact case requires; summing both (or averaging both) would be off by T.
    """
    conv = nn.Conv2d(2, 3, 1, bias=True).double()
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    torch.manual_seed(5)
    x = torch.randn(4, 2, 1, 1, dtype=torch.float64).expand(4, 2, 3, 5).contiguous()  # same input everywhere
    y = torch.randn(4, 3, dtype=torch.float64)
    T = 15
    exp = kc.curvature(model, nn.MSELoss(), x, y, fisher="type-2", approx="expand")["0"]
    red = kc.curvature(model, nn.MSELoss(), x, y, fisher="type-2", approx="reduce")["0"]
    torch.testing.assert_close(red.A * T, exp.A, rtol=EXACT, atol=EXACT)
    torch.testing.assert_close(red.G, exp.G * T**2, rtol=EXACT, atol=EXACT)
    assert exp.A[-1, -1].item() == pytest.approx(T) and red.A[-1, -1].item() == pytest.approx(1.0)


def test_mean_vs_sum_reduction():
    """ℓ_n = (1/K)Σφ (mean) vs Σφ (sum): Ω is the same, type-2 Γ scales by 1/K and empirical Γ by 1/K².

    So the batch-loss GGN relation GGN(mean) = GGN(sum)/(N·K) of curvlinops holds; with one term per example (CE on
    (N, C)) the two reductions give identical factors.
    """
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 2, 4, padding=2), ChannelsLast()).double()
    x = torch.randn(3, 3, 5, 4, dtype=torch.float64)
    y = torch.randn_like(model(x))
    N, K = x.shape[0], y[0].numel()
    for fisher, power in (("type-2", 1), ("empirical", 2)):
        m = kc.curvature(model, nn.MSELoss(reduction="mean"), x, y, fisher=fisher)["0"]
        s = kc.curvature(model, nn.MSELoss(reduction="sum"), x, y, fisher=fisher)["0"]
        torch.testing.assert_close(m.A, s.A, rtol=EXACT, atol=EXACT)
        torch.testing.assert_close(m.G * K**power, s.G, rtol=EXACT, atol=EXACT)
    # the batch-loss form: N·kron(mean) is the GGN of the mean batch loss times N, kron(sum)·N that of the sum
    ggn_mean, _ = dense_blocks(model, x, y, layer_pairs(model), "mse_mean")["0"]
    ggn_sum, _ = dense_blocks(model, x, y, layer_pairs(model), "mse_sum")["0"]
    torch.testing.assert_close(ggn_mean, ggn_sum / K)  # per example; batch: (1/N)Σ vs Σ gives the extra N
    km = kron_block(kc.curvature(model, nn.MSELoss(reduction="mean"), x, y, fisher="type-2")["0"])
    ks = kron_block(kc.curvature(model, nn.MSELoss(reduction="sum"), x, y, fisher="type-2")["0"])
    torch.testing.assert_close(km, ks / K)
    assert N > 1

    clf = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    xc, yc = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for fisher in ("type-2", "empirical"):
        m = kc.curvature(clf, nn.CrossEntropyLoss(reduction="mean"), xc, yc, fisher=fisher)
        s = kc.curvature(clf, nn.CrossEntropyLoss(reduction="sum"), xc, yc, fisher=fisher)
        for name in m:
            torch.testing.assert_close(m[name].A, s[name].A, rtol=EXACT, atol=EXACT)
            torch.testing.assert_close(m[name].G, s[name].G, rtol=EXACT, atol=EXACT)


def test_single_linear_one_vector_is_rank_one():
    """Single Linear, N = 1, one back-propagated vector: kron(G, A) = (g ⊗ ā)(g ⊗ ā)ᵀ exactly."""
    torch.manual_seed(7)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(1, 3, dtype=torch.float64)
    y = torch.tensor([1])
    f = kc.curvature(nn.Sequential(lin), nn.CrossEntropyLoss(), x, y, fisher="empirical")["0"]
    out = lin(x)
    nn.CrossEntropyLoss()(out, y).backward()
    flat = torch.cat([lin.weight.grad, lin.bias.grad.unsqueeze(1)], dim=1).reshape(-1)
    torch.testing.assert_close(kron_block(f), torch.outer(flat, flat), rtol=EXACT, atol=EXACT)
