"""The results directory: one subdirectory per distinct finding.

Layout of ``<results>/<id>/`` (``id`` is the signature id)::

    finding.json      signature, phase, oracle, counts, first and last seen
    case.json         the shrunk case (the original when shrinking failed)
    original.json     the case as first generated
    build.log         the complete log of the shrunk case's build
    environment.json  engine, buildx, BuildKit and buildfuzz versions, seed
    repro.sh          a standalone reproduction that needs only docker

Every file is written to a temporary name and renamed into place, so a run
killed at any point leaves each finding readable. A lock file keeps two
runs from writing the same directory at once.
"""

import datetime
import fcntl
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import structlog

from buildfuzz import secrets
from buildfuzz.errors import ResultsError

log = structlog.get_logger(__name__)

RESULTS_FORMAT = 1
FORMAT_FILE = ".buildfuzz-results"
LOCK_FILE = ".lock"
# Files a new results directory may already hold: the repository's own
# results/README.md explains the directory.
ALLOWED_FOREIGN = frozenset({"README.md", ".gitignore", ".gitkeep"})


@dataclass
class FindingRecord:
    id: str
    phase: str
    message: str
    oracle: str
    builder: str
    engine: str
    count: int
    first_seen: str
    last_seen: str
    shrunk: bool
    shrink_complete: bool
    shrink_builds: int
    reproduced: int
    attempts: int
    seed: int
    profile: str
    flaky: bool = False
    shrink_interrupted: bool = False
    explanation: list[dict[str, Any]] = field(default_factory=list)
    # Targets ("<engine label>/<builder>") the finding failed on; empty in
    # records written before this field existed.
    seen_on: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """How often re-runs reproduced the signature, from 0 to 1."""
        return self.reproduced / self.attempts if self.attempts else 0.0


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_atomic(path: Path, data: str | bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    if isinstance(data, str):
        payload = secrets.redact(data).encode("utf-8", "surrogateescape")
    elif isinstance(data, bytes | bytearray):
        payload = secrets.redact_bytes(bytes(data))
    else:
        raise TypeError(f"write_atomic takes str or bytes, not {type(data).__name__}")
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(payload)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ResultsStore:
    """Read and write findings under one results directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock: int | None = None

    @staticmethod
    def check(root: Path) -> None:
        """Raise ResultsError if ``root`` cannot hold results; changes nothing."""
        ancestor = root
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir() or (root.exists() and not root.is_dir()):
            raise ResultsError(
                f"results path {root} is not a directory (or lies under a file); "
                "give a directory"
            )
        marker = root / FORMAT_FILE
        others = (
            [p for p in root.iterdir() if p.name not in ALLOWED_FOREIGN]
            if root.is_dir()
            else []
        )
        if not marker.exists() and others:
            raise ResultsError(
                f"results directory {root} holds other files and no buildfuzz "
                "results; give an empty or new directory, or a buildfuzz one"
            )
        if marker.exists() or marker.is_symlink():
            try:
                found = marker.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError):
                found = "unreadable"
            if found != str(RESULTS_FORMAT):
                raise ResultsError(
                    f"results directory {root} has format {found!r}, this buildfuzz "
                    f"writes format {RESULTS_FORMAT}; use another --results directory"
                )
        parent = root if root.exists() else root.parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise ResultsError(f"results directory {root} is not writable")

    def open(self) -> "ResultsStore":
        self.check(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise ResultsError(
                f"results directory {self.root} is in use by another buildfuzz run; "
                "wait for it or give another --results directory"
            ) from None
        self._lock = descriptor
        marker = self.root / FORMAT_FILE
        if not marker.exists():
            write_atomic(marker, f"{RESULTS_FORMAT}\n")
        return self

    def close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def finding_dir(self, finding_id: str) -> Path:
        return self.root / finding_id

    def load(self, finding_id: str) -> FindingRecord | None:
        path = self.finding_dir(finding_id) / "finding.json"
        if not path.exists() and not path.is_symlink():
            return None
        return read_finding(path)

    @staticmethod
    def check_findings(root: Path) -> None:
        """Raise ResultsError for the first finding.json under ``root`` that
        cannot be read, so that a run stops before it writes anything."""
        for path in sorted(root.glob("*/finding.json")):
            read_finding(path)

    def write(self, record: FindingRecord, files: dict[str, str | bytes]) -> Path:
        """Write a finding's files, then its ``finding.json`` last."""
        directory = self.finding_dir(record.id)
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in files.items():
            mode = 0o755 if name.endswith(".sh") else 0o644
            write_atomic(directory / name, content, mode)
        self.save(record)
        return directory

    def save(self, record: FindingRecord) -> None:
        write_atomic(
            self.finding_dir(record.id) / "finding.json",
            json.dumps(asdict(record), indent=2, sort_keys=True) + "\n",
        )

    def seen_again(self, finding_id: str) -> FindingRecord | None:
        """Count one more sighting of a known finding."""
        record = self.load(finding_id)
        if record is not None:
            record.count += 1
            record.last_seen = now()
            self.save(record)
        return record

    def findings(self) -> list[FindingRecord]:
        """Return every finding's record; a damaged one is skipped with a warning."""
        records = []
        for path in sorted(self.root.glob("*/finding.json")):
            try:
                record = self.load(path.parent.name)
            except ResultsError as error:
                log.warning("finding skipped", error=str(error))
                continue
            if record is not None:
                records.append(record)
        return records


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"


def read_finding(path: Path) -> FindingRecord:
    """Read the finding.json at ``path``; raise ResultsError naming the fix."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsError(
            f"{path}: cannot read finding: {error}; restore the file, or "
            "remove its directory to drop the finding"
        ) from None
    try:
        return FindingRecord(**data)
    except TypeError as error:
        raise ResultsError(
            f"{path}: cannot read finding: {error}; "
            "the file was changed by hand or written by another buildfuzz version"
        ) from None
