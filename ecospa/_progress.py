"""Progress of a long phase for the jobs (never called from pure functions: they take callbacks).

On a terminal a tqdm bar; in a log (stderr is not a terminal) plain lines such as

    train: step 120/600 loss 3.410 12.3 steps/s ETA 0:39

one at the first update, then at most one every ``ECOSPA_PROGRESS_S`` seconds (default 10), and
one at the end, each flushed when written, so a log file shows where a job is while it runs.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

from tqdm.auto import tqdm

INTERVAL_S = 10.0  # between two log lines of one phase (ECOSPA_PROGRESS_S overrides it)


def duration(seconds: float) -> str:
    """'0:39', '12:05', '1:02:03'."""
    s = int(round(max(seconds, 0.0)))
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def _plural(unit: str) -> str:
    """'steps', 'batches', 'layers'."""
    return unit + ("es" if unit.endswith(("s", "sh", "ch", "x")) else "s")


def _stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class LogLines:
    """A progress bar for a log: the tqdm calls the jobs make (update, set_postfix, write,
    close), printed as plain lines at most every ``interval`` seconds."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "step", initial: int = 0,
                 interval: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                 write: Callable[[str], None] = _stderr_line):
        if interval is None:
            interval = float(os.environ.get("ECOSPA_PROGRESS_S", INTERVAL_S))
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n, self.start_n, self.clock, self.out = initial, initial, clock, write
        self.t0 = self.last = clock()
        self.shown, self.postfix, self.closed = None, "", False

    def set_postfix(self, **values) -> None:
        self.postfix = "".join(f" {k} {v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if self.shown is None or now - self.last >= self.interval:
            self._show(now)

    def write(self, text: str) -> None:
        self.out(text)

    def close(self) -> None:
        if not self.closed and self.shown != self.n and self.n > self.start_n:
            self._show(self.clock())
        self.closed = True

    def _show(self, now: float) -> None:
        self.last, self.shown = now, self.n
        done, elapsed = self.n - self.start_n, now - self.t0
        total = f"/{self.total}" if self.total is not None else ""
        text = f"{self.desc}: {self.unit} {self.n}{total}{self.postfix}"
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            text += (f" {rate:.1f} {_plural(self.unit)}/s" if rate >= 1 else f" {1 / rate:.1f} s/{self.unit}")
            if self.total is not None:
                text += f" ETA {duration((self.total - self.n) / rate)}"
        self.out(text)


def bar(total: Optional[int], desc: str, unit: str = "step", initial: int = 0,
        enabled: Optional[bool] = None):
    """The progress of one phase: ``enabled`` None: a tqdm bar on a terminal (stderr), plain
    ``LogLines`` otherwise; True: a tqdm bar in any case; False: nothing."""
    if enabled is None and not sys.stderr.isatty():
        return LogLines(total, desc, unit, initial)
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, disable=enabled is False,
                leave=False)


__all__ = ["INTERVAL_S", "LogLines", "bar", "duration"]
