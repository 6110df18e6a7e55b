"""``buildfuzz replay``: run recorded cases again on fresh sandbox engines."""

import json
import os
import time
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from pathlib import Path
from types import TracebackType

import structlog

from buildfuzz import secrets
from buildfuzz.case import Case, load_case
from buildfuzz.client import ClientTools
from buildfuzz.definitions import Definitions, load_definitions
from buildfuzz.emulation import missing_emulation
from buildfuzz.errors import (
    BuildfuzzError,
    DataFileError,
    EngineError,
    SetupError,
    UsageError,
)
from buildfuzz.install import CLIENT_TREE, ensure_installed
from buildfuzz.packages import tree_path
from buildfuzz.profile import load_profile
from buildfuzz.results import ResultsStore
from buildfuzz.rootless import rootless_problem
from buildfuzz.rules import load_rules
from buildfuzz.sequences import Step, replay_steps, steps_from_json
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


def load_steps(path: Path) -> list[Step] | None:
    """Read the steps of a sequence finding that ``path`` belongs to, if it is one."""
    directory = path if path.is_dir() else path.parent
    steps = directory / "steps.json"
    if not steps.exists():
        return None
    try:
        text = steps.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise DataFileError(steps, f"cannot read the steps: {error}") from None
    return steps_from_json(text, source=steps)


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
        secrets.check_available(case.build_args, f"case {case.id}")
        if engines[case.engine].rootless:
            problem = rootless_problem()
            if problem is not None:
                raise UsageError(f"case {case.id} needs a rootless engine: {problem}")
        runs = any(line.lstrip().upper().startswith("RUN ") for line in case.dockerfile)
        problem = missing_emulation(case.platform) if runs else None
        if problem is not None:
            raise UsageError(f"case {case.id}: {problem}")

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
        self,
        name: str,
        case: Case,
        expected: Signature | None,
        steps: list[Step] | None,
        runs: int,
    ) -> ReplayReport:
        """Build ``case`` (or run a sequence finding's ``steps``) ``runs`` times."""
        assert self._session is not None, "use Replayer as a context manager"
        report = ReplayReport(name=name, expected=expected, runs=runs)
        for attempt in range(1, runs + 1):
            started = time.monotonic()
            try:
                signature = self._attempt(case, steps)
            except EngineUnavailable as error:
                raise EngineError(
                    f"the case's engine {error.label} cannot start here: "
                    f"{error.reason.splitlines()[-1]}"
                ) from None
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
                seconds=round(time.monotonic() - started, 2),
            )
        return report

    def _attempt(self, case: Case, steps: list[Step] | None) -> Signature | None:
        """Return the signature of one replay: a build's, or a sequence's mismatch."""
        assert self._session is not None
        if steps is None:
            return self._session.execute(case).evaluation.signature
        mismatch = replay_steps(self._session, steps, load_profile("default"))
        return None if mismatch is None else mismatch.signature


def replay_path(
    path: Path, *, runs: int, build_timeout: float, workdir: Path = DEFAULT_BASE
) -> ReplayReport:
    """Replay one finding directory or case.json ``runs`` times."""
    _check_runs(runs)
    case = load_case(path)
    expected = expected_signature(path)
    steps = load_steps(path)
    replayer = Replayer(build_timeout=build_timeout, workdir=workdir)
    replayer.check(case)
    with replayer:
        return replayer.replay(str(path), case, expected, steps, runs)


def replay_all(
    results: Path,
    *,
    runs: int,
    build_timeout: float,
    workdir: Path = DEFAULT_BASE,
    jobs: int = 1,
) -> list[ReplayReport]:
    """Replay every finding of a results directory, ``jobs`` findings at a time.

    Each of the ``jobs`` workers is a forked process with sandbox engines of
    its own, as in ``buildfuzz run --jobs``. Reports come in the order of
    the finding directories' names whatever the number of jobs.
    """
    _check_runs(runs)
    check_jobs(jobs)
    if not results.is_dir():
        raise UsageError(f"results directory {results} not found; give --results DIR")
    ResultsStore.check(results)
    findings = sorted(path.parent for path in results.glob("*/finding.json"))
    loaded = [
        (
            directory.name,
            load_case(directory),
            expected_signature(directory),
            load_steps(directory),
        )
        for directory in findings
    ]
    replayer = Replayer(build_timeout=build_timeout, workdir=workdir)
    for _, case, _, _ in loaded:
        replayer.check(case)
    if not loaded:
        return []
    if jobs == 1 or len(loaded) == 1:
        with replayer:
            return [replayer.replay(*finding, runs) for finding in loaded]
    return _replay_in_parallel(loaded, replayer, runs=runs, jobs=jobs)


MAX_JOBS = 64


def check_jobs(jobs: int) -> None:
    """Raise UsageError unless ``jobs`` is a number of workers buildfuzz runs."""
    if not 1 <= jobs <= MAX_JOBS:
        raise UsageError(f"invalid --jobs {jobs}; use a number from 1 to {MAX_JOBS}")


_Finding = tuple[str, Case, Signature | None, list[Step] | None]


@dataclass
class _ShareOutcome:
    """What one replay worker sends back to the parent process."""

    reports: list[ReplayReport] = field(default_factory=list)
    error: str = ""  # the message of the error that stopped the worker
    interrupted: bool = False


def _replay_in_parallel(
    loaded: list[_Finding], replayer: Replayer, *, runs: int, jobs: int
) -> list[ReplayReport]:
    # A circular import otherwise: worker.py reports regressions as ReplayReport.
    from buildfuzz.worker import run_forked

    # Install, check the work directory and remove dead runs' leftovers once
    # here, so that the workers do not race to do it.
    ensure_installed(replayer.definitions, sorted(replayer.definitions.engines))
    remove_tree(create_run_dir(replayer.workdir))

    workers = min(jobs, len(loaded))
    tasks = [
        partial(
            _replay_share,
            number + 1,
            loaded[number::workers],
            runs=runs,
            build_timeout=replayer.build_timeout,
            workdir=replayer.workdir,
        )
        for number in range(workers)
    ]
    outcomes = run_forked(tasks)

    if any(outcome is not None and outcome.interrupted for outcome in outcomes):
        raise KeyboardInterrupt
    reports: dict[str, ReplayReport] = {}
    for outcome in outcomes:
        if outcome is None:
            raise EngineError("a replay worker exited without a result; see its log")
        if outcome.error:
            raise BuildfuzzError(outcome.error)
        reports.update((report.name, report) for report in outcome.reports)
    return [reports[name] for name, _, _, _ in loaded]


def _replay_share(
    worker: int,
    findings: list[_Finding],
    *,
    runs: int,
    build_timeout: float,
    workdir: Path,
) -> _ShareOutcome:
    """Replay some findings on engines of this process (a forked worker)."""
    outcome = _ShareOutcome()
    names = [name for name, _, _, _ in findings]
    log.info("replay worker started", worker=worker, pid=os.getpid(), findings=names)
    try:
        with Replayer(build_timeout=build_timeout, workdir=workdir) as replayer:
            for finding in findings:
                outcome.reports.append(replayer.replay(*finding, runs))
    except BuildfuzzError as error:
        # Sent back as text: not every error's arguments survive pickling.
        outcome.error = str(error)
    except KeyboardInterrupt:
        outcome.interrupted = True
    return outcome


def _check_runs(runs: int) -> None:
    if runs < 1:
        raise UsageError(f"--runs must be at least 1, not {runs}")
