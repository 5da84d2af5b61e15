"""`distill fit-teacher`: train the demo teacher in one process and save its weights.

Teachers are normally trained elsewhere and only loaded here; this exists so the demo and
tests have a real, trained teacher without downloading one.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache import storage
from pipeline.config import PRIMARY_TEACHER, PrecomputeConfig, TeacherConfig
from pipeline.data.sources import describe, load_split
from pipeline.errors import DistillError
from pipeline.models.factory import build_model, save_state


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to +-max_shift pixels (zero fill): cheap, label-preserving augmentation."""
    if max_shift == 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(b, x.shape[1], h, w + 2 * max_shift)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, cols)


def accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            correct += int((model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy() == y[i:i + batch]).sum())
    return correct / len(y)


def fit_teacher(cfg: PrecomputeConfig, log=print, name: str | None = None) -> float:
    """Fit every teacher of the config (or only `name`) and save its weights. Returns the primary's
    (or the named one's) val accuracy."""
    names = [name] if name else list(cfg.all_teachers)
    if name and name not in cfg.all_teachers:
        raise DistillError(f"no teacher named {name!r}", f"teachers in this config: {list(cfg.all_teachers)}")
    accuracies = {n: _fit_one(cfg, cfg.all_teachers[n], n, log) for n in names}
    return accuracies[names[0]]


def _fit_one(cfg: PrecomputeConfig, teacher: TeacherConfig, name: str, log) -> float:
    """Train on the train split, report val accuracy, save weights to `weights`."""
    if not teacher.weights:
        field = "teacher" if name == PRIMARY_TEACHER else f"teachers.{name}"
        raise DistillError(f"`{field}.weights` is not set", "set the URI the trained weights should be written to")
    storage.configure(**cfg.storage.model_dump())
    fit = teacher.fit
    info = describe(cfg.source)
    train, val = load_split(cfg.source, "train"), load_split(cfg.source, "val")
    torch.manual_seed(fit.seed)
    gen = torch.Generator().manual_seed(fit.seed)
    spec = teacher.model_copy(update={"weights": None})
    model = build_model(spec, input_shape=info.input_shape, num_classes=info.num_classes)
    opt = torch.optim.Adam(model.parameters(), lr=fit.lr)
    x, y = torch.from_numpy(train["x"]), torch.from_numpy(train["label"])
    log(f"fitting teacher {name!r} ({teacher.factory}) on {len(y)} rows for {fit.epochs} epochs")
    started = time.time()
    for epoch in range(fit.epochs):
        model.train()
        order = torch.randperm(len(y), generator=gen)
        total = 0.0
        for i in range(0, len(y), fit.batch_size):
            idx = order[i:i + fit.batch_size]
            loss = F.cross_entropy(model(random_shift(x[idx], fit.shift, gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
        val_acc = accuracy(model, val["x"], val["label"])
        log(f"epoch {epoch + 1}/{fit.epochs}  loss {total / len(y):.4f}  val_accuracy {val_acc:.4f}  ({time.time() - started:.0f}s)")
    save_state(model, teacher.weights)
    log(f"saved teacher {name!r} weights to {teacher.weights} (val accuracy {val_acc:.4f})")
    return val_acc
