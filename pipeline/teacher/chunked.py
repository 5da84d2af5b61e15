"""Stage 1 at a large vocabulary: a language-model teacher's logits made and encoded a chunk of
positions at a time, so an actor holds one chunk's (n, V) logits and the encoders' float copies of
that chunk, never the batch's (B, L, V). For a 128k vocabulary at L=2,048 and batch 32 the whole
batch's float32 logits alone are 34 GB; a chunk is 64 MB."""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.models.hidden import Hidden, returns_hidden
from pipeline.teacher.grouping import grouped_forward

# Logits per chunk (64 MiB in float32). Fixed, not sized to the device: the sampled encoders draw
# from one generator chunk after chunk, so a rerun on another card must cut the same chunks.
CHUNK_LOGITS = 2**24


def chunk_positions(vocab: int, chunk_logits: int | None = None) -> int:
    """Positions per chunk at this vocabulary (at least one)."""
    return max(1, (chunk_logits or CHUNK_LOGITS) // vocab)


def logit_chunks(model: torch.nn.Module, inputs: torch.Tensor, lengths: np.ndarray,
                 chunk_logits: int | None = None) -> Iterator[torch.Tensor]:
    """The teacher's logits over the flattened (B * L) positions, `chunk_positions(V)` at a time,
    zeros past each row's targets (as `grouped_forward`). A model whose forward returns its last
    hidden layer (models/hidden.py) applies its head per chunk, so no (B, L, V) tensor exists; any
    other module's logits are made whole and only the encoding is chunked."""
    batch, width = inputs.shape
    if returns_hidden(model):
        # The head's bias makes zero hidden states nonzero logits: zero them past each row's targets again.
        real = (torch.arange(width, device=inputs.device)[None, :]
                < torch.from_numpy(np.asarray(lengths) - 1).to(inputs.device)[:, None]).reshape(-1)
        heads: list[Hidden] = []

        def hidden_of(x: torch.Tensor) -> torch.Tensor:
            out = model(x, hidden=True)
            heads.append(out)
            return out.hidden

        flat = grouped_forward(hidden_of, inputs, lengths).reshape(batch * width, -1)
        weight, bias = heads[0].weight, heads[0].bias
        step = chunk_positions(weight.shape[0], chunk_logits)
        for start in range(0, flat.shape[0], step):
            z = F.linear(flat[start:start + step], weight, bias)
            yield z.masked_fill_(~real[start:start + step, None], 0)  # z is this chunk's own buffer
        return
    logits = grouped_forward(model, inputs, lengths)
    flat = logits.reshape(batch * width, logits.shape[-1])
    step = chunk_positions(flat.shape[-1], chunk_logits)
    for start in range(0, flat.shape[0], step):
        yield flat[start:start + step]


def encode_in_chunks(chunks: Iterator[torch.Tensor], encode: Callable[[torch.Tensor], dict[str, np.ndarray]],
                     batch: int, width: int) -> dict[str, np.ndarray]:
    """`encode` ((1, n, V) logits -> {column: (1, n, ...)}) over each chunk, joined into (B, L, ...) columns."""
    parts: dict[str, list[np.ndarray]] = {}
    for z in chunks:
        for name, value in encode(z[None]).items():
            parts.setdefault(name, []).append(value[0])
    return {name: np.concatenate(values).reshape(batch, width, *values[0].shape[1:]) for name, values in parts.items()}
