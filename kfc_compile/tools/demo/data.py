"""Datasets for the demo and the benchmarks, as in-memory tensors. Nothing is ever downloaded.

* ``digits``: scikit-learn's bundled 8×8 handwritten digits (1797 images, shipped inside the sklearn wheel).
* ``mnist1d``: MNIST-1D generated locally by the ``mnist1d`` package (``make_dataset``, no download).
* ``mnist1d_ae``: MNIST-1D's 40-d signals as their own targets (a deep-autoencoder task, MSE; no labels).
* ``cifar10``: CIFAR-10 read by torchvision from a directory the user already has (``download=False``).
"""
from __future__ import annotations

import functools
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)

TASKS = ("digits", "mnist1d", "mnist1d_ae", "cifar10")
INPUT_SHAPES = {"digits": (1, 8, 8), "mnist1d": (1, 40), "mnist1d_ae": (40,),
                "cifar10": (3, 32, 32)}  # known before loading
NUM_OUTPUTS = {"digits": 10, "mnist1d": 10, "mnist1d_ae": 40, "cifar10": 10}  # the model's output width


class DemoError(ValueError):
    """A problem with the user's options or data (the CLI prints it without a traceback)."""


@dataclass
class Dataset:
    """A task held in memory. ``x_*`` may be uint8 with a per-batch ``prepare`` (CIFAR-10).

    ``loss`` is the training loss (``"cross_entropy"`` on class labels, ``"mse"`` on ``y`` shaped like the model
    output); ``num_classes`` is the model's output width.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: torch.Tensor | None = None  # set for uint8 images: normalised per batch
    std: torch.Tensor | None = None
    loss: str = "cross_entropy"

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example (no batch dim)."""
        return tuple(self.x_train.shape[1:])

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Model input from stored examples (float32, normalised)."""
        if self.mean is None:
            return x
        return (x.float().div_(255.0) - self.mean) / self.std

    def __repr__(self) -> str:
        return (f"Dataset({self.name}: {len(self.y_train)} train, {len(self.y_test)} test, "
                f"input {self.input_shape}, {self.num_classes} classes)")


def _split(n: int, test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return perm[n_test:], perm[:n_test]


@functools.cache
def _digits() -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DemoError("--task digits needs scikit-learn (pip install 'kfc-compile[examples]')") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    tr, te = _split(len(y), 0.2)
    mu, sd = x[tr].mean(), x[tr].std()
    x = (x - mu) / sd
    return Dataset("digits", x[tr], y[tr], x[te], y[te], 10)


@functools.cache
def _mnist1d(num_samples: int = 5000) -> Dataset:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DemoError("--task mnist1d needs the mnist1d package (pip install 'kfc-compile[examples]')") from e
    args = get_dataset_args()
    args.num_samples = num_samples
    # make_dataset generates the data locally (get_dataset would try a download); it reseeds the global
    # numpy / random generators, so keep the caller's state.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    f = lambda a: torch.tensor(np.asarray(a), dtype=torch.float32).unsqueeze(1)  # noqa: E731  (N, 1, 40)
    g = lambda a: torch.tensor(np.asarray(a), dtype=torch.long)  # noqa: E731
    return Dataset("mnist1d", f(d["x"]), g(d["y"]), f(d["x_test"]), g(d["y_test"]), 10)


@functools.cache
def _mnist1d_autoencoder() -> Dataset:
    d = _mnist1d()
    x, xt = d.x_train.flatten(1), d.x_test.flatten(1)  # (N, 40): zero-mean, unit-variance signals
    return Dataset("mnist1d_ae", x, x, xt, xt, x.shape[1], loss="mse")


def _cifar10(data_dir: str | None) -> Dataset:
    if not data_dir:
        raise DemoError("--task cifar10 needs --data-dir DIR, a directory holding torchvision's CIFAR-10 "
                        "('cifar-10-batches-py/'); nothing is downloaded")
    if not os.path.isdir(data_dir):
        raise DemoError(f"--data-dir {data_dir!r} is not a directory")
    if not os.path.isdir(os.path.join(data_dir, "cifar-10-batches-py")):
        raise DemoError(f"no CIFAR-10 in {data_dir!r}: expected {os.path.join(data_dir, 'cifar-10-batches-py')} "
                        "(the python version from https://www.cs.toronto.edu/~kriz/cifar.html, as torchvision "
                        "stores it); nothing is downloaded")
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise DemoError("--task cifar10 needs torchvision") from e
    try:
        train = CIFAR10(data_dir, train=True, download=False)
        test = CIFAR10(data_dir, train=False, download=False)
    except RuntimeError as e:
        raise DemoError(f"could not read CIFAR-10 from {data_dir!r}: {e}") from e
    f = lambda ds: torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    g = lambda ds: torch.tensor(ds.targets, dtype=torch.long)  # noqa: E731
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)
    return Dataset("cifar10", f(train), g(train), f(test), g(test), 10, mean, std)


def load_task(task: str, data_dir: str | None = None) -> Dataset:
    """Load one of ``TASKS`` (the train/test split is fixed; training seeds only change init and batch order)."""
    if task == "digits":
        ds = _digits()
    elif task == "mnist1d":
        ds = _mnist1d()
    elif task == "mnist1d_ae":
        ds = _mnist1d_autoencoder()
    elif task == "cifar10":
        ds = _cifar10(data_dir)
    else:
        raise DemoError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")
    log.info("loaded %r", ds)
    return ds
