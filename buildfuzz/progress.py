"""Live progress of a run: a status line on a terminal, periodic log lines
elsewhere."""

import sys
import time
from types import TracebackType

import structlog
from rich.console import Console
from rich.live import Live
from rich.text import Text

from buildfuzz.budget import format_duration
from buildfuzz.fuzzer import Stats

log = structlog.get_logger(__name__)

PLAIN_INTERVAL = 30.0  # seconds between progress lines when not on a terminal


class Progress:
    """Show elapsed time against the budget, counts, speed and the current target."""

    def __init__(self, budget: float, *, live: bool | None = None) -> None:
        self.budget = budget
        self.started = time.monotonic()
        self.live = sys.stderr.isatty() if live is None else live
        self._display: Live | None = None
        self._last_line = self.started

    def __enter__(self) -> "Progress":
        if self.live:
            console = Console(file=sys.stderr)
            # Log lines written to stderr meanwhile are printed above the bar.
            self._display = Live(
                Text(""), console=console, redirect_stderr=True, transient=True
            )
            self._display.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._display is not None:
            self._display.__exit__(kind, error, traceback)
            self._display = None

    def line(self, stats: Stats, target: str, findings: int) -> str:
        elapsed = time.monotonic() - self.started
        builds = stats.cases + stats.shrink_builds
        rate = builds / (elapsed / 60) if elapsed > 0 else 0.0
        return (
            f"{format_duration(elapsed)} of {format_duration(self.budget)}  "
            f"cases {stats.cases}  findings {findings}  "
            f"{rate:.1f} builds/min  now {target}"
        )

    def update(self, stats: Stats, target: str, findings: int) -> None:
        if self._display is not None:
            self._display.update(Text(self.line(stats, target, findings)))
            return
        now = time.monotonic()
        if now - self._last_line >= PLAIN_INTERVAL:
            self._last_line = now
            log.info("progress", status=self.line(stats, target, findings))
