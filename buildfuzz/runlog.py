"""Per-run records under ``<results>/runs/``: one JSON line per case.

``<run-id>.jsonl`` gets a line per executed case as it finishes (a killed
run leaves at most its last line cut short; readers skip such a line), and
``<run-id>.json`` the run's summary when it ends. Reports and axis coverage
are computed from these files.
"""

import json
import os
import time
from pathlib import Path
from typing import IO, Any

from buildfuzz import secrets
from buildfuzz.case import DEEP_DIR, Case, ContextFile, split_from
from buildfuzz.results import json_text, write_atomic
from buildfuzz.session import CaseRecord
from buildfuzz.strategies_context import XATTR_KINDS
from buildfuzz.strategies_dockerfile import (
    BASE_IMAGES,
    FIRST_STAGE,
    instruction_kinds,
    layer_count,
    stage_count,
)

RUNS_DIR = "runs"


def axis_values(case: Case) -> dict[str, list[str]]:
    """Return the value each axis took in ``case``, as strings.

    Values of the axes that profiles name are written as ``value_label``
    writes a pool value, so that ``buildfuzz strategies`` can count them.
    """
    base = case.dockerfile[0].removeprefix("FROM ") if case.dockerfile else ""
    instructions = [line.split(" ", 1)[0] for line in case.dockerfile[1:]]
    flags = [
        word.split("=", 1)[0]
        for line in case.dockerfile[1:]
        for word in line.split()
        if word.startswith("--")
    ]
    files = [f for f in case.files if not f.path.startswith(DEEP_DIR + "/")]
    deep = [f for f in case.files if f.path.startswith(DEEP_DIR + "/")]
    values = {
        "engine": [case.engine],
        "builder": [case.builder],
        "platform": [case.platform or "(default)"],
        "output": [str(case.output)],
        "base": [base],
        "instruction": sorted(set(instructions)),
        "instruction flag": sorted(set(flags)),
        "file count": [str(len(case.files))],
        "file kind": sorted({str(f.kind) for f in case.files}),
        "file size": sorted(
            {str(f.size) for f in case.files if f.kind in ("file", "archive")}
        ),
        "file mode": sorted({f"{f.mode:04o}" for f in case.files}),
        "file owner": sorted(
            {str(f.uid) for f in case.files} | {str(f.gid) for f in case.files}
        ),
        "file mtime_ns": sorted({str(f.mtime_ns) for f in case.files}),
        "dockerignore": ["yes" if case.dockerignore is not None else "no"],
        "build args": [str(len(case.build_args))],
    }
    values |= _engine_values(case)
    values |= _context_values(case, files, deep)
    values |= _dockerfile_values(case)
    return values


