"""Data parallelism for the student: DDP (Ray Train's `prepare_model`) or FSDP2 (`fully_shard`), and
checkpoints in PyTorch's distributed checkpoint format, which both save sharded and load into any
number of workers (a run started with N workers resumes with M)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, ContextManager

import torch
from torch import nn

MODEL_DIR = "model"  # DCP files of the model and optimizer state, one per worker, plus .metadata


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def wrap(model: nn.Module, parallel: str, device: torch.device) -> nn.Module:
    """DDP (or the plain model with one worker) or FSDP2: each block of a ModuleList (transformer
    layers) is its own FSDP unit, the rest (embeddings, head) the root's."""
    if not _distributed():  # one worker, or a sweep trial's own process
        return model.to(device)
    if parallel == "ddp":
        import ray.train.torch

        return ray.train.torch.prepare_model(model)
    from torch.distributed.fsdp import fully_shard

    model.to(device)
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                if any(p.requires_grad for p in block.parameters()):
                    fully_shard(block)
    fully_shard(model)
    return model


def reshard(model: nn.Module) -> None:
    """Free FSDP's gathered parameters after a forward without backward (evaluation): the root
    module keeps them gathered otherwise."""
    if hasattr(model, "reshard"):
        model.reshard()


def bare(model: nn.Module) -> nn.Module:
    """The module inside DDP's wrapper (FSDP2 keeps the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sync(model: nn.Module, last: bool) -> ContextManager[Any]:
    """Gradient accumulation: reduce gradients across workers only on a step's last micro-batch."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def save(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every worker writes its shard of the model and optimizer state into `directory` (a
    collective: all workers call it). Ray Train merges the workers' directories into one checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(bare(model), optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if _distributed():
        dcp.save(state, checkpoint_id=os.path.join(directory, MODEL_DIR))
    else:
        dcp.save(state, checkpoint_id=os.path.join(directory, MODEL_DIR), no_dist=True)


def load(directory: str, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore the model and optimizer from a checkpoint written by `save` with any number of workers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(bare(model), optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=os.path.join(directory, MODEL_DIR), no_dist=not _distributed())
    set_state_dict(bare(model), optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state on CPU, gathered from the shards (a collective; complete on rank 0)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(bare(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def prefix_of(model: nn.Module, sub: nn.Module) -> str:
    """The state-dict key prefix of a submodule ("" for the model itself)."""
    for name, module in bare(model).named_modules():
        if module is sub:
            return f"{name}." if name else ""
    raise ValueError("the student is not a submodule of the trained model")


def local_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of parameters and of optimizer state this worker holds (its shards under FSDP)."""

    def size(t: torch.Tensor) -> int:
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    params = sum(size(p) for p in model.parameters())
    optim = sum(size(v) for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    return {"param_bytes": params, "optimizer_bytes": optim}
