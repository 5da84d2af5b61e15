"""Build any torch.nn.Module from `module:function` + kwargs, and move its weights through fsspec."""

from __future__ import annotations

import hashlib
import importlib
import inspect
import io
from typing import Callable

import torch
from torch import nn

from pipeline import storage
from pipeline.config import ModelSpec
from pipeline.errors import DistillError
from pipeline.models.vit import DISTILL_LOGITS

# Factories built and weights loaded in this process, in order. Train workers report them, so a
# test can check inside the worker that no teacher was ever constructed there.
BUILT_IN_THIS_PROCESS: list[str] = []
LOADED_IN_THIS_PROCESS: list[str] = []


def resolve_factory(factory: str) -> Callable[..., nn.Module]:
    module_name, _, func_name = factory.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise DistillError(
            f"unknown model factory {factory!r}: cannot import module {module_name!r} ({e})",
            "use `package.module:function` importable on every node, e.g. pipeline.models.builtin:mlp",
        ) from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise DistillError(
            f"unknown model factory {factory!r}: {module_name} has no function {func_name!r}",
            "check the function name after the colon",
        )
    return fn


def build_model(
    spec: ModelSpec,
    *,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    load_weights: bool = True,
    options: storage.Options = None,
) -> nn.Module:
    """Call the factory, passing `input_shape`/`num_classes` (and the storage options its files are
    read with, as `storage_options`) where it accepts them, then load weights."""
    fn = resolve_factory(spec.factory)
    kwargs = dict(spec.kwargs)
    params = inspect.signature(fn).parameters
    if input_shape is not None and "input_shape" in params and "input_shape" not in kwargs:
        kwargs["input_shape"] = tuple(input_shape)
    if num_classes is not None and "num_classes" in params and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    if options is not None and "storage_options" in params:
        kwargs["storage_options"] = options
    try:
        model = fn(**kwargs)
    except TypeError as e:
        raise DistillError(f"model factory {spec.factory} rejected its kwargs: {e}", "fix the `kwargs` in the config") from None
    if not isinstance(model, nn.Module):
        raise DistillError(f"model factory {spec.factory} returned {type(model).__name__}", "it must return a torch.nn.Module")
    BUILT_IN_THIS_PROCESS.append(spec.factory)
    if load_weights and spec.weights:
        load_state(model, spec.weights, options)
    return model


def output_width(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Classes the model predicts, found by one forward pass on zeros."""
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        out = model(torch.zeros(1, *input_shape))
    model.train(was_training)
    return int(out.shape[-1])


def distillation_head(model: nn.Module, input_shape: tuple[int, ...]) -> bool:
    """Whether the model trains a second head on the teacher (DeiT's distillation token), by one
    training-mode forward pass on zeros (such a model shows both heads only when training)."""
    was_training = model.training
    model.train()
    with torch.no_grad():
        out = model(torch.zeros(2, *input_shape))
    model.train(was_training)
    return isinstance(out, dict) and DISTILL_LOGITS in out


def save_state(model: nn.Module, uri: str, options: storage.Options = None) -> None:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    storage.write_bytes_atomic(uri, buf.getvalue(), options)


def load_state(model: nn.Module, uri: str, options: storage.Options = None) -> None:
    LOADED_IN_THIS_PROCESS.append(uri)
    if not storage.exists(uri, options):
        raise DistillError(f"weights {uri!r} do not exist", "train them first (distill fit-teacher CONFIG) or fix `weights`")
    state = torch.load(io.BytesIO(storage.read_bytes(uri, options)), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3]) or str(e)
        raise DistillError(f"weights {uri!r} do not fit the model: {detail}", "check the factory kwargs against the weights") from None


def weights_digest(uri: str | None, options: storage.Options = None) -> str | None:
    """Content digest of the weights file: part of the teacher's identity in the cache key."""
    if not uri:
        return None
    if not storage.exists(uri, options):
        raise DistillError(f"teacher weights {uri!r} do not exist", "train them first: distill fit-teacher CONFIG")
    return hashlib.sha256(storage.read_bytes(uri, options)).hexdigest()[:16]
