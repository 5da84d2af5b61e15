"""What the benchmark harnesses share: the machine a report was measured on, the target check, the
report files, and the MNIST KD workload that `stages` and `sweep` both time, so their numbers compare."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import ModelSpec, PrecomputeConfig, TrainConfig
from pipeline.data.sources import load_split
from pipeline.models.factory import build_model
from pipeline.student.tasks.classification import ClassificationTask
from pipeline.student.train.step import make_optimizer, train_epoch
from pipeline.teacher.fit import fit_teacher

SOURCE = {"kind": "mnist"}
INPUT = (1, 28, 28)
KD = {"temperature": 4.0, "terms": {"kd": 0.7, "ce": 0.3}}

# ---------------------------------------------------------------- the machine


def _cpu_model() -> str:
    """The CPU's marketing name: `platform.processor()` is only the architecture on Linux."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The machine this process runs on, detected now, so a report never claims a GPU it lacked or hides one it had."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return {"host": platform.node(), "arch": platform.machine(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
            "gpus": gpus, "accelerator": torch.cuda.get_device_name(0) if gpus else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}


def machine_line(m: dict[str, Any]) -> str:
    """`machine()` in a few words for a report's Markdown: "x86_64, 2 CPUs, no GPU"."""
    gpu = f"{m['gpus']}x {m['accelerator']}" if m["gpus"] else "no GPU"
    return f"{m['arch']}, {m['cpus']} CPUs, {gpu}"


# ---------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """A ratio's bound: `op` ">=" for a floor, "<=" for a ceiling."""

    name: str
    op: str
    threshold: float

    def __post_init__(self) -> None:
        if self.op not in (">=", "<="):
            raise ValueError(f"target {self.name}: op must be '>=' or '<=', not {self.op!r}")

    @property
    def kind(self) -> str:
        """The reports' `targets` field spells a floor "min" and a ceiling "max"."""
        return "min" if self.op == ">=" else "max"

    def met(self, value: float) -> bool:
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


def missed(values: Mapping[str, float | None], table: Mapping[str, Target]) -> list[str]:
    """One line per value that misses its target, in `values`' order; a None value (a section not run) is skipped."""
    out = []
    for name, value in values.items():
        t = table[name]
        if value is not None and not t.met(value):
            out.append(f"{name} = {value:.3f}, target {t.op} {t.threshold:g}")
    return out


def interval(x: np.ndarray) -> tuple[float, float, float]:
    """(mean, low, high) of a 95% t-interval over seeds."""
    from scipy import stats

    m = float(np.mean(x))
    if len(x) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x)))
    return m, m - half, m + half


def target_records(values: Mapping[str, float], table: Mapping[str, Target]) -> dict[str, dict[str, Any]]:
    """A report's `targets` field: each target's kind, threshold and whether its value met it."""
    return {name: {"kind": t.kind, "threshold": t.threshold, "met": t.met(values[name])} for name, t in table.items()}


