"""Built-in teachers and students for the bundled image datasets.

Every factory takes `input_shape` (C, H, W) and `num_classes`, which the pipeline fills in
from the source or the cache manifest, so configs only name what is a real choice.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn


def mnist_cnn(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, width: int = 32, dropout: float = 0.3) -> nn.Module:
    """Two-conv CNN teacher for 28x28 images (about 98% on the 4,000/1,000 MNIST subset)."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(2 * width * (h // 4) * (w // 4), 256), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(256, num_classes),
    )


def digits_cnn(input_shape: tuple[int, ...] = (1, 8, 8), num_classes: int = 10, width: int = 32, dropout: float = 0.2) -> nn.Module:
    """Teacher for scikit-learn's 8x8 digits."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Dropout(dropout),
        nn.Linear(2 * width * (h // 2) * (w // 2), 128), nn.ReLU(),
        nn.Linear(128, num_classes),
    )


def heavy_cnn(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, width: int = 128) -> nn.Module:
    """A deliberately compute-heavy teacher, for benchmarks where the forward pass must dominate."""
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * (h // 4) * (w // 4), num_classes),
    )


def mlp(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, hidden: list[int] | tuple[int, ...] = (128,), dropout: float = 0.0) -> nn.Module:
    """MLP student: flatten, then `hidden` ReLU layers."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def mlp_tiny(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    return mlp(input_shape, num_classes, hidden=(32,))


def mlp_small(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    return mlp(input_shape, num_classes, hidden=(128,))


def mlp_base(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10) -> nn.Module:
    return mlp(input_shape, num_classes, hidden=(256, 256))


def cnn_student(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, width: int = 8, hidden: int = 64) -> nn.Module:
    """Small CNN student with named layers, so feature, attention and relational terms can tap
    `conv1`/`pool1` (width x H/2 x W/2), `conv2`/`pool2` (2*width x H/4 x W/4) and `fc` (embedding)."""
    c, h, w = input_shape
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(c, width, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(width, 2 * width, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(2 * width * (h // 4) * (w // 4), hidden)), ("relu3", nn.ReLU()),
        ("head", nn.Linear(hidden, num_classes)),
    ]))
