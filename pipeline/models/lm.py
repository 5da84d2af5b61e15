"""Causal language models for token-level distillation: a small GPT-style decoder (HF models: pipeline.models.hf).

Every factory returns a module whose forward takes input_ids (B, L) and returns logits (B, L, V)
as a plain tensor (or, with `hidden=True`, the last hidden layer and the head: see models/hidden.py), so the pipeline treats a language model like the image models: `build_model`
passes `num_classes` (the vocabulary size) and `input_shape` ((L,), the window length the model
reads). Ids may arrive as int32 (the cache column) or float (the teacher actor casts its input to
float32); forward casts them to long.

Padding is only ever at the end of a window, so a causal model needs no attention mask: real
positions never attend to padded ones, and the loss masks the padded targets by `length`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.hidden import Hidden


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask, through PyTorch's fused SDPA kernels."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads = n_heads
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, D) -> (B, L, D)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class CausalLM(nn.Module):
    """GPT-style decoder: token + learned position embeddings, pre-LN blocks, final LN, tied head.

    Module names for taps: `tok_emb`, `pos_emb`, `blocks.{i}` (the residual stream after block i,
    (B, L, d_model)), `blocks.{i}.attn`, `blocks.{i}.mlp`, `ln_f`, `head`.
    """

    def __init__(self, vocab_size: int, max_len: int, d_model: int, n_layers: int, n_heads: int, d_ff: int,
                 dropout: float = 0.0, tie_weights: bool = True) -> None:
        super().__init__()
        self.max_len = max_len
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList([Block(d_model, n_heads, d_ff, dropout) for _ in range(n_layers)])
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.apply(self._init)
        for name, p in self.named_parameters():
            # GPT-2: scale the projections into the residual stream by 1/sqrt(2 * layers).
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
                nn.init.normal_(p, std=0.02 / (2 * n_layers) ** 0.5)
        if tie_weights:
            self.head.weight = self.tok_emb.weight

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, input_ids: torch.Tensor, hidden: bool = False) -> torch.Tensor | Hidden:
        """input_ids (B, L), any integer or float dtype -> logits (B, L, V), or with `hidden` the
        last hidden layer and the head, for a loss that applies the head in chunks."""
        n = input_ids.shape[1]
        if n > self.max_len:
            raise ValueError(f"sequence of {n} tokens is longer than the model's max_len {self.max_len}")
        pos = torch.arange(n, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids.long()) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return Hidden(x, self.head.weight, self.head.bias) if hidden else self.head(x)


def causal_lm(num_classes: int = 8192, input_shape: tuple[int, ...] = (64,), d_model: int = 128, n_layers: int = 2,
              n_heads: int = 4, d_ff: int | None = None, dropout: float = 0.0, max_len: int | None = None,
              tie_weights: bool = True) -> nn.Module:
    """A small GPT-style causal LM.

    Args:
        num_classes: vocabulary size V (filled in from the tokenizer or the cache manifest).
        input_shape: (L,), the window length read per row; the position table covers
            `max_len` positions (default L).
        d_ff: MLP width, default 4 * d_model.
        tie_weights: share the token embedding with the output head (GPT-2's choice); at small
            d_model the vocabulary dominates the parameter count, and tying halves that part.

    Returns:
        A `CausalLM` mapping input_ids (B, L) to logits (B, L, num_classes).
    """
    length = max_len or int(input_shape[0])
    return CausalLM(num_classes, length, d_model, n_layers, n_heads, d_ff or 4 * d_model, dropout, tie_weights)


def lm_teacher(num_classes: int = 8192, input_shape: tuple[int, ...] = (64,)) -> nn.Module:
    """d_model 256, 4 layers, 8 heads."""
    return causal_lm(num_classes, input_shape, d_model=256, n_layers=4, n_heads=8)


def lm_small(num_classes: int = 8192, input_shape: tuple[int, ...] = (64,)) -> nn.Module:
    """d_model 128, 2 layers, 4 heads."""
    return causal_lm(num_classes, input_shape, d_model=128, n_layers=2, n_heads=4)


def lm_tiny(num_classes: int = 8192, input_shape: tuple[int, ...] = (64,)) -> nn.Module:
    """d_model 64, 1 layer, 2 heads."""
    return causal_lm(num_classes, input_shape, d_model=64, n_layers=1, n_heads=2)


# Configs and caches written before the HF adapter had its own module name it here.
from pipeline.models.hf import hf_causal_lm  # noqa: E402,F401
