"""Stage 2's image augmentation, drawn from torch's generator (the worker loop seeds it per step from
the run's seed, so a resumed run replays the same views).

Geometric transforms (random-resized crop, flip, shift) compose into one view per image, (cx, cy, w,
h, flip) in fractions of the image, applied with one `grid_sample`: the same parameters FKD stores
per crop, so a view-consistent cache replays its stored views through `apply_views`. Mixup and
CutMix mix images and return (perm, lam): the losses mix the targets linearly (FKD's rule).
Pure PyTorch; tested against the definitions on small tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.config.augment import Augment, CutMix, Flip, Mixup, RandomResizedCrop, Shift

VIEW_FIELDS = ("cx", "cy", "w", "h", "flip")


def identity_views(n: int, device: torch.device | None = None) -> torch.Tensor:
    """(n, 5) views of the whole image, unflipped."""
    return torch.tensor([[0.5, 0.5, 1.0, 1.0, 0.0]], device=device).repeat(n, 1)


def draw_views(n: int, height: int, width: int, transforms: list[Augment], generator: torch.Generator | None = None,
               device: torch.device | None = None) -> torch.Tensor:
    """(n, 5) views, each transform's parameters drawn per image in the list's order."""
    views = identity_views(n, device)
    u = lambda *shape: torch.rand(*shape, generator=generator, device=device)  # noqa: E731
    for t in transforms:
        if isinstance(t, RandomResizedCrop):
            area = t.scale[0] + (t.scale[1] - t.scale[0]) * u(n)
            log_ratio = math.log(t.ratio[0]) + (math.log(t.ratio[1]) - math.log(t.ratio[0])) * u(n)
            w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
            h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
            views[:, 0] = w / 2 + (1 - w) * u(n)
            views[:, 1] = h / 2 + (1 - h) * u(n)
            views[:, 2], views[:, 3] = w, h
        elif isinstance(t, Flip):
            views[:, 4] = (u(n) < t.p).float()
        elif isinstance(t, Shift):
            pixels = torch.randint(-t.pixels, t.pixels + 1, (n, 2), generator=generator, device=device).float()
            views[:, 0] += pixels[:, 0] / width * views[:, 2]
            views[:, 1] += pixels[:, 1] / height * views[:, 3]
    return views


def apply_views(x: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Each image of (B, C, H, W) seen through its view: the box (cx, cy, w, h) resized to H x W,
    mirrored where flip is 1; outside the image is zero. Bilinear; the identity view returns x."""
    cx, cy, w, h, flip = views.to(x.dtype).unbind(1)
    theta = torch.zeros(len(x), 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = w * (1 - 2 * flip)
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * cy - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


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
