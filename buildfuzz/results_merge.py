"""Merge the results directories of several shards into one.

Findings with the same id (the same signature) become one finding. Counts
add up, ``first_seen`` is the earliest and ``last_seen`` the latest time, and
``seen_on`` lists every target. The best case is kept together with the
companion files of its own directory. Run files under ``runs/`` are copied
by name. The output depends on the set of inputs alone, so the order of the
inputs does not matter, and merging the output again changes nothing.

NOTE: counts are summed, so an input that is already part of another input
(a shard directory next to an earlier merge of it) is counted twice.
"""

import datetime
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from buildfuzz.case import Case, load_case
from buildfuzz.errors import DataFileError, ResultsError
from buildfuzz.finding_writer import case_target
from buildfuzz.results import (
    FORMAT_FILE,
    RESULTS_FORMAT,
    FindingRecord,
    ResultsStore,
    write_atomic,
)
from buildfuzz.runlog import RUNS_DIR

# The files of a finding directory besides finding.json, copied together
# from the directory whose case is kept.
COMPANION_FILES = (
    "case.json",
    "original.json",
    "build.log",
    "environment.json",
    "repro.sh",
    "README.md",
)
RUN_SUFFIXES = (".jsonl", ".json")
# The counts line of a finding's README.md, as buildfuzz.finding_page writes it.
README_COUNTS = re.compile(
    r"^- first seen: .*, last seen: .*, seen (?:once|\d+ times)$", re.MULTILINE
)


@dataclass(frozen=True)
class SourceFinding:
    """One finding directory of one input."""

    directory: Path
    record: FindingRecord
    case: Case
    files: dict[str, bytes]
    targets: frozenset[str]
    digest: str  # of finding.json and every companion file

    def rank(self) -> tuple[Any, ...]:
        """Return a sort key that puts the best case to keep first."""
        record = self.record
        rate = Fraction(record.reproduced, record.attempts) if record.attempts else 0
        return (
            not record.shrunk,
            not record.shrink_complete,
            len(self.case.files),
            len(self.case.dockerfile),
            -rate,
            hashlib.sha256(self.files["case.json"]).hexdigest(),
            self.digest,
        )


@dataclass(frozen=True)
class Source:
    """The findings and run files read from one input directory."""

    directory: Path
    findings: list[SourceFinding]
    runs: dict[str, bytes]


@dataclass(frozen=True)
class MergedFinding:
    record: FindingRecord
    files: dict[str, bytes]
    sources: int


@dataclass(frozen=True)
class MergeSummary:
    """Counts of a finished merge, for the command's closing line."""

    into: Path
    inputs: int
    findings: int
    shared: int  # findings found in more than one input
    run_files: int

    def describe(self) -> str:
        directories = _count(self.inputs, "results directory", "results directories")
        findings = _count(self.findings, "finding", "findings")
        run_files = _count(self.run_files, "run file", "run files")
        return (
            f"merged {directories} into {self.into}: {findings} "
            f"({self.shared} found in more than one input), {run_files}"
        )


def _count(count: int, singular: str, plural: str) -> str:
    return f"{count} {singular if count == 1 else plural}"


def merge_results(inputs: Sequence[Path], into: Path) -> MergeSummary:
    """Merge the results directories ``inputs`` into ``into``.

    Every input is read and checked before anything is written, so bad input
    raises ResultsError and leaves ``into`` as it was.
    """
    if not inputs:
        raise ResultsError("give at least one results directory to merge")
    directories = _unique(inputs)
    sources = [read_source(directory) for directory in directories]
    findings = merge_findings(sources, results_name=into.name)
    runs = merge_runs(sources)
    into_is_input = any(_same_path(directory, into) for directory in directories)
    check_output(into, findings, runs, into_is_input=into_is_input)
    write_output(into, findings, runs)
    return MergeSummary(
        into=into,
        inputs=len(directories),
        findings=len(findings),
        shared=sum(merged.sources > 1 for merged in findings.values()),
        run_files=len(runs),
    )


