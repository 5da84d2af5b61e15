"""A real `ray start --head` cluster for e2e tests: its own temp dir and ports on 127.0.0.1, token
authentication on, stopped by its own processes (never `ray stop`, which stops every Ray here)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

# Ray Train's controller polls its workers every 2 s, so every fit ends up to 2 s after its last step:
# about 3 s of each of the suite's many short fits. Polling faster changes nothing else.
RAY_TEST_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(marker: str) -> set[int]:
    """The processes whose command line names `marker` (the cluster's temp dir), and all their
    descendants (Ray's agents rename themselves `ray::...`, so only the tree finds them)."""
    parent: dict[int, int] = {}
    roots = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            parent[int(proc.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if marker.encode() in (proc / "cmdline").read_bytes():
                roots.add(int(proc.name))
        except (OSError, IndexError, ValueError):
            continue
    found, grew = set(roots), True
    while grew:
        children = {pid for pid, ppid in parent.items() if ppid in found} - found
        found |= children
        grew = bool(children)
    return found


@contextlib.contextmanager
def ray_head(python: str, env: dict[str, str], num_cpus: int = 4):
    """Yields (gcs address, Jobs API URL). `python` is the interpreter the cluster runs (its
    workers and the jobs' `python` come from the same environment)."""
    temp_dir = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    gcs, dashboard = free_port(), free_port()
    cmd = [python, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
           f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    started = subprocess.run(cmd, env={**env, **RAY_TEST_ENV}, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 60
        while time.time() < deadline:  # the Jobs API answers a little after `ray start` returns
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", dashboard), timeout=1):
                break
            time.sleep(0.5)
        yield f"127.0.0.1:{gcs}", url
    finally:
        stop(_processes_of(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop(pids: set[int], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL whatever is still running after `grace` seconds (not a fixed wait: most
    of a cluster's processes exit within a fraction of a second)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.05)
        pids = {p for p in pids if _alive(p)}
        if not pids:
            return
