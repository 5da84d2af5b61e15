"""Progress lines a person can read in a terminal or in `ray job logs`: done/total, rate, ETA.

Plain log lines, throttled, rather than a redrawing bar: Ray Job logs and CI capture stdout
as a file, where carriage-return bars turn into noise.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Callable, Iterator


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def progress_line(what: str, done: int, total: int, elapsed: float, unit: str = "rows") -> str:
    """`what: done/total unit (pct), rate unit/s, ETA` — the rate is over the elapsed time."""
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else float("nan")
    pct = 100.0 * done / total if total else 100.0
    return f"{what}: {done}/{total} {unit} ({pct:.0f}%), {rate:.0f} {unit}/s, ETA {format_eta(eta)}"


class Throttle:
    """Calls `emit` at most once per `every` seconds (and always on `force`)."""

    def __init__(self, emit: Callable[[str], None], every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.emit, self.every, self.clock = emit, every, clock
        self.last = -float("inf")

    def __call__(self, line: str | Callable[[], str], force: bool = False) -> bool:
        now = self.clock()
        if not force and now - self.last < self.every:
            return False
        self.last = now
        self.emit(line() if callable(line) else line)
        return True


@contextmanager
def every(seconds: float, tick: Callable[[], None]) -> Iterator[None]:
    """Call `tick` every `seconds` in a daemon thread while the block runs (long work that reports
    progress from outside, e.g. from what a Ray job has committed so far). A tick that raises
    OSError is skipped: it may race the work it watches and will be tried again."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            try:
                tick()
            except OSError:
                continue

    thread = threading.Thread(target=loop, name="progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=seconds)
