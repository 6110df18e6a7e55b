"""structlog set-up for the command line; library modules only log events."""

import logging
import sys
from typing import Any

import structlog

from buildfuzz import secrets


def _redact(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = secrets.redact(value)
    return event


def configure(log_format: str = "console", *, verbose: bool = False) -> None:
    """Send events to stderr as readable lines or as JSON lines."""
    level = logging.DEBUG if verbose else logging.INFO
    renderer: Any
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _redact,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # Look sys.stderr up at each call: tests and tools may replace it.
        # WriteLogger writes each line with its newline in one call, so lines
        # of forked workers sharing stderr do not run into each other.
        logger_factory=lambda *_: structlog.WriteLogger(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
