"""Mixed precision for the student: autocast for the forward pass, float32 weights, optimizer
state and losses, and a gradient scaler for fp16 (bf16 keeps float32's range and needs none)."""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """`autocast()` around the forward, `backward(loss)` and `step(optimizer, params, clip)`.

    fp16 on CPU has no scaler in every torch build, and CPU autocast to fp16 is slow; it is meant
    for GPUs (bf16 is the CPU choice). The scaler's state goes into checkpoints (`state_dict`).
    """

    def __init__(self, name: str, device: torch.device) -> None:
        self.name = name
        self.device = device
        self.dtype = DTYPES.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None

    def autocast(self) -> ContextManager[Any]:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], clip: float | None) -> float | None:
        """Unscale, clip to `clip` (global L2 norm; returns the norm before clipping), step, update the scale."""
        norm = None
        if self.scaler:
            self.scaler.unscale_(optimizer)
        if clip:
            total = torch.nn.utils.clip_grad_norm_(params, clip)
            norm = float(total.full_tensor() if hasattr(total, "full_tensor") else total)  # FSDP: a DTensor
        if self.scaler:
            self.scaler.step(optimizer)  # skipped when the unscaled gradients hold inf/nan
            self.scaler.update()
        else:
            optimizer.step()
        return norm

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
