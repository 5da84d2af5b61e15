"""The layer rules hold on the import graph (import-linter, contracts in pyproject.toml): the
student stage never imports the teacher stage, and the cache contract imports nothing above it.
Lazy imports inside functions count too."""

import shutil
import subprocess
import sys
from pathlib import Path

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"]


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*LINT, "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin"})


def test_the_package_keeps_its_layers():
    run = _lint(Path.cwd())
    assert run.returncode == 0, run.stdout[-3000:]
    assert "Contracts: 4 kept, 0 broken." in run.stdout


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_every_layer_violation_is_caught(tmp_path):
    """The check can fail: the same contracts on a copy of the package with one violation of each added."""
    shutil.copytree("pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy("pyproject.toml", tmp_path)
    sneak = "\n\ndef _sneak():\n    from {} import {}  # noqa\n"
    _append(tmp_path / "pipeline/student/train/step.py", sneak.format("pipeline.teacher.predictor", "TeacherPredictor"))
    _append(tmp_path / "pipeline/cache/key.py", "\nfrom pipeline.config import TrainConfig  # noqa\n")
    _append(tmp_path / "pipeline/cache/verify.py", sneak.format("ray.data", "read_parquet"))
    _append(tmp_path / "pipeline/student/tasks/base.py", sneak.format("pipeline.student.train.order", "Order"))
    run = _lint(tmp_path)
    assert run.returncode == 1
    assert "Contracts: 0 kept, 4 broken." in run.stdout
    for line in ("pipeline.student.train.step -> pipeline.teacher.predictor", "pipeline.cache.key -> pipeline.config",
                 "pipeline.cache.verify -> ray ", "pipeline.student.tasks.base -> pipeline.student.train.order"):
        assert line in run.stdout, line