def value_label(value: object) -> str:
    """Write one pool value the way run logs record it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value == "" or value == ():
        return "(none)"
    if isinstance(value, tuple) and all(isinstance(v, tuple) for v in value):
        return ",".join("=".join(str(part) for part in pair) for pair in value)
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    return str(value)


def _engine_values(case: Case) -> dict[str, list[str]]:
    return {
        "storage driver": [case.storage_driver or "(default)"],
        "containerd store": [value_label(case.containerd_store)],
        "data root MiB": [str(case.data_root_mib)],
        "memory MiB": [str(case.memory_mib)],
        "build arg": sorted(f"{name}={value}" for name, value in case.build_args),
        "target": ["first" if case.target == FIRST_STAGE else value_label(case.target)],
        "no cache": [value_label(case.no_cache)],
        "extra tags": [value_label(case.tags)],
        "cache": [value_label(case.cache)],
        "attestations": [value_label(case.attest)],
        "build secrets": [
            ",".join(f"{i}={source}" for i, source in case.build_secrets) or "(none)"
        ],
        "compression": [value_label(case.compression)],
        "force compression": [value_label(case.force_compression)],
        "oci mediatypes": [value_label(case.oci_mediatypes)],
        "context source": [value_label(case.context_from)],
        "client user": [case.client_user or "root"],
        "context churn": [value_label(case.churn)],
    }


def _context_values(
    case: Case, files: list[ContextFile], deep: list[ContextFile]
) -> dict[str, list[str]]:
    bulk = case.bulk
    patterns = (case.dockerignore or ()) + (case.dockerfile_dockerignore or ())
    return {
        "file name": sorted({part for f in files for part in f.path.split("/")}),
        "dir mode": sorted({f"{f.mode:04o}" for f in files if f.kind == "dir"}),
        "sparse size": sorted({str(f.size) for f in files if f.kind == "sparse"}),
        "device": sorted(
            {f"{f.major}:{f.minor}" for f in files if f.kind.endswith("-device")}
        ),
        "xattrs": sorted(
            {value_label(f.xattrs) for f in files if f.kind in XATTR_KINDS}
        ),
        "symlink target": sorted({f.target for f in files if f.kind == "symlink"}),
        "path length": [str(len(os.fsencode(f.path))) for f in deep] or ["0"],
        "dockerignore pattern": sorted(set(patterns)),
        "dockerfile dockerignore": [
            value_label(case.dockerfile_dockerignore is not None)
        ],
        "bulk files": [str(bulk.count) if bulk else "0"],
        "bulk sizes": [value_label(bulk.sizes)] if bulk else [],
        "bulk depth": [str(bulk.depth)] if bulk else [],
    }


def _dockerfile_values(case: Case) -> dict[str, list[str]]:
    names = {image: name for name, image in BASE_IMAGES.items()}
    images = set(names)
    froms = [parts for line in case.dockerfile if (parts := split_from(line))]
    bases = [names.get(parts.image, "stage") for parts in froms]
    return {
        "base name": sorted(set(bases)),
        "instruction kind": sorted(set(instruction_kinds(case.dockerfile, case.files))),
        "stages": [str(stage_count(case.dockerfile))],
        "layers": [str(layer_count(case.dockerfile))],
        "dockerfile path": [case.dockerfile_name],
        "from platform": sorted(
            {parts.platform or "(none)" for parts in froms if parts.image in images}
        ),
    }


class RunLog:
    """Append case records of one run; write its summary at the end."""

    def __init__(self, results: Path, run_id: str) -> None:
        self.directory = results / RUNS_DIR
        self.run_id = run_id
        self._stream: IO[str] | None = None

    @property
    def cases_path(self) -> Path:
        return self.directory / f"{self.run_id}.jsonl"

    def open(self) -> "RunLog":
        self.directory.mkdir(parents=True, exist_ok=True)
        self._stream = self.cases_path.open("a", encoding="utf-8", buffering=1)
        return self

    def record(self, record: CaseRecord, *, phase: str = "fuzz") -> None:
        if self._stream is None:
            self.open()  # on the first case, so a run that fails to start writes none
        assert self._stream is not None
        evaluation = record.evaluation
        line = {
            "time": time.time(),
            "phase": phase,
            "case_id": record.case.id,
            "verdict": str(evaluation.verdict),
            "signature": evaluation.signature.id if evaluation.signature else None,
            "rule": evaluation.rule,
            "oracle": str(evaluation.oracle) if evaluation.oracle else None,
            "seconds": round(record.result.duration, 3),
            "axes": axis_values(record.case),
        }
        self._stream.write(secrets.redact(json.dumps(line, sort_keys=True)) + "\n")

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def finish(self, summary: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        write_atomic(self.directory / f"{self.run_id}.json", json_text(summary))


def read_case_lines(path: Path) -> list[dict[str, Any]]:
    """Read a run's case lines, skipping a last line cut short by a crash."""
    lines = []
    for text in path.read_text(encoding="utf-8").splitlines():
        try:
            lines.append(json.loads(text))
        except json.JSONDecodeError:
            continue
    return lines