def _unique(paths: Iterable[Path]) -> list[Path]:
    """Drop inputs that name a directory given before, so none counts twice."""
    seen: set[str] = set()
    unique = []
    for path in paths:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def _same_path(first: Path, second: Path) -> bool:
    return os.path.realpath(first) == os.path.realpath(second)


def _format_of(directory: Path) -> str | None:
    marker = directory / FORMAT_FILE
    if not marker.exists():
        return None
    try:
        return marker.read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ResultsError(
            f"{marker}: cannot read the format marker: {error}"
        ) from None


def _holds_results(directory: Path) -> bool:
    return (
        (directory / FORMAT_FILE).exists()
        or (directory / RUNS_DIR).is_dir()
        or any(directory.glob("*/finding.json"))
    )


def check_input(directory: Path) -> None:
    """Raise ResultsError unless ``directory`` is a results directory to merge."""
    hint = "give a directory that `buildfuzz run --results` wrote"
    if not directory.exists():
        raise ResultsError(f"results directory {directory} not found; {hint}")
    if not directory.is_dir():
        raise ResultsError(f"results path {directory} is not a directory; {hint}")
    found = _format_of(directory)
    if found is not None and found != str(RESULTS_FORMAT):
        raise ResultsError(
            f"results directory {directory} has format {found!r}, this buildfuzz "
            f"merges format {RESULTS_FORMAT}; merge it with the buildfuzz version "
            "that wrote it"
        )
    if not _holds_results(directory):
        raise ResultsError(
            f"{directory} is not a buildfuzz results directory (no {FORMAT_FILE} "
            f"file, no finding and no {RUNS_DIR}/ folder); {hint}"
        )


def read_source(directory: Path) -> Source:
    """Read and check every finding and run file of one input."""
    check_input(directory)
    findings = [
        read_finding(path.parent)
        for path in sorted(directory.glob("*/finding.json"))
        if path.is_file()
    ]
    return Source(directory, findings, read_run_files(directory / RUNS_DIR))


def run_file_names(directory: Path) -> list[str]:
    """Return the names of ``runs/*.jsonl`` and ``runs/*.json``, not temporary ones."""
    if not directory.is_dir():
        return []
    return sorted(
        path.name
        for path in directory.iterdir()
        if not path.name.startswith(".")
        and path.name.endswith(RUN_SUFFIXES)
        and path.is_file()
    )


def read_run_files(directory: Path) -> dict[str, bytes]:
    return {name: _read_bytes(directory / name) for name in run_file_names(directory)}


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise ResultsError(f"{path}: cannot read: {error}") from None


def read_finding(directory: Path) -> SourceFinding:
    """Read one finding directory: its record, its case and companion files."""
    fix = f"restore it from the run's artifacts or remove {directory}"
    path = directory / "finding.json"
    raw = _read_bytes(path)
    record = parse_record(raw, path, fix)
    if record.id != directory.name:
        raise ResultsError(
            f"{path}: finding id {record.id!r} does not match its directory "
            f"name {directory.name!r}; {fix}"
        )
    files = {
        name: _read_bytes(directory / name)
        for name in COMPANION_FILES
        if (directory / name).is_file()
    }
    try:
        case = load_case(directory / "case.json")
        targets = {case_target(case), *record.seen_on}
        if "original.json" in files:
            targets.add(case_target(load_case(directory / "original.json")))
    except DataFileError as error:
        raise ResultsError(f"{error}; {fix}") from None
    digest = hashlib.sha256(raw)
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return SourceFinding(
        directory, record, case, files, frozenset(targets), digest.hexdigest()
    )


