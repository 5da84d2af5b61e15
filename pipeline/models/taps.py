"""Layer taps: capture named intermediate activations with forward hooks, and the signals
made from them (pooled features, attention maps, embeddings).

Both stages use these: the teacher stage stores the signals, the student stage computes
the same signals on its own layers. Pure PyTorch, no Ray.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from pipeline.errors import DistillError


def module_names(model: nn.Module) -> list[str]:
    """Qualified names a tap may use (`model.named_modules()`, the root excluded)."""
    return [name for name, _ in model.named_modules() if name]


def find_modules(model: nn.Module, names: Sequence[str], owner: str = "model") -> dict[str, nn.Module]:
    """name -> module; an unknown name is an error listing the names that exist."""
    modules = dict(model.named_modules())
    missing = [n for n in names if not n or n not in modules]
    if missing:
        available = ", ".join(module_names(model))
        raise DistillError(f"{owner} has no module named {missing}; available: {available}",
                           "name a module from that list (the names of model.named_modules())")
    return {n: modules[n] for n in names}


def attach(model: nn.Module, names: Sequence[str], found: dict[str, torch.Tensor], owner: str = "model") -> list[RemovableHandle]:
    """Forward hooks that store each named module's output in `found` on every forward of `model`.

    The one hook mechanism: the teacher stage uses it for a block (`capture`), the student for its
    whole life (`pipeline.student.tasks.tapped.TappedStudent`).
    """
    handles = []
    for name, module in find_modules(model, names, owner).items():
        def hook(_m: nn.Module, _inputs: object, output: torch.Tensor, name: str = name) -> None:
            found[name] = output
        handles.append(module.register_forward_hook(hook))
    return handles


@contextmanager
def capture(model: nn.Module, names: Sequence[str], owner: str = "model") -> Iterator[dict[str, torch.Tensor]]:
    """Within the block, every forward of `model` stores each named module's output in the dict."""
    found: dict[str, torch.Tensor] = {}
    handles = attach(model, names, found, owner)
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def pool_feature(feature: torch.Tensor, size: Sequence[int] | None) -> torch.Tensor:
    """Adaptive average pooling of a (B, C, H, W) map to `size`, to bound the bytes stored per row."""
    if size is None or feature.ndim != 4:
        return feature
    return F.adaptive_avg_pool2d(feature, tuple(size))


def attention_map(feature: torch.Tensor, p: float = 2.0, size: Sequence[int] | None = None) -> torch.Tensor:
    """Zagoruyko & Komodakis (2017) activation-based attention: Q = mean_c |A_c|^p, resized to
    `size`, flattened and L2-normalised per sample.

    Args:
        feature: (B, C, H, W) activations.
        p: exponent (the paper uses 2).
        size: (h, w) to resize the (H, W) map to by adaptive average pooling, so a teacher and a
            student map of different resolutions can be compared.
    Returns:
        (B, h*w) unit-norm maps.
    """
    if feature.ndim != 4:
        raise ValueError(f"attention maps need (B, C, H, W) features, got shape {tuple(feature.shape)}")
    q = feature.float().abs().pow(p).mean(dim=1, keepdim=True)
    if size is not None:
        q = F.adaptive_avg_pool2d(q, tuple(size))
    return F.normalize(q.flatten(1), p=2, dim=1)


def embedding(feature: torch.Tensor) -> torch.Tensor:
    """A layer's output as one vector per sample (spatial maps are averaged over H and W)."""
    if feature.ndim == 4:
        feature = feature.mean(dim=(2, 3))
    return feature.flatten(1)


def signal(kind: str, feature: torch.Tensor, *, pool: Sequence[int] | None = None, p: float = 2.0) -> torch.Tensor:
    """The stored form of a tap of `kind` ("feature", "attention" or "embedding")."""
    if kind == "feature":
        return pool_feature(feature, pool)
    if kind == "attention":
        return attention_map(feature, p=p, size=pool)
    if kind == "embedding":
        return embedding(feature)
    raise ValueError(f"unknown tap kind {kind!r}")
