"""Read a results directory into the numbers that the reports show.

The reports read ``<results>/*/finding.json`` and ``<results>/runs/``: one
``<run-id>.jsonl`` of case lines per run, and the ``<run-id>.json`` summary
that a run writes when it ends (a killed run has none). Counts of cases per
target and per axis value come from the case lines, so a killed run counts
too.
"""

import datetime
import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from buildfuzz.errors import ResultsError, UsageError
from buildfuzz.results import FORMAT_FILE, RESULTS_FORMAT, FindingRecord, ResultsStore
from buildfuzz.runlog import RUNS_DIR, read_case_lines

VERDICTS = ("pass", "expected", "finding")
# Bucket sizes of the cases-per-minute chart, in minutes: the smallest one
# that keeps the chart at MAX_BUCKETS bars or fewer is used.
BUCKET_MINUTES = (1, 2, 5, 10, 15, 30, 60, 120, 240, 720, 1440)
MAX_BUCKETS = 240


@dataclass(frozen=True)
class CaseLine:
    """One executed case of a run, as its ``.jsonl`` line records it."""

    time: float
    phase: str
    verdict: str
    signature: str | None
    axes: dict[str, list[str]]

    @property
    def target(self) -> str:
        engine = ",".join(self.axes.get("engine", [])) or "?"
        builder = ",".join(self.axes.get("builder", [])) or "?"
        return f"{engine}/{builder}"


@dataclass
class RunData:
    """The case lines and, if the run ended normally, the summary of one run."""

    run_id: str
    lines: list[CaseLine]
    summary: dict[str, Any] | None

    @property
    def fuzz_cases(self) -> int:
        return sum(line.phase == "fuzz" for line in self.lines)


@dataclass
class Bucket:
    """Cases of one run that finished in ``[start, start + minutes)`` minutes."""

    run_id: str
    start: int
    minutes: int
    fuzz: int = 0
    shrink: int = 0


@dataclass
class Totals:
    runs: int
    cases: int
    shrink_builds: int
    last_builds_per_minute: float | None
    findings: int
    new: int
    known: int
    flaky: int


@dataclass
class ReportData:
    """Everything the reports show about one results directory."""

    results: Path
    findings: list[FindingRecord]
    runs: list[RunData]
    generated: datetime.datetime
    skipped_lines: int = 0
    per_target: dict[str, Counter[str]] = field(default_factory=dict)
    coverage: dict[str, Counter[str]] = field(default_factory=dict)

    @property
    def last_summary(self) -> dict[str, Any] | None:
        return self.runs[-1].summary if self.runs else None


def load_report(
    results: Path, *, generated: datetime.datetime | None = None
) -> ReportData:
    """Read the findings and runs of ``results``.

    Raises UsageError or ResultsError when ``results`` cannot be read.
    """
    check_results(results)
    runs, skipped = load_runs(results / RUNS_DIR)
    data = ReportData(
        results=results,
        findings=ResultsStore(results).findings(),
        runs=runs,
        generated=generated or datetime.datetime.now(datetime.UTC),
        skipped_lines=skipped,
    )
    data.per_target = count_per_target(runs)
    data.coverage = count_axis_values(runs)
    return data


def check_results(results: Path) -> None:
    """Raise unless ``results`` is a readable results directory.

    Unlike ``ResultsStore.check`` this needs no write access, so a report
    can be made from a read-only copy such as a downloaded CI artifact.
    """
    if not results.exists():
        raise UsageError(f"results directory {results} not found; give --results DIR")
    if not results.is_dir():
        raise UsageError(
            f"results path {results} is not a directory; give a results directory"
        )
    marker = results / FORMAT_FILE
    if marker.exists():
        found = marker.read_text().strip()
        if found != str(RESULTS_FORMAT):
            raise ResultsError(
                f"results directory {results} has format {found!r}, this buildfuzz "
                f"reads format {RESULTS_FORMAT}"
            )


def load_runs(directory: Path) -> tuple[list[RunData], int]:
    """Read every run under ``directory`` and count the unreadable lines.

    Runs come oldest first because a run id starts with its UTC start time.
    """
    if not directory.is_dir():
        return [], 0
    run_ids = sorted(
        {path.stem for path in directory.glob("*.jsonl")}
        | {path.stem for path in directory.glob("*.json")}
    )
    runs, skipped = [], 0
    for run_id in run_ids:
        lines, bad = load_case_lines(directory / f"{run_id}.jsonl")
        summary = load_summary(directory / f"{run_id}.json")
        runs.append(RunData(run_id=run_id, lines=lines, summary=summary))
        skipped += bad
    return runs, skipped


def load_case_lines(path: Path) -> tuple[list[CaseLine], int]:
    """Read the case lines of one run and count the lines of another shape,
    which are skipped."""
    if not path.exists():
        return [], 0
    try:
        raw = read_case_lines(path)
    except (OSError, UnicodeDecodeError) as error:
        raise ResultsError(f"{path}: cannot read case lines: {error}") from None
    lines = [line for line in map(parse_case_line, raw) if line is not None]
    return lines, len(raw) - len(lines)