def parse_record(raw: bytes, path: Path, fix: str) -> FindingRecord:
    """Parse a ``finding.json``, checking the type of every field."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ResultsError(
            f"{path}: finding is not valid JSON: {error}; {fix}"
        ) from None
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: finding is not a JSON object; {fix}")
    try:
        record = FindingRecord(**data)
    except TypeError as error:
        raise ResultsError(
            f"{path}: cannot read finding: {error}; it was changed by hand or "
            f"written by another buildfuzz version; {fix}"
        ) from None
    for name, hint in get_type_hints(FindingRecord).items():
        if not _has_type(getattr(record, name), hint):
            raise ResultsError(
                f"{path}: field {name!r} is not of type {_type_name(hint)}; {fix}"
            )
    for name in ("count", "reproduced", "attempts", "shrink_builds"):
        if getattr(record, name) < 0:
            raise ResultsError(f"{path}: field {name!r} is negative; {fix}")
    for name in ("first_seen", "last_seen"):
        try:
            _instant(getattr(record, name))
        except ValueError:
            raise ResultsError(
                f"{path}: field {name!r} is not an ISO 8601 time; {fix}"
            ) from None
    return record


def _has_type(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if hint is Any:
        return True
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if origin is dict:
        key, item = get_args(hint)
        return isinstance(value, dict) and all(
            _has_type(k, key) and _has_type(v, item) for k, v in value.items()
        )
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint)


def _instant(text: str) -> datetime.datetime:
    """Parse an ISO 8601 time; a time without a zone counts as UTC."""
    moment = datetime.datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return moment


def merge_findings(
    sources: Sequence[Source], *, results_name: str
) -> dict[str, MergedFinding]:
    """Combine the findings of all inputs by id.

    ``results_name`` is the name of the output directory, which the finding
    READMEs use in their commands.
    """
    by_id: dict[str, list[SourceFinding]] = {}
    for source in sources:
        for finding in source.findings:
            by_id.setdefault(finding.record.id, []).append(finding)
    return {
        finding_id: combine(copies, results_name=results_name)
        for finding_id, copies in sorted(by_id.items())
    }


def combine(copies: Sequence[SourceFinding], *, results_name: str) -> MergedFinding:
    """Merge the copies of one finding found in different inputs."""
    ordered = sorted(copies, key=SourceFinding.rank)
    best = ordered[0]
    for other in ordered[1:]:
        if (other.record.phase, other.record.message) != (
            best.record.phase,
            best.record.message,
        ):
            raise ResultsError(
                f"{best.directory} and {other.directory} have the same finding id "
                "but different signatures; one of them was changed by hand, so "
                "remove it from the inputs"
            )
    first = min((_instant(c.record.first_seen), c.record.first_seen) for c in copies)
    last = max((_instant(c.record.last_seen), c.record.last_seen) for c in copies)
    record = replace(
        best.record,
        count=sum(copy.record.count for copy in copies),
        first_seen=first[1],
        last_seen=last[1],
        seen_on=sorted(set().union(*(copy.targets for copy in copies))),
    )
    files = dict(best.files)
    if "README.md" in files:
        files["README.md"] = _update_readme(
            files["README.md"],
            record,
            old_name=best.directory.parent.name,
            new_name=results_name,
        )
    return MergedFinding(record, files, sources=len(copies))


def _update_readme(
    page: bytes, record: FindingRecord, *, old_name: str, new_name: str
) -> bytes:
    """Rewrite a finding's README.md for the merge: counts and results path.

    NOTE: this edits the text that buildfuzz.finding_page renders, because
    rendering it anew needs the profile, which the merging machine may lack.
    """
    times = "once" if record.count == 1 else f"{record.count} times"
    line = (
        f"- first seen: {record.first_seen}, last seen: {record.last_seen}, "
        f"seen {times}"
    )
    text = page.decode("utf-8", "surrogateescape")
    text = README_COUNTS.sub(line, text, count=1)
    text = text.replace(f"{old_name}/{record.id}", f"{new_name}/{record.id}")
    return text.encode("utf-8", "surrogateescape")


def merge_runs(sources: Sequence[Source]) -> dict[str, bytes]:
    """Combine the run files of all inputs by run id.

    Two inputs may contain a run of the same id, such as shards of one seed
    that started in the same second. When their files agree, or one input
    lacks a file that the other has, the run is kept once. Otherwise each
    version of the run is kept under ``<run-id>-<hash>``, a hash of its files.
    """
    versions: dict[str, set[tuple[bytes | None, ...]]] = {}
    for source in sources:
        stems: dict[str, dict[str, bytes]] = {}
        for name, content in source.runs.items():
            stem, suffix = _split_run_name(name)
            stems.setdefault(stem, {})[suffix] = content
        for stem, files in stems.items():
            version = tuple(files.get(suffix) for suffix in RUN_SUFFIXES)
            versions.setdefault(stem, set()).add(version)
    merged: dict[str, bytes] = {}
    for stem, found in sorted(versions.items()):
        agree = all(
            len({version[i] for version in found} - {None}) <= 1
            for i in range(len(RUN_SUFFIXES))
        )
        if agree:
            union = tuple(
                next((v[i] for v in found if v[i] is not None), None)
                for i in range(len(RUN_SUFFIXES))
            )
            _add_run(merged, stem, union)
        else:
            for version in found:
                _add_run(merged, f"{stem}-{_version_hash(version)}", version)
    return dict(sorted(merged.items()))


def _split_run_name(name: str) -> tuple[str, str]:
    for suffix in RUN_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix), suffix
    raise ValueError(f"not a run file name: {name}")


def _add_run(
    merged: dict[str, bytes], stem: str, version: tuple[bytes | None, ...]
) -> None:
    for suffix, content in zip(RUN_SUFFIXES, version, strict=True):
        if content is not None:
            merged[stem + suffix] = content


def _version_hash(version: tuple[bytes | None, ...]) -> str:
    digest = hashlib.sha256()
    for content in version:
        digest.update(b"-" if content is None else hashlib.sha256(content).digest())
    return digest.hexdigest()[:8]


def check_output(
    into: Path,
    findings: dict[str, MergedFinding],
    runs: dict[str, bytes],
    *,
    into_is_input: bool,
) -> None:
    """Raise ResultsError unless ``into`` can take the merge without losing data.

    The merge replaces the findings and runs of ``into`` that it writes. So an
    ``into`` that is not among the inputs may contain only entries that the
    merge writes again.
    """
    if into.exists() and not into.is_dir():
        raise ResultsError(
            f"--into {into} is not a directory; give a new or empty directory"
        )
    found = _format_of(into) if into.is_dir() else None
    if found is not None and found != str(RESULTS_FORMAT):
        raise ResultsError(
            f"--into {into} has results format {found!r}, this buildfuzz writes "
            f"format {RESULTS_FORMAT}; give a new or empty directory"
        )
    if into.is_dir() and any(into.iterdir()) and not _holds_results(into):
        raise ResultsError(
            f"--into {into} is not empty and not a buildfuzz results directory; "
            "give a new or empty directory"
        )
    ResultsStore.check(into)
    if into_is_input or not into.is_dir():
        return
    extra = sorted(
        {path.parent.name for path in into.glob("*/finding.json")} - set(findings)
    ) + sorted(set(run_file_names(into / RUNS_DIR)) - set(runs))
    if extra:
        raise ResultsError(
            f"--into {into} contains {extra[0]}, which no input has; add {into} "
            "to the directories to merge to keep it, or give a new or empty directory"
        )


def write_output(
    into: Path, findings: dict[str, MergedFinding], runs: dict[str, bytes]
) -> None:
    """Write the merged findings and runs under the lock of ``into``."""
    store = ResultsStore(into).open()
    try:
        for finding_id, merged in findings.items():
            directory = store.finding_dir(finding_id)
            directory.mkdir(exist_ok=True)
            for name in COMPANION_FILES:
                if name in merged.files:
                    mode = 0o755 if name.endswith(".sh") else 0o644
                    _write_if_changed(directory / name, merged.files[name], mode)
                else:
                    (directory / name).unlink(missing_ok=True)
            store.save(merged.record)
        if runs:
            (into / RUNS_DIR).mkdir(exist_ok=True)
        for name, content in runs.items():
            _write_if_changed(into / RUNS_DIR / name, content, 0o644)
        # Only an ``into`` that is an input can hold other run files here, and
        # their content was just written under a name with a hash suffix.
        for name in set(run_file_names(into / RUNS_DIR)) - set(runs):
            (into / RUNS_DIR / name).unlink()
    finally:
        store.close()


def _write_if_changed(path: Path, content: bytes, mode: int) -> None:
    if path.is_file() and path.read_bytes() == content:
        os.chmod(path, mode)
        return
    write_atomic(path, content, mode)
