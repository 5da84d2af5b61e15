"""The one exception type users see: a problem and its fix, printed as one line by the CLI (exit 2)."""

from __future__ import annotations


class DistillError(Exception):
    """A user-facing error: `problem` says what is wrong, `fix` what to do about it."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        return f"{self.problem} — {self.fix}" if self.fix else self.problem
