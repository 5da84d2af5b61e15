"""A small vision transformer student, with DeiT's distillation token (Touvron et al., ICML 2021).

The distillation token is a second learned token beside the class token; its own head is trained
on the teacher's targets (the `kd` or `deit_hard` term) while the class head is trained on the
labels (`ce`). In training the model returns both heads' logits, `{"logits": class head,
"distill_logits": distillation head}`; in evaluation the mean of the two, as DeiT predicts. With
`distillation_token=False` it is the plain ViT (one class token, one head), the hard-label
baseline DeiT compares against.
"""

from __future__ import annotations

import torch
from torch import nn

DISTILL_LOGITS = "distill_logits"


class ViT(nn.Module):
    """Patches of `patch` x `patch` pixels embedded to `dim`, pre-norm encoder layers, a head per token."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, patch: int, dim: int, depth: int, heads: int,
                 mlp_ratio: float, dropout: float, distillation_token: bool) -> None:
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ValueError(f"patch {patch} does not tile an image of {h}x{w}: choose a divisor of both")
        self.embed = nn.Conv2d(c, dim, patch, stride=patch)
        tokens = 2 if distillation_token else 1
        self.tokens = nn.Parameter(torch.zeros(1, tokens, dim))
        self.position = nn.Parameter(torch.zeros(1, tokens + (h // patch) * (w // patch), dim))
        nn.init.trunc_normal_(self.tokens, std=0.02)
        nn.init.trunc_normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes) if distillation_token else None

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        patches = self.embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        z = torch.cat([self.tokens.expand(len(x), -1, -1), patches], dim=1) + self.position
        z = self.norm(self.encoder(z))
        logits = self.head(z[:, 0])
        if self.head_dist is None:
            return logits
        distill = self.head_dist(z[:, 1])
        if self.training:
            return {"logits": logits, DISTILL_LOGITS: distill}
        return (logits + distill) / 2


def vit_student(input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10, patch: int = 7, dim: int = 64,
                depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, dropout: float = 0.0,
                distillation_token: bool = True) -> nn.Module:
    """DeiT-style student (a class and a distillation token) by default; `distillation_token: false` for plain ViT."""
    return ViT(tuple(input_shape), num_classes, patch, dim, depth, heads, mlp_ratio, dropout, distillation_token)
