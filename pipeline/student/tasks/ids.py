"""A token cache's packed id columns (pipeline/cache/packing.py) unpacked on the batch's device, so
the reader and the batch move the packed bytes and only the loss sees int64 ids."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pipeline.cache.packing import packed_bytes


def unpack_ids(packed: torch.Tensor, bits: int, shape: tuple[int, ...]) -> torch.Tensor:
    """(rows, bytes) uint8 -> (rows, *shape) int64: id i is bits [i * bits, (i + 1) * bits) of its
    row's little-endian stream (`pipeline.cache.packing.unpack_ids`, in torch)."""
    count = math.prod(shape)
    if packed.shape[-1] != packed_bytes(count, bits):
        raise ValueError(f"a packed row of {packed.shape[-1]} bytes does not hold {count} ids of {bits} bits")
    start = torch.arange(count, device=packed.device) * bits
    byte, shift = start >> 3, start & 7
    padded = F.pad(packed.reshape(-1, packed.shape[-1]), (0, 5)).long()
    word = padded[:, byte]
    for j in range(1, 5):  # an id of up to 32 bits starting at any bit of a byte spans at most 5 bytes
        word = word | (padded[:, byte + j] << (8 * j))
    return ((word >> shift) & ((1 << bits) - 1)).reshape(packed.shape[0], *shape)
