"""Training sanity on real data (scikit-learn's bundled 8×8 digits).

KFC-pre reaches a training-loss threshold in fewer steps than SGD with momentum at any learning rate of a grid
(bench/digits_time_to_target.py measures more).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kfc_compile as kc

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

TARGET = 0.1  # mean cross-entropy over all 1797 examples


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    X = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1)
    return (X - X.mean()) / X.std(), torch.tensor(d.target)


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 10))


def steps_to_target(make_opt, data, max_steps, batch=128, every=5):
    X, Y = data
    model = net()
    opt = make_opt(model)
    gen = torch.Generator().manual_seed(1)
    order = torch.cat([torch.randperm(len(X), generator=gen) for _ in range(max_steps * batch // len(X) + 1)])
    for k in range(1, max_steps + 1):
        idx = order[(k - 1) * batch:k * batch]
        opt.zero_grad()
        F.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        if k % every == 0:
            with torch.no_grad():
                if F.cross_entropy(model(X), Y).item() < TARGET:
                    return k
    return None


def test_kfc_pre_needs_fewer_steps_than_tuned_sgd(digits):
    k_kfc = steps_to_target(lambda m: kc.KFC(m, lr=0.1, momentum=0.0, generator=torch.Generator().manual_seed(0)),
                            digits, max_steps=60)
    assert k_kfc is not None
    # SGD gets exactly as many steps minus one evaluation period, at every learning rate of the grid
    for lr in (0.03, 0.1, 0.3, 1.0):
        k_sgd = steps_to_target(lambda m, lr=lr: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9), digits,
                                max_steps=k_kfc)
        assert k_sgd is None or k_sgd > k_kfc, (lr, k_sgd, k_kfc)
