"""``buildfuzz replay``: run recorded cases again on fresh sandbox engines."""

import json
import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from types import TracebackType

import structlog

from buildfuzz.case import Case, load_case
from buildfuzz.client import ClientTools
from buildfuzz.definitions import Definitions, load_definitions
from buildfuzz.errors import DataFileError, EngineError, SetupError, UsageError
from buildfuzz.install import CLIENT_TREE, ensure_installed
from buildfuzz.packages import tree_path
from buildfuzz.results import ResultsStore
from buildfuzz.rules import load_rules
from buildfuzz.session import EngineUnavailable, Session
from buildfuzz.signature import Phase, Signature
from buildfuzz.workdir import DEFAULT_BASE, create_run_dir, remove_tree

log = structlog.get_logger(__name__)


class Status(StrEnum):
    """The regression status of a known finding."""

    STILL_FAILING = "still failing"
    CHANGED = "changed signature"
    FIXED = "fixed"


@dataclass
class ReplayReport:
    name: str
    expected: Signature | None
    runs: int
    reproduced: int = 0
    signatures: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.reproduced else 1

    @property
    def status(self) -> Status:
        if self.reproduced:
            return Status.STILL_FAILING
        if any(signature != "pass" for signature in self.signatures):
            return Status.CHANGED
        return Status.FIXED


def expected_signature(path: Path) -> Signature | None:
    """Read the signature of the finding that ``path`` belongs to, if any."""
    directory = path if path.is_dir() else path.parent
    finding = directory / "finding.json"
    if not finding.exists():
        return None
    try:
        data = json.loads(finding.read_text())
        return Signature(Phase(data["phase"]), str(data["message"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise DataFileError(finding, f"invalid finding record: {error}") from None


class Replayer:
    """Sandbox engines that replay cases; use as a context manager."""

    def __init__(self, *, build_timeout: float, workdir: Path = DEFAULT_BASE) -> None:
        if os.geteuid() != 0:
            raise SetupError(
                "buildfuzz replay needs root to start a sandbox Docker daemon; "
                "run it as root or with sudo"
            )
        self.definitions: Definitions = load_definitions()
        self.build_timeout = build_timeout
        self.workdir = workdir
        self._run_dir: Path | None = None
        self._session: Session | None = None

    def check(self, case: Case) -> None:
        """Raise UsageError unless the case's engine and builder are defined."""
        engines, builders = self.definitions.engines, self.definitions.builders
        if case.engine not in engines:
            raise UsageError(
                f"case names engine {case.engine!r}, which builders/engines.toml does "
                f"not define; defined engines: {', '.join(sorted(engines))}"
            )
        if case.builder not in builders:
            raise UsageError(
                f"case names builder {case.builder!r}, which builders/builders.toml "
                f"does not define; defined builders: {', '.join(sorted(builders))}"
            )

    def __enter__(self) -> "Replayer":
        ensure_installed(self.definitions, sorted(self.definitions.engines))
        self._run_dir = create_run_dir(self.workdir)
        tools = ClientTools.prepare(tree_path(CLIENT_TREE), self._run_dir)
        self._session = Session(
            self.definitions,
            tools,
            self._run_dir,
            rules=load_rules("none"),
            build_timeout=self.build_timeout,
        )
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._session is not None:
            self._session.close()
        if self._run_dir is not None:
            remove_tree(self._run_dir)

    def replay(
        self, name: str, case: Case, expected: Signature | None, runs: int
    ) -> ReplayReport:
        assert self._session is not None, "use Replayer as a context manager"
        report = ReplayReport(name=name, expected=expected, runs=runs)
        for attempt in range(1, runs + 1):
            try:
                record = self._session.execute(case)
            except EngineUnavailable as error:
                raise EngineError(
                    f"the case's engine {error.label} cannot start here: "
                    f"{error.reason.splitlines()[-1]}"
                ) from None
            signature = record.evaluation.signature
            report.signatures.append(str(signature) if signature else "pass")
            matched = signature is not None and (
                expected is None or signature == expected
            )
            report.reproduced += matched
            log.info(
                "replay",
                finding=name,
                attempt=attempt,
                reproduced=matched,
                signature=str(signature) if signature else "pass",
                seconds=round(record.result.duration, 2),
            )
        return report


def replay_path(
    path: Path, *, runs: int, build_timeout: float, workdir: Path = DEFAULT_BASE
) -> ReplayReport:
    """Replay one finding directory or case.json ``runs`` times."""
    _check_runs(runs)
    case = load_case(path)
    expected = expected_signature(path)
    replayer = Replayer(build_timeout=build_timeout, workdir=workdir)
    replayer.check(case)
    with replayer:
        return replayer.replay(str(path), case, expected, runs)


def replay_all(
    results: Path, *, runs: int, build_timeout: float, workdir: Path = DEFAULT_BASE
) -> list[ReplayReport]:
    """Replay every finding of a results directory."""
    _check_runs(runs)
    if not results.is_dir():
        raise UsageError(f"results directory {results} not found; give --results DIR")
    ResultsStore.check(results)
    findings = sorted(path.parent for path in results.glob("*/finding.json"))
    loaded = [
        (directory, load_case(directory), expected_signature(directory))
        for directory in findings
    ]
    replayer = Replayer(build_timeout=build_timeout, workdir=workdir)
    for _, case, _ in loaded:
        replayer.check(case)
    if not loaded:
        return []
    with replayer:
        return [
            replayer.replay(directory.name, case, expected, runs)
            for directory, case, expected in loaded
        ]


def _check_runs(runs: int) -> None:
    if runs < 1:
        raise UsageError(f"--runs must be at least 1, not {runs}")
