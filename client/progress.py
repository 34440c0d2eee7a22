"""A batch job's progress on stderr: tqdm's bar on a terminal; elsewhere (container logs, a file)
one tqdm-formatted line per interval, ended by a newline. tqdm itself redraws with '\r' even
off a terminal, so `docker logs` and `kubectl logs`, which split on newlines, would show no
progress until the job ends."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

LINE_EVERY_S = 30.0  # off a terminal: how often a progress line is printed


class LineProgress:
    """What run_job needs of a tqdm bar (update, close), as newline-ended lines."""

    def __init__(self, total: int, initial: int, desc: str, stream: TextIO,
                 every_s: float | None = None) -> None:
        self.total, self.initial, self.n, self.desc = total, initial, initial, desc
        self.stream = stream
        self.every_s = LINE_EVERY_S if every_s is None else every_s
        self.started = self.last = time.monotonic()
        self.printed_n = initial

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self._line(now)

    def close(self) -> None:
        if self.n != self.printed_n:  # the last state, as tqdm's close leaves it
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        from tqdm import tqdm

        elapsed = now - self.started
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else None
        self.stream.write(tqdm.format_meter(self.n, self.total, elapsed, prefix=self.desc,
                                            unit="items", rate=rate, initial=self.initial) + "\n")
        self.stream.flush()
        self.printed_n = self.n


def progress(total: int, initial: int, desc: str, enabled: bool) -> Any:
    """A tqdm bar on a terminal, LineProgress elsewhere; a disabled tqdm with --no-progress."""
    from tqdm import tqdm  # imported here: `nextchar predict` need not pay for it

    if enabled and not sys.stderr.isatty():
        return LineProgress(total, initial, desc, sys.stderr)
    return tqdm(total=total, initial=initial, unit="items", dynamic_ncols=True, smoothing=0.05,
                disable=not enabled, desc=desc, mininterval=0.1)
