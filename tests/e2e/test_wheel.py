"""The package as a user installs it: a wheel built from this tree, installed into a fresh virtualenv
outside the repository, driven from a folder that holds only the user's configs and model module,
against a `ray start --head` cluster (token authentication on) started from that virtualenv.

Both stages run as Ray Jobs from the installed package (`python -m pipeline.teacher` /
`pipeline.student`), the user's folder is what travels with them, and a second precompute job
finds the cache instead of running the teacher again. Dependencies (torch, ray, ...) come from the test's own environment through a
.pth file, so the fresh virtualenv installs only the wheel: pip still resolves its requirements
against what is there (--no-index: nothing is downloaded, a missing one fails the install).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from tests.raycluster import ray_head

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]

MODELS = '''
"""A user's own teacher and student, outside the distill package."""
import pipeline
from torch import nn

print(f"my_models: pipeline imported from {pipeline.__file__}", flush=True)


def teacher(input_shape=(1, 8, 8), num_classes=10):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, 128), nn.ReLU(), nn.Linear(128, num_classes))


def student(input_shape=(1, 8, 8), num_classes=10, hidden=16):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
'''
PRECOMPUTE = """
source: {kind: digits}
teacher:
  factory: my_models:teacher
  weights: runs/teacher.pt
  fit: {epochs: 3, shift: 0}
cache_root: runs/cache
batch_size: 512
cpus_per_actor: 0.5
"""
TRAIN = """
precompute: precompute.yaml
student: {factory: my_models:student, kwargs: {hidden: 16}}
loss: {temperature: 4.0, terms: {kd: 0.7, ce: 0.3}}
optimizer: {name: adam, lr: 0.01}
epochs: 3
num_workers: 1
cpus_per_worker: 0.5
storage_path: runs/train
"""


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    run = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, f"{cmd} exited {run.returncode}\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return run


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, its bin dir, the environment a user's shell has) with the wheel installed."""
    import ray

    if ray.is_initialized():  # an earlier test module's local Ray; this test needs the machine's ports and CPUs
        ray.shutdown()
    root = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"), str(REPO)],
         cwd=root, env=dict(os.environ))
    wheel, = (root / "dist").glob("distill_pipeline-*.whl")
    venv = root / "venv"
    # No pip or setuptools of its own: the .pth below brings the test environment's, and this pip installs into it.
    _run([sys._base_executable, "-m", "venv", "--without-pip", str(venv)], cwd=root, env=dict(os.environ))
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root, {}).stdout.strip())
    (site / "test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": os.environ["HOME"], "RAY_AUTH_MODE": "token",
           "LANG": "C.UTF-8", "TMPDIR": "/tmp"}
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-index", str(wheel)], cwd=root, env=env)
    return py, venv / "bin", env


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "my_models.py").write_text(textwrap.dedent(MODELS))
    (folder / "precompute.yaml").write_text(PRECOMPUTE)
    (folder / "train.yaml").write_text(TRAIN)
    return folder


def test_the_installed_package_is_the_wheel_not_the_checkout(installed, user_folder):
    py, bin_dir, env = installed
    where = _run([str(py), "-c", "import pipeline; print(pipeline.__file__)"], user_folder, env).stdout.strip()
    assert where.startswith(str(py.parent.parent)) and not where.startswith(str(REPO))
    assert "distill" in _run([str(bin_dir / "distill"), "--help"], user_folder, env).stdout
    # Package data travels in the wheel too (Ray Data's quiet logging config).
    _run([str(py), "-c", "import os, pipeline.runtime as r; assert os.path.isfile(r.RAY_DATA_LOGGING), r.RAY_DATA_LOGGING"],
         user_folder, env)


def test_both_stages_as_jobs_from_a_users_folder_and_the_cache_reused(installed, user_folder):
    py, bin_dir, env = installed
    distill = str(bin_dir / "distill")
    _run([distill, "fit-teacher", "precompute.yaml"], user_folder, env)  # the user's module, imported from the folder
    _run([distill, "validate", "precompute.yaml"], user_folder, env)  # the table, the weights against the factory
    assert (user_folder / "runs" / "teacher.pt").exists()
    with ray_head(str(py), env) as (_, url):
        pre = _run([distill, "submit", "precompute", "precompute.yaml", "--address", url, "--wait"], user_folder, env)
        assert "precompute job" in pre.stdout and "succeeded" in pre.stdout
        # The job imported the user's module from the uploaded folder and the package from the virtualenv.
        imported = [line for line in pre.stdout.splitlines() if line.startswith("my_models: pipeline imported from")]
        assert imported and all(str(py.parent.parent) in line for line in imported), pre.stdout[-3000:]
        caches = [p for p in (user_folder / "runs" / "cache").iterdir() if not p.name.startswith("_")]
        assert len(caches) == 1
        manifest = json.loads((caches[0] / "manifest.json").read_text())
        assert manifest["format_version"] == 2 and manifest["teachers"]["teacher"]["factory"] == "my_models:teacher"

        train = _run([distill, "submit", "train", "train.yaml", "--set", "name=student", "--address", url, "--wait"], user_folder, env)
        assert "train job" in train.stdout and "succeeded" in train.stdout
        result = json.loads((user_folder / "runs" / "train" / "student" / "result.json").read_text())
        # The cache exists: a second precompute job finds it instead of running the teacher again.
        again = _run([distill, "submit", "precompute", "precompute.yaml", "--address", url, "--wait"], user_folder, env)
        assert "cache hit" in again.stdout, again.stdout[-3000:]
        jobs = _run([distill, "jobs", "ls", "--address", url], user_folder, env).stdout
    assert result["cache_id"] == caches[0].name  # the student read the cache the teacher job wrote
    assert result["student"] == "my_models:student" and result["epochs"] == 3 and result["workers_with_teacher"] == 0
    assert result["metrics"]["val_accuracy"] > 0.6, result["metrics"]["val_accuracy"]
    assert json.loads((caches[0] / "manifest.json").read_text())["created"] == manifest["created"]  # reused, not recomputed
    assert jobs.count(" precompute ") == 2 and jobs.count(" train ") == 1
    assert "python -m pipeline.teacher" in jobs and "python -m pipeline.student" in jobs
