"""`distill fit-teacher`: train the demo teacher in one process and save its weights.

Teachers are normally trained elsewhere and only loaded here; this exists so the demo and
tests have a real, trained teacher without downloading one.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache.schema import INPUT_IDS, LENGTH
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
    return correct / len(y) if len(y) else float("nan")  # a source with no validation split


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
    if cfg.source.kind == "text":
        return _fit_lm(cfg, teacher, name, log)
    fit = teacher.fit
    info = describe(cfg.source, cfg.storage)
    train, val = load_split(cfg.source, "train", cfg.storage), load_split(cfg.source, "val", cfg.storage)
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
    save_state(model, teacher.weights, cfg.storage)
    log(f"saved teacher {name!r} weights to {teacher.weights} (val accuracy {val_acc:.4f})")
    return val_acc


def lm_perplexity(model: torch.nn.Module, ids: np.ndarray, lengths: np.ndarray, batch: int = 64) -> float:
    """exp(mean next-token NLL) over the real (unpadded) targets of (N, L + 1) windows."""
    model.eval()
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            x = torch.from_numpy(ids[i:i + batch].astype(np.int64))
            mask = torch.arange(x.shape[1] - 1)[None, :] < torch.from_numpy(lengths[i:i + batch].astype(np.int64))[:, None] - 1
            logits = model(x[:, :-1]).float()
            loss = F.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
            nll += float((loss * mask).sum())
            tokens += int(mask.sum())
    return math.exp(nll / max(tokens, 1))


def _fit_lm(cfg: PrecomputeConfig, teacher: TeacherConfig, name: str, log) -> float:
    """Next-token training of a language-model teacher on the source's train windows. Returns val
    perplexity (lower is better), so the log line reads like the image teachers' accuracy."""
    fit = teacher.fit
    info = describe(cfg.source, cfg.storage)
    train, val = load_split(cfg.source, "train", cfg.storage), load_split(cfg.source, "val", cfg.storage)
    torch.manual_seed(fit.seed)
    gen = torch.Generator().manual_seed(fit.seed)
    model = build_model(teacher.model_copy(update={"weights": None}), input_shape=info.input_shape, num_classes=info.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=fit.lr, weight_decay=0.01)
    ids = torch.from_numpy(train[INPUT_IDS].astype(np.int64))
    lengths = torch.from_numpy(train[LENGTH].astype(np.int64))
    steps = fit.epochs * math.ceil(len(ids) / fit.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=fit.lr, total_steps=steps, pct_start=0.1)
    log(f"fitting teacher {name!r} ({teacher.factory}) on {len(ids)} windows ({int((lengths - 1).clamp(min=0).sum())} tokens, "
        f"vocabulary {info.num_classes}) for {fit.epochs} epochs")
    started, step = time.time(), 0
    for epoch in range(fit.epochs):
        model.train()
        order = torch.randperm(len(ids), generator=gen)
        for i in range(0, len(ids), fit.batch_size):
            idx = order[i:i + fit.batch_size]
            x = ids[idx]
            mask = torch.arange(x.shape[1] - 1)[None, :] < lengths[idx][:, None] - 1
            loss = (F.cross_entropy(model(x[:, :-1]).transpose(1, 2), x[:, 1:], reduction="none") * mask).sum() / mask.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            if step % 50 == 0:
                log(f"  step {step}/{steps}  loss {loss.item():.3f}  ({time.time() - started:.0f}s)")
        ppl = lm_perplexity(model, val[INPUT_IDS], val[LENGTH])
        log(f"epoch {epoch + 1}/{fit.epochs}  val_perplexity {ppl:.2f}  ({time.time() - started:.0f}s)")
    save_state(model, teacher.weights, cfg.storage)  # type: ignore[arg-type]
    log(f"saved teacher {name!r} weights to {teacher.weights} (val perplexity {ppl:.2f})")
    return ppl
