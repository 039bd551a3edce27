"""The direct path (``ops.call`` without the dispatcher, in plain eager execution) against the ``torch.ops.kfc`` path.

Both run the op's registered implementation, so the results are bitwise equal; where the call is traced (dynamo,
``make_fx``, fake tensors) or recorded by autograd the op itself runs, so compiled graphs still hold the kfc ops.
"""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

import triton_kernels as tk
from triton_kernels import dispatch, ops

import kernel_refs as R

CONV = ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)


def _inputs(dtype):
    torch.manual_seed(0)
    r = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    DG, D = 5, 7
    return dict(F=R.random_sym((1, 19, 19), dtype), G=R.random_sym((2, 8, 8), dtype), x=r(3, 2, 4, 5),
                rows=r(2, 9, 7), grad=r(2, DG, D), QG=torch.linalg.qr(r(2, DG, DG))[0], lG=r(2, DG).abs(),
                QA=torch.linalg.qr(r(2, D, D))[0], lA=r(2, D).abs(), out=r(2, DG, D))


def _run_all(t):
    """Every public wrapper once, in place on ``t``'s tensors; returns the new tensors."""
    tk.patch_cov_update_(t["F"], t["x"], *CONV, alpha=0.5, beta=0.5, ones=True)
    tk.syrk_update_(t["G"], t["rows"], alpha=1.5, beta=0.9, ones=True)
    s = tk.patch_sum(t["x"], *CONV, ones=True)
    U = tk.eigen_precondition(t["grad"], t["QG"], t["lG"], t["QA"], t["lA"], 0.1)
    tk.eigen_precondition(t["grad"], t["QG"], t["lG"], t["QA"], t["lA"], 0.1, out=t["out"], alpha=-0.3, beta=1.0)
    K = tk.kron_precondition(t["grad"], t["QG"], t["QA"])
    tk.kron_precondition(t["grad"], t["QG"], t["QA"], out=t["out"], alpha=2.0, beta=0.5)
    return [s, U, K]


def _forbid_ops(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("went through torch.ops.kfc")
    for name in ops._OPS:
        monkeypatch.setitem(ops._OPS, name, boom)


@pytest.mark.parametrize("mode", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_direct_equals_op_path_bitwise(use, monkeypatch, mode, dtype):
    use(mode)
    via_ops, direct = _inputs(dtype), _inputs(dtype)
    with dispatch.through_ops():
        new_ops = _run_all(via_ops)
    with monkeypatch.context() as m:
        _forbid_ops(m)                       # proves the eager calls below skip the dispatcher
        new_direct = _run_all(direct)
    for a, b in zip(new_ops + list(via_ops.values()), new_direct + list(direct.values()), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_through_ops_really_dispatches(monkeypatch):
    _forbid_ops(monkeypatch)
    with dispatch.through_ops(), pytest.raises(AssertionError, match="torch.ops.kfc"):
        tk.syrk_update_(torch.empty(3, 3), torch.randn(4, 3))
    tk.syrk_update_(torch.empty(3, 3), torch.randn(4, 3))  # back to the direct path after the block


def test_direct_only_in_plain_eager():
    x = torch.randn(3, 3)
    assert dispatch.direct((x, 1.0, [1, 2], True))
    assert not dispatch.direct((torch.nn.Parameter(x),))           # a subclass (and recorded by autograd)
    assert not dispatch.direct((x.requires_grad_(),))               # autograd would record the call
    with torch.no_grad():
        assert dispatch.direct((x,))                                 # ... but not under no_grad
    with FakeTensorMode():
        assert not dispatch.direct((torch.empty(3),))
    assert not torch.func.vmap(lambda v: torch.tensor(dispatch.direct((v,))))(torch.ones(2, 3)).any()
    with _Passthrough():
        assert not dispatch.direct((x.detach(),))


class _Passthrough(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _graph_targets(fn, *args) -> list:
    targets = []

    def backend(gm, example_inputs):
        targets.extend(n.target for n in gm.graph.nodes)
        return gm.forward

    torch._dynamo.reset()
    try:
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    finally:
        torch._dynamo.reset()
    return targets


def _kfc_names(targets) -> set[str]:
    names = set()
    for t in targets:
        s = str(t)
        if s.startswith("kfc.") or s.startswith("kfc::"):
            names.add(s.split("::")[-1].split(".")[1 if s.startswith("kfc.") else 0])
    return names


def test_compiled_and_traced_graphs_keep_the_ops():
    t = _inputs(torch.float32)
    keys = list(t)

    def fn(*vals):
        return _run_all(dict(zip(keys, vals, strict=True)))

    expected = {"patch_cov_update", "syrk_update", "patch_sum", "eigen_precondition", "eigen_precondition_out",
                "kron_precondition", "kron_precondition_out"}
    assert _kfc_names(_graph_targets(fn, *t.values())) == expected          # dynamo
    gm = make_fx(fn)(*_inputs(torch.float32).values())                       # make_fx (proxy dispatch mode)
    assert _kfc_names(n.target for n in gm.graph.nodes) == expected


def test_fake_tensors_take_the_fake_impl():
    with FakeTensorMode():
        U = tk.kron_precondition(torch.empty(2, 3, 4), torch.empty(2, 3, 3), torch.empty(2, 4, 4))
        with pytest.raises(ValueError, match=r"must be \(3, 3\)"):
            tk.syrk_update_(torch.empty(4, 4), torch.empty(5, 3))
    assert U.shape == (2, 3, 4)