def parse_case_line(raw: Any) -> CaseLine | None:
    """Return the case line that ``raw`` decodes to, or None if it has another
    shape (a file changed by hand or written by another version)."""
    if not isinstance(raw, dict):
        return None
    time, axes = raw.get("time"), raw.get("axes", {})
    if isinstance(time, bool) or not isinstance(time, int | float):
        return None
    if not math.isfinite(time) or not isinstance(axes, dict):
        return None
    signature = raw.get("signature")
    return CaseLine(
        time=float(time),
        phase=str(raw.get("phase", "fuzz")),
        verdict=str(raw.get("verdict", "?")),
        signature=None if signature is None else str(signature),
        axes={
            str(axis): [str(value) for value in values]
            for axis, values in axes.items()
            if isinstance(values, list)
        },
    )


def load_summary(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ResultsError(f"{path}: cannot read run summary: {error}") from None
    if not isinstance(summary, dict):
        raise ResultsError(f"{path}: invalid run summary: not a JSON object")
    return summary


def count_per_target(runs: list[RunData]) -> dict[str, Counter[str]]:
    """Count the verdicts of fuzz cases per ``engine/builder`` target."""
    counts: dict[str, Counter[str]] = {}
    for run in runs:
        for line in run.lines:
            if line.phase == "fuzz":
                counts.setdefault(line.target, Counter())[line.verdict] += 1
    return dict(sorted(counts.items()))


def count_axis_values(runs: list[RunData]) -> dict[str, Counter[str]]:
    """Count, per axis, how many fuzz cases took each value.

    Shrink cases are left out because they are variations of one failing
    case and would inflate that case's values.
    """
    counts: dict[str, Counter[str]] = {}
    for run in runs:
        for line in run.lines:
            if line.phase != "fuzz":
                continue
            for axis, values in line.axes.items():
                counter = counts.setdefault(axis, Counter())
                counter.update(values)
    return counts


def sort_values(counter: Counter[str]) -> list[tuple[str, int]]:
    """Return the values of ``counter`` in natural order: numbers by value."""

    def key(item: tuple[str, int]) -> tuple[int, float, str]:
        try:
            return (0, float(item[0]), item[0])
        except ValueError:
            return (1, 0.0, item[0])

    return sorted(counter.items(), key=key)


def case_buckets(runs: list[RunData]) -> list[Bucket]:
    """Count the cases of each run per time bucket, from the run's first case.

    Every bucket has the same size, the smallest of BUCKET_MINUTES that keeps
    all runs together at MAX_BUCKETS buckets or fewer. A run's last bucket is
    usually cut short by the run's end, so it shows a lower rate.
    """
    spans = [
        (
            run,
            min(line.time for line in run.lines),
            max(line.time for line in run.lines),
        )
        for run in runs
        if run.lines
    ]
    minute_count = sum(math.floor((end - start) / 60) + 1 for _, start, end in spans)
    minutes = next(
        (size for size in BUCKET_MINUTES if minute_count / size <= MAX_BUCKETS),
        BUCKET_MINUTES[-1],
    )
    buckets: list[Bucket] = []
    for run, start, end in spans:
        count = math.floor((end - start) / 60 / minutes) + 1
        row = [Bucket(run.run_id, index * minutes, minutes) for index in range(count)]
        for line in run.lines:
            bucket = row[math.floor((line.time - start) / 60 / minutes)]
            if line.phase == "shrink":
                bucket.shrink += 1
            else:
                bucket.fuzz += 1
        buckets.extend(row)
    return buckets


def totals(data: ReportData) -> Totals:
    summary = data.last_summary or {}
    rate = summary.get("builds_per_minute")
    return Totals(
        runs=len(data.runs),
        cases=sum(run.fuzz_cases for run in data.runs),
        shrink_builds=sum(len(run.lines) - run.fuzz_cases for run in data.runs),
        last_builds_per_minute=float(rate) if isinstance(rate, int | float) else None,
        findings=len(data.findings),
        new=len(_list(summary.get("new_findings"))),
        known=len(_list(summary.get("known_findings"))),
        flaky=sum(bool(record.flaky) for record in data.findings),
    )


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def rate_text(record: FindingRecord) -> str:
    """Return the reproduction rate of a finding, such as ``3/3`` or ``1/3 flaky``."""
    if not record.attempts:
        return "not re-run"
    flaky = " flaky" if record.flaky else ""
    return f"{record.reproduced}/{record.attempts}{flaky}"


def finding_link(results: Path, record: FindingRecord, link_from: Path) -> str:
    """Return the URL of the finding's README.md relative to ``link_from``."""
    readme = (results / record.id / "README.md").resolve()
    relative = os.path.relpath(readme, link_from.resolve())
    return quote(Path(relative).as_posix())


def clean_text(text: object) -> str:
    """Return ``text`` with every character that XML 1.0 forbids made visible.

    Control characters become ``\\xNN`` and lone surrogates, which
    ``surrogateescape`` decoding leaves for undecodable bytes of file names,
    become the byte they stand for, so the text is valid UTF-8 and valid XML.
    """
    return "".join(map(_clean_char, str(text)))


def _clean_char(char: str) -> str:
    code = ord(char)
    if char in "\t\n\r" or 0x20 <= code <= 0xD7FF or 0xE000 <= code <= 0xFFFD:
        return char
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return char
