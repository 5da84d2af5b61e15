"""`distill` as a user runs it: the installed command in a fresh process that has not imported Ray,
with a clean environment (no RAY_ADDRESS; only the suite's faster Ray Train polling)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from tests.raycluster import RAY_TEST_ENV

DISTILL = os.path.join(os.path.dirname(sys.executable), "distill")
_KEEP = ("PATH", "HOME", "LANG", "TMPDIR", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@dataclass
class Ran:
    code: int
    out: str
    err: str

    def one_line_error(self) -> str:
        """The single line a user error prints on stderr (and nothing else there)."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{self.err[-3000:]}"
        assert lines[0].startswith("error: "), lines[0]
        return lines[0]


def distill(*args: str, cwd: str | None = None, env: dict[str, str] | None = None, timeout: float = 600) -> Ran:
    base = {**{k: os.environ[k] for k in _KEEP if k in os.environ}, **RAY_TEST_ENV}
    run = subprocess.run([DISTILL, *args], cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    return Ran(run.returncode, run.stdout, run.stderr)