def finish(out_dir: str, name: str, report: dict[str, Any], markdown: str, values: Mapping[str, float],
           table: Mapping[str, Target]) -> int:
    """Write the report pair, print its Markdown and every missed target; the harness's exit code (1 on a miss)."""
    json_path, md_path = write_report(out_dir, name, report, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")
    misses = missed(values, table)
    for line in misses:
        print(f"target missed: {line}", file=sys.stderr)
    return 1 if misses else 0


def targets(*items: Target) -> dict[str, Target]:
    """A harness's target table, by name."""
    return {t.name: t for t in items}


# ---------------------------------------------------------------- report files


def write_json(path: str, data: Any) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return path


def write_report(out_dir: str, name: str, report: dict[str, Any], markdown: str) -> tuple[str, str]:
    """`<out_dir>/<name>.json` and `<name>.md`, the pair docs and issues cite; returns both paths."""
    json_path = write_json(os.path.join(out_dir, f"{name}.json"), report)
    md_path = os.path.join(out_dir, f"{name}.md")
    with open(md_path, "w") as f:
        f.write(markdown if markdown.endswith("\n") else markdown + "\n")
    return json_path, md_path


# ---------------------------------------------------------------- the MNIST KD workload


def spec(factory: str, **kwargs: Any) -> dict[str, Any]:
    return {"factory": f"pipeline.models.builtin:{factory}", "kwargs": kwargs}


def model_of(s: dict[str, Any], weights: str | None = None) -> torch.nn.Module:
    return build_model(ModelSpec.model_validate({**s, "weights": weights}), input_shape=INPUT, num_classes=10)


def kd_task(student: dict[str, Any]) -> ClassificationTask:
    """The KD task (KD 0.7 + CE 0.3 at T 4) over tensors in memory, for the plain-PyTorch baselines."""
    cfg = TrainConfig.model_validate({"cache": "in-memory", "student": student, "loss": KD})
    return ClassificationTask.in_memory(cfg, num_classes=10, input_shape=INPUT)


def mnist() -> dict[str, dict[str, np.ndarray]]:
    cfg = PrecomputeConfig.model_validate({"source": SOURCE, "teacher": spec("mlp")})
    return {s: load_split(cfg.source, s) for s in ("train", "val")}


def tensors(split: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(split["x"]), torch.from_numpy(split["label"])


AMORT_STUDENT = spec("mlp", hidden=[512, 512])  # the amortisation student, MLP 784-512-512-10


def precompute_config(teacher: dict, weights: str, cache_root: str, batch_size: int, actors: int) -> PrecomputeConfig:
    # 0.5 CPU per actor: torch gets one thread each, and a whole core stays free for reads and writes.
    return PrecomputeConfig.model_validate({
        "source": SOURCE, "teacher": {**teacher, "weights": weights}, "cache_root": cache_root,
        "batch_size": batch_size, "num_actors": actors, "cpus_per_actor": 0.5,
    })


def kd_train(cache_uri: str, student: dict[str, Any], work: str, epochs: int, **extra: Any) -> dict[str, Any]:
    """The `TrainConfig` fields every MNIST student trained from a cache here shares: batch 64, the KD
    loss, Adam at 1e-3, one worker of one CPU (`extra` overrides)."""
    return {"cache": cache_uri, "student": student, "epochs": epochs, "batch_size": 64, "num_workers": 1,
            "cpus_per_worker": 1, "storage_path": os.path.join(work, "train"), "loss": KD,
            "optimizer": {"name": "adam", "lr": 1e-3}, **extra}


def fit_amortisation_teacher(work: str, width: int, epochs: int) -> tuple[PrecomputeConfig, float]:
    """The amortisation teacher (heavy_cnn), fitted briefly with `distill fit-teacher`'s own loop so the
    students' accuracies mean something: its precompute config (one actor) and validation accuracy."""
    pre = precompute_config(spec("heavy_cnn", width=width), os.path.join(work, "amort-teacher.pt"),
                            os.path.join(work, "cache-amort"), 256, 1)
    pre.teacher.fit = pre.teacher.fit.model_copy(update={"epochs": epochs, "shift": 0})
    return pre, fit_teacher(pre)


def cached_logits(teacher: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The teacher's logits as a cache holds them (float16), for the in-memory baselines."""
    with torch.inference_mode():
        return teacher.eval()(x).to(torch.float16).float()


def shuffled(x: torch.Tensor, y: torch.Tensor, batch_size: int, extra: Callable[[torch.Tensor], dict] | None = None,
             logits: torch.Tensor | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """In-memory batches in a fresh random order, with the teacher's logits stored or computed now."""
    for idx in torch.randperm(len(y)).split(batch_size):
        batch = {"x": x[idx], "label": y[idx]}
        if logits is not None:
            batch["teacher_logits"] = logits[idx]
        if extra is not None:
            batch.update(extra(batch["x"]))
        yield batch


def train_in_memory(student: dict, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, batch_size: int, epochs: int,
                    seed: int = 0) -> list[dict[str, float]]:
    """The in-memory limit: the same student, loss and batch over the cached logits already in memory
    (no Ray, no storage, no evaluation); per epoch, its `seconds` and `samples`."""
    torch.manual_seed(seed)
    model = model_of(student)
    opt = make_optimizer(model.parameters(), "adam", 1e-3)
    task = kd_task(student)
    out = []
    for _ in range(epochs):
        started = time.perf_counter()
        stats = train_epoch(model, shuffled(x, y, batch_size, logits=logits), task, opt)
        out.append({"seconds": time.perf_counter() - started, "samples": stats["train_samples"]})
    return out


def online_kd_student(student: dict, teacher: torch.nn.Module, data: dict, batch_size: int, epochs: int,
                      seed: int) -> dict[str, float]:
    """Online KD, the amortisation baseline: the same student and loss, the teacher's forward on
    every batch. Plain PyTorch over in-memory tensors: no Ray, no storage, no start-up cost."""
    torch.manual_seed(seed)
    model = model_of(student)
    opt = make_optimizer(model.parameters(), "adam", 1e-3)
    task = kd_task(student)
    teacher.eval()

    def teacher_logits(x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return {"teacher_logits": teacher(x).float()}

    x, y = tensors(data["train"])
    started = time.perf_counter()
    for _ in range(epochs):
        train_epoch(model, shuffled(x, y, batch_size, extra=teacher_logits), task, opt)
    wall = time.perf_counter() - started
    vx, vy = tensors(data["val"])
    val = task.evaluate(model, [{"x": vx, "label": vy, **teacher_logits(vx)}])
    return {"wall_s": wall, "val_accuracy": val["val_accuracy"]}
