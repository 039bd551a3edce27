"""The ``kfc-compile`` command line: a tiny demo through ``main([...])`` and clear errors for bad options."""
from __future__ import annotations

import pytest

from kfc_compile.tools.cli import build_parser, main

TINY = ["demo", "--steps", "4", "--tune-steps", "2", "--lr-sgd", "0.3,0.1", "--lr-adam", "0.01", "--lr-kfc",
        "0.003", "--target", "1.5", "--no-progress"]


def test_demo_tiny_run(tmp_path, capsys):
    png = tmp_path / "demo.png"
    assert main(TINY + ["--out", str(png)]) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert "digits / convnet" in out and "steps to target" in out and f"wrote {png}" in out
    for name in ("KFC-pre", "SGD+momentum", "Adam"):
        assert name in out


def test_demo_subset_no_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--optimizers", "sgd", "--lr-sgd", "0.1", "--steps", "2", "--out", "",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "SGD+momentum" in out and "Adam" not in out and "wrote" not in out
    assert not (tmp_path / "demo.png").exists()


@pytest.mark.parametrize("argv,message", [
    (["demo", "--steps", "0"], "--steps: expected a positive integer"),
    (["demo", "--task", "imagenet"], "invalid choice: 'imagenet'"),
    (["demo", "--model", "vgg"], "invalid choice: 'vgg'"),
    (["demo", "--lr-sgd", "0.1,abc"], "expected a positive number"),
    (["demo", "--lr-kfc", "-1"], "expected a positive number"),
    (["demo", "--optimizers", "sgd,lbfgs"], "subset of kfc,sgd,adam"),
    (["demo", "--target", "0"], "expected a positive number"),
    ([], "required"),
])
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--task", "cifar10"], "needs --data-dir"),
    (["demo", "--task", "cifar10", "--data-dir", "/nonexistent/kfc"], "is not a directory"),
    (["demo", "--model", "paper"], "needs 3×32×32 inputs"),
    (["demo", "--model", "resnet18", "--task", "mnist1d"], "resnet18 needs 3-channel images"),
])
def test_bad_data_or_model_returns_2(argv, message, capsys):
    assert main(argv + ["--no-progress", "--out", ""]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kfc-compile demo: error:") and message in err and "Traceback" not in err


def test_cifar10_dir_without_data(tmp_path, capsys):
    assert main(["demo", "--task", "cifar10", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert "no CIFAR-10 in" in capsys.readouterr().err
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert main(["demo", "--task", "cifar10", "--data-dir", str(tmp_path), "--no-progress"]) == 2
    assert "could not read CIFAR-10" in capsys.readouterr().err


def test_help_lists_demo(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--help"])
    assert e.value.code == 0 and "demo" in capsys.readouterr().out
