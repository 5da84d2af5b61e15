"""Token ids packed at the vocabulary's bit width. Above 4,096 tokens a token cache stores its id
columns as ceil(log2 V) bits per id in a little-endian bit stream, one uint8 vector per row, and
records the width as the output's `index_bits` in the manifest. Above 65,536 the next byte-aligned
type would be uint32, twice uint16's bytes for 17 bits of information; between 4,096 and 65,536 the
uint16 ids are too many distinct values for Parquet's dictionary encoding and compress worse than
the packed bytes (25 sampled ids and weights: 48.6 against 33.1 stored bytes a token at 32,768,
39.9 against 31.9 at 8,192). Pure numpy: any reader can unpack them."""

from __future__ import annotations

import math

import numpy as np

PACK_ABOVE = 1 << 12  # vocabularies up to this store ids as uint8 / uint16 columns, unpacked


def index_bits(vocab_size: int) -> int | None:
    """Bits a packed id takes at this vocabulary, or None where ids are stored unpacked."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    return max(1, math.ceil(math.log2(vocab_size))) if vocab_size > PACK_ABOVE else None


def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` ids at `bits` each (a row's stream is padded to whole bytes)."""
    return (count * bits + 7) // 8


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """(rows, ...) ids in [0, 2**bits) -> (rows, packed_bytes(prod(...), bits)) uint8, id i at bits
    [i * bits, (i + 1) * bits) of its row's little-endian stream."""
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in [1, 32], got {bits}")
    rows = ids.shape[0]
    flat = np.ascontiguousarray(ids).reshape(rows, -1).astype(np.uint64)
    if flat.size and int(flat.max()) >> bits:
        raise ValueError(f"an id of {int(flat.max())} does not fit {bits} bits")
    # One bit plane at a time: the teacher actor holds a byte per bit, not eight (a (rows, ids, bits) uint64).
    bit_matrix = np.empty((*flat.shape, bits), dtype=np.uint8)
    for b in range(bits):
        bit_matrix[..., b] = (flat >> np.uint64(b)) & np.uint64(1)
    return np.packbits(bit_matrix.reshape(rows, -1), axis=-1, bitorder="little")


def unpack_ids(packed: np.ndarray, bits: int, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of `pack_ids`: (rows, bytes) uint8 -> (rows, *shape) int64."""
    rows, count = packed.shape[0], math.prod(shape)
    if packed.shape[-1] != packed_bytes(count, bits):
        raise ValueError(f"a packed row of {packed.shape[-1]} bytes does not hold {count} ids of {bits} bits")
    start = np.arange(count, dtype=np.int64) * bits
    byte, shift = start >> 3, (start & 7).astype(np.uint64)
    padded = np.pad(np.ascontiguousarray(packed, dtype=np.uint8).reshape(rows, -1), ((0, 0), (0, 5)))
    word = np.zeros((rows, count), dtype=np.uint64)
    for j in range(5):  # an id of up to 32 bits starting at any bit of a byte spans at most 5 bytes
        word |= padded[:, byte + j].astype(np.uint64) << np.uint64(8 * j)
    ids = (word >> shift) & np.uint64((1 << bits) - 1)
    return ids.astype(np.int64).reshape(rows, *shape)
