"""Stage 2's image augmentation, drawn from torch's generator (the worker loop seeds it per step from
the run's seed, so a resumed run replays the same views).

Geometric transforms (random-resized crop, flip, shift) compose into one view per image
(pipeline/data/views.py, the same views a view-consistent cache stores). Mixup and CutMix mix
images and return (perm, lam): the losses mix the targets linearly (FKD's rule). Pure PyTorch.
"""

from __future__ import annotations

import math

import torch

from pipeline.config.augment import Augment, CutMix, Mixup
from pipeline.data.views import apply_views, draw_views

def mix(x: torch.Tensor, t: Mixup | CutMix, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mixed images, perm, lam): image i mixed with image perm[i]; its targets are lam * own + (1 - lam) * perm's."""
    n = len(x)
    perm = torch.randperm(n, generator=generator, device=x.device)
    g = torch.distributions.Gamma(torch.tensor([t.alpha, t.alpha]), torch.tensor([1.0, 1.0]))
    a, b = g.sample()  # Beta(alpha, alpha) from two gammas (the global generator, seeded per step)
    lam = (a / (a + b)).to(x.device)
    if isinstance(t, Mixup):
        return lam * x + (1 - lam) * x[perm], perm, lam
    height, width = x.shape[-2:]  # CutMix: a box of area 1 - lam from the partner, lam recomputed from the box
    cut = math.sqrt(float(1 - lam))
    bh, bw = int(round(height * cut)), int(round(width * cut))
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    y0, y1 = max(cy - bh // 2, 0), min(cy + bh - bh // 2, height)
    x0, x1 = max(cx - bw // 2, 0), min(cx + bw - bw // 2, width)
    out = x.clone()
    out[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    return out, perm, torch.tensor(1 - (y1 - y0) * (x1 - x0) / (height * width), device=x.device)


def augment(x: torch.Tensor, transforms: list[Augment], generator: torch.Generator | None = None
            ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(augmented images, (perm, lam) if a mixing transform ran, else None)."""
    geometric = [t for t in transforms if not isinstance(t, (Mixup, CutMix))]
    if geometric:
        x = apply_views(x, draw_views(len(x), x.shape[-2], x.shape[-1], geometric, generator, x.device))
    for t in transforms:
        if isinstance(t, (Mixup, CutMix)):
            x, perm, lam = mix(x, t, generator)
            return x, (perm, lam)
    return x, None
