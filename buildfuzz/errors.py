"""Exceptions raised by buildfuzz.

Every error that the command line reports to a user derives from
``BuildfuzzError`` and carries the exit code it maps to::

    BuildfuzzError
    ├── UsageError          invalid option or argument value (exit 2)
    ├── DataFileError       invalid profile, builder or case file (exit 2)
    ├── SetupError          missing tool, package or permission (exit 2)
    ├── EngineError         a sandbox engine failed to start or stop (exit 2)
    └── ResultsError        the results directory cannot be used (exit 2)

A failing build is not an exception: the runner returns it as an outcome.
"""

from pathlib import Path

EXIT_OK = 0
EXIT_FINDINGS = 1
EXIT_USAGE = 2
EXIT_KNOWN_FINDINGS = 3  # CI mode: only findings that were already known
EXIT_INTERRUPTED = 130


class BuildfuzzError(Exception):
    """Base class for errors reported to the user as one line."""

    exit_code = EXIT_USAGE


class UsageError(BuildfuzzError):
    """An option or argument has an invalid value."""


class DataFileError(BuildfuzzError):
    """A profile, builder definition or case file is missing or invalid."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)
        self.problem = problem


class SetupError(BuildfuzzError):
    """A tool, package or permission that buildfuzz needs is missing."""


class EngineError(BuildfuzzError):
    """A sandbox engine could not be started, reached or stopped."""

    def __init__(self, message: str, *, log_path: Path | None = None) -> None:
        super().__init__(message)
        self.log_path = log_path


class ResultsError(BuildfuzzError):
    """The results directory is locked, unreadable or of another format."""
