"""The soak bench in CI: 100 steps of ``bench/soak.py`` (every fault kind at least once) against a clean run."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def load_soak():
    path = Path(__file__).resolve().parents[1] / "bench" / "soak.py"
    spec = importlib.util.spec_from_file_location("kfc_soak_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_100_steps_every_fault_counted_and_recovered():
    soak = load_soak()
    result = soak.soak(steps=100, seed=0, method="factored")
    f, c = result["faulty"], result["clean"]
    assert set(f["injected"]) == set(soak.KINDS)  # every kind at least once
    assert f["counted"] == f["injected"] and f["recovered"] == f["injected"], soak.table(result, "factored")
    assert f["non_finite"] == 0 and c["non_finite"] == 0
    assert f["final"] < 3 * c["final"] + 0.05, (f["final"], c["final"])
    assert "| **all** |" in soak.table(result, "factored")
