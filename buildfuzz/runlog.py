"""Per-run records under ``<results>/runs/``: one JSON line per case.

``<run-id>.jsonl`` gets a line per executed case as it finishes (a killed
run leaves at most its last line cut short; readers skip such a line), and
``<run-id>.json`` the run's summary when it ends. Reports and axis coverage
are computed from these files.
"""

import json
import time
from pathlib import Path
from typing import IO, Any

from buildfuzz import secrets
from buildfuzz.case import Case
from buildfuzz.results import json_text, write_atomic
from buildfuzz.session import CaseRecord

RUNS_DIR = "runs"


def axis_values(case: Case) -> dict[str, list[str]]:
    """Return the value each axis took in ``case``, as strings."""
    base = case.dockerfile[0].removeprefix("FROM ") if case.dockerfile else ""
    instructions = [line.split(" ", 1)[0] for line in case.dockerfile[1:]]
    flags = [
        word.split("=", 1)[0]
        for line in case.dockerfile[1:]
        for word in line.split()
        if word.startswith("--")
    ]
    return {
        "engine": [case.engine],
        "builder": [case.builder],
        "platform": [case.platform or "(default)"],
        "output": [str(case.output)],
        "base": [base],
        "instruction": sorted(set(instructions)),
        "instruction flag": sorted(set(flags)),
        "file count": [str(len(case.files))],
        "file kind": sorted({str(f.kind) for f in case.files}),
        "file size": sorted({str(f.size) for f in case.files if f.kind == "file"}),
        "file mode": sorted({f"{f.mode:04o}" for f in case.files}),
        "file owner": sorted(
            {str(f.uid) for f in case.files} | {str(f.gid) for f in case.files}
        ),
        "file mtime_ns": sorted({str(f.mtime_ns) for f in case.files}),
        "dockerignore": ["yes" if case.dockerignore is not None else "no"],
        "build args": [str(len(case.build_args))],
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
