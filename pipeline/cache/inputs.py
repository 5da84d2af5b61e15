"""How a model reads a cache's `x`: stored as the source holds it (uint8 pixels stay uint8, 4x smaller
than float32 and no bigger than the source), decoded to float32(x) * input_scale where it is used.
The manifest's dataset record carries `input_dtype` and `input_scale` (float32 and 1 when absent)."""

from __future__ import annotations

import numpy as np


def decode_inputs(x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    out = np.asarray(x, dtype=np.float32)
    return out * np.float32(scale) if scale != 1.0 else out
