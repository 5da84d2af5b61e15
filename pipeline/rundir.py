"""A training run's directory, `<storage_path>/<name>`: `config.json` at its start, Ray Train's
checkpoints while it runs, `result.json` and `student.pt` when it finishes.

Readers of finished runs (the report) use this module alone: it imports no torch and no Ray.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline import storage
from pipeline.errors import DistillError

CONFIG_FILE = "config.json"
RESULT_FILE = "result.json"
STUDENT_FILE = "student.pt"  # the bare student's state dict, loadable by its factory (e.g. as a later teacher)
HF_DIR = "hf"  # Hugging Face students: save_pretrained of the model and its tokenizer, loadable by transformers


def write_json(uri: str, data: dict[str, Any]) -> None:
    storage.write_bytes_atomic(uri, (json.dumps(data, indent=2) + "\n").encode())


def write_config(run_dir: str, config: dict[str, Any]) -> None:
    write_json(storage.join(run_dir, CONFIG_FILE), config)


def read_config(run_dir: str) -> dict[str, Any]:
    """The config a run was started with (written before its first epoch), for `--resume`."""
    uri = storage.join(run_dir, CONFIG_FILE)
    if not storage.exists(uri):
        raise DistillError(f"{run_dir} is not a run directory (no {CONFIG_FILE})",
                           "pass the directory `distill train` created: <storage_path>/<name>")
    return json.loads(storage.read_bytes(uri))


def finished(run_dir: str) -> bool:
    return storage.exists(storage.join(run_dir, RESULT_FILE))


def read_result(run_dir: str) -> dict[str, Any]:
    """The result.json of one finished run, or one error naming the directory and the fix."""
    uri = storage.join(run_dir, RESULT_FILE)
    if not storage.exists(uri):
        raise DistillError(f"{run_dir} has no {RESULT_FILE} (not a finished run directory)",
                           "pass directories that `distill train` finished: <storage_path>/<name>")
    fix = "train the run again, or leave it out of the report"
    try:
        result = json.loads(storage.read_bytes(uri))
    except (ValueError, UnicodeDecodeError) as e:
        raise DistillError(f"{uri} is unreadable: {e}", fix) from None
    if not isinstance(result, dict) or not isinstance(result.get("name"), str) or not isinstance(result.get("metrics"), dict):
        raise DistillError(f"{uri} is unreadable: no `name` or `metrics`", fix)
    return result


def write_result(run_dir: str, result: dict[str, Any]) -> str:
    uri = storage.join(run_dir, RESULT_FILE)
    write_json(uri, result)
    return uri
