"""A context file that changes while the client sends the build context.

CI jobs build from working trees that other processes still write: a log
file that grows, a file that a tool rewrites. The client reads each file's
size before it sends the content, so a file that grows or shrinks in
between makes the transfer go wrong in ways that differ between the
classic builder (a tar stream) and BuildKit (file synchronisation).

The churned file is the first regular file of the case, by path. While the
build runs, a thread changes it every few milliseconds:

- ``append`` adds a block of bytes, up to ``MAX_SIZE``;
- ``rewrite`` empties the file and writes its content again, a block at a
  time, so that it is shorter than before for most of the time.

The builder may take any state of the file, so the tree oracle compares
its type, mode and owner but not its size, content or mtime.

NOTE: a builder that sends bytes the file never contained, such as a
zero-filled tail, is therefore not caught. Catching it would need a check
of the copy against the states that the file went through.
"""

import os
import threading
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from buildfuzz.case import Case, ContextFile, FileKind

BLOCK = b"churn\n" * 683  # 4098 bytes: not a multiple of the 512-byte tar block
MAX_SIZE = 64 << 20  # the appended file stops growing here
PAUSE = 0.005  # seconds between changes


def churn_target(files: Sequence[ContextFile]) -> str | None:
    """Return the path of the file that churn changes, or None without one."""
    regular = sorted(entry.path for entry in files if entry.kind is FileKind.FILE)
    return regular[0] if regular else None


class ContextChurn:
    """Change the case's churn target in a thread while the ``with`` block runs."""

    def __init__(self, case: Case, context: Path) -> None:
        self.mode = case.churn
        target = churn_target(case.files) if case.churn else None
        self.path = None if target is None else os.path.join(context, target)
        self.changes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: OSError | None = None

    def __enter__(self) -> "ContextChurn":
        if self.path is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        assert self.path is not None
        size = 0
        try:
            while not self._stop.wait(PAUSE):
                if self.mode == "append":
                    if size >= MAX_SIZE:
                        continue
                    with open(self.path, "ab") as stream:
                        stream.write(BLOCK)
                    size += len(BLOCK)
                else:
                    self._rewrite()
                self.changes += 1
        except OSError as error:
            # A file the case made unwritable, or a path that is a link to a
            # directory: the build runs on without changes.
            self.error = error

    def _rewrite(self) -> None:
        """Empty the file, then write its former size again block by block.

        The file spends most of the time shorter than a size the client may
        have read, which a copy that trusts that size does not expect.
        """
        assert self.path is not None
        with open(self.path, "r+b") as stream:
            size = min(stream.seek(0, os.SEEK_END), MAX_SIZE) or len(BLOCK)
            stream.truncate(0)
            stream.seek(0)
            written = 0
            while written < size and not self._stop.is_set():
                block = BLOCK[: size - written]
                stream.write(block)
                stream.flush()
                written += len(block)
