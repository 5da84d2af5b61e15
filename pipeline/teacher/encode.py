"""Teacher outputs -> cache columns. Pure functions, no Ray."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.taps import signal

_DTYPES = {"float16": np.float16, "float32": np.float32}


def encode_full_logits(logits: torch.Tensor, dtype: str = "float16") -> np.ndarray:
    """Raw logits, unsoftened, so any temperature can be applied exactly at train time.

    float16 keeps about 3 significant digits, which bounds the KL error at T >= 1 far below
    the noise of SGD; the cast happens on the device before the copy to host.
    """
    if logits.ndim != 2:
        raise ValueError(f"expected (batch, classes) logits, got shape {tuple(logits.shape)}")
    torch_dtype = torch.float16 if dtype == "float16" else torch.float32
    return logits.detach().to(torch_dtype).cpu().numpy().astype(_DTYPES[dtype], copy=False)


def encode_tap(feature: torch.Tensor, kind: str, pool: list[int] | None = None, p: float = 2.0) -> np.ndarray:
    """A captured activation in its stored form (see pipeline.models.taps.signal), float16.

    Pooled features, attention maps and embeddings are small next to the activation, and
    float16's 3 significant digits are well inside the noise of an MSE or distance loss.
    """
    return signal(kind, feature.detach().float(), pool=pool, p=p).to(torch.float16).cpu().numpy()
