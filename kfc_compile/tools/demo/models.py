"""Small models for the demo tasks, and the KFC paper's CIFAR-10 network (used by ``bench/step_overhead.py``)."""
from __future__ import annotations

import math

import torch
from torch import nn

from kfc_compile.tools.demo.data import DemoError

MODELS = ("auto", "convnet", "mlp", "paper", "resnet18", "autoencoder")
DEFAULT_MODEL = {"digits": "convnet", "mnist1d": "convnet", "mnist1d_ae": "autoencoder", "cifar10": "paper"}
AUTOENCODER_WIDTHS = (64, 32, 16, 8, 16, 32, 64)  # hidden widths of the 8-layer autoencoder; 8 is the code


def paper_cifar_net(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """cuda-convnet's "18 % in 20 minutes" CIFAR-10 net as used in the KFC paper (docs/algorithm.md §10.1).

    Without the response normalisation layers: conv 5×5 32 → ReLU → maxpool 3/2 → conv 5×5 32 → ReLU → avgpool
    3/2 → conv 5×5 64 → ReLU → avgpool 3/2 → linear. Pools round up (cuda-convnet), so 32×32 → 16 → 8 → 4 and the
    factors are 76/801/801/1025 wide.
    """
    return nn.Sequential(
        nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(32, 32, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.AvgPool2d(3, 2, ceil_mode=True),
        nn.Flatten(), nn.Linear(64 * 4 * 4, num_classes),
    )


def conv2d_net(in_channels: int, num_classes: int, hw: tuple[int, int], width: int = 16) -> nn.Sequential:
    """Two 3×3 convs, a 2×2 max-pool and a linear classifier (for 8×8 digits: 16 → 32 channels, 512 → 10)."""
    h, w = hw
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (h // 2) * (w // 2), num_classes),
    )


def conv1d_net(in_channels: int, num_classes: int, length: int, width: int = 32) -> nn.Sequential:
    """Three strided Conv1d layers (kernel 5/3/3, stride 2) and a linear classifier (MNIST-1D: 40 → 20 → 10 → 5)."""
    out_len = length
    for k, p in ((5, 2), (3, 1), (3, 1)):
        out_len = (out_len + 2 * p - k) // 2 + 1
    return nn.Sequential(
        nn.Conv1d(in_channels, width, 5, stride=2, padding=2), nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(width, width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(width * out_len, num_classes),
    )


def mlp(input_shape: tuple[int, ...], num_classes: int, hidden: int = 128) -> nn.Sequential:
    """A ReLU MLP with two hidden layers of width ``hidden`` on flattened inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                         nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


def deep_autoencoder(dim: int, widths: tuple[int, ...] = AUTOENCODER_WIDTHS) -> nn.Sequential:
    """The classic deep-autoencoder benchmark shape, small: ``dim`` → widths → ``dim`` linear layers.

    tanh after every hidden layer but the code layer (the narrowest, linear as in Hinton & Salakhutdinov); the
    output is linear (MSE on standardised signals). The default widths give 8 layers with an 8-unit code.
    """
    code = widths.index(min(widths))
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip((dim, *widths), (*widths, dim), strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) and i != code:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def build_model(name: str, task: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """One of ``MODELS`` for inputs of ``input_shape`` (C, L) or (C, H, W); ``auto`` is the task's default."""
    if name == "auto":
        name = DEFAULT_MODEL.get(task, "convnet")
    if name not in MODELS:
        raise DemoError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    if name == "autoencoder":
        if len(input_shape) != 1 or num_classes != input_shape[0]:
            raise DemoError(f"--model autoencoder reconstructs flat signals (task mnist1d_ae); task {task!r} has "
                            f"inputs {'×'.join(map(str, input_shape))} and {num_classes} outputs")
        return deep_autoencoder(input_shape[0])
    if task == "mnist1d_ae":
        raise DemoError(f"task mnist1d_ae needs --model autoencoder (or auto), got {name!r}")
    if name == "mlp":
        return mlp(input_shape, num_classes)
    if name == "convnet":
        if len(input_shape) == 2:
            return conv1d_net(input_shape[0], num_classes, input_shape[1])
        if len(input_shape) == 3:
            return conv2d_net(input_shape[0], num_classes, input_shape[1:])
    if name == "paper":
        if input_shape != (3, 32, 32):
            raise DemoError(f"--model paper is the KFC paper's CIFAR-10 net and needs 3×32×32 inputs; "
                            f"task {task!r} has {'×'.join(map(str, input_shape))}")
        return paper_cifar_net(num_classes)
    if name == "resnet18":
        if len(input_shape) != 3 or input_shape[0] != 3 or min(input_shape[1:]) < 32:
            raise DemoError(f"--model resnet18 needs 3-channel images of at least 32×32; task {task!r} has "
                            f"{'×'.join(map(str, input_shape))}")
        try:
            from torchvision.models import resnet18
        except ImportError as e:  # pragma: no cover
            raise DemoError("--model resnet18 needs torchvision") from e
        return resnet18(num_classes=num_classes)
    raise DemoError(f"--model {name} does not fit task {task!r} (inputs {'×'.join(map(str, input_shape))})")


def check_forward(model: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Run ``model`` on two zero examples of ``input_shape``, so that a model unfit for the data fails early."""
    with torch.no_grad():
        model(torch.zeros(2, *input_shape))
