"""Views of an image: a box (cx, cy, w, h, in fractions of the image) and a mirror, drawn from a
generator and applied with one bilinear `grid_sample`. FKD's per-crop parameters: stage 1 draws R
of them per image for a view-consistent cache and runs the teacher on each, stage 2 replays a
stored one or draws its own for augmentation; both apply them with `apply_views`. Pure PyTorch."""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from pipeline.config.augment import Augment, Flip, RandomResizedCrop, Shift

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


def image_views(sample_ids: list[str], count: int, height: int, width: int, transforms: list[Augment],
                seed: int) -> torch.Tensor:
    """(N, count, 5) views per image: view 0 is the whole image (evaluation and agreement read it),
    the others drawn from a generator seeded by the cache's seed and the image's id, so an image's
    views do not depend on how rows were batched or which actor ran them."""
    out = identity_views(len(sample_ids) * count).reshape(len(sample_ids), count, 5)
    for i, sid in enumerate(sample_ids):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(str(sid).encode()))
        out[i, 1:] = draw_views(count - 1, height, width, transforms, gen)
    return out
