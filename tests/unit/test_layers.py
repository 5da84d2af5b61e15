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
    assert "Contracts: 2 kept, 0 broken." in run.stdout


def test_a_student_importing_the_teacher_or_the_cache_importing_config_is_caught(tmp_path):
    """The check can fail: the same contracts on a copy of the package with two violations added."""
    shutil.copytree("pipeline", tmp_path / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy("pyproject.toml", tmp_path)
    loop = tmp_path / "pipeline/student/loop.py"
    loop.write_text(loop.read_text() + "\n\ndef _sneak():\n    from pipeline.teacher.predictor import TeacherPredictor  # noqa\n")
    key = tmp_path / "pipeline/cache/key.py"
    key.write_text(key.read_text() + "\nfrom pipeline.config import TrainConfig  # noqa\n")
    run = _lint(tmp_path)
    assert run.returncode == 1
    assert "pipeline.student.loop -> pipeline.teacher.predictor" in run.stdout
    assert "pipeline.cache.key -> pipeline.config" in run.stdout
