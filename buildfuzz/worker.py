"""One fuzzing worker: its own sandbox engines, fuzzing one shard of a run.

``buildfuzz run --jobs N`` forks N workers. Each has its own run
directory, daemons and run record; all write findings into the same
results directory (every file is written atomically, and a finding
directory belongs to the worker that claimed its signature first).
"""

import fcntl
import multiprocessing
import os
import queue as queue_module
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import structlog

from buildfuzz.build import disk_needed
from buildfuzz.case import Case
from buildfuzz.client import ClientTools
from buildfuzz.finding_writer import FindingWriter, WrittenFindings
from buildfuzz.fuzzer import FindingEvent, Fuzzer, Stats
from buildfuzz.install import CLIENT_TREE
from buildfuzz.oracle_suite import oracle_suite
from buildfuzz.packages import tree_path
from buildfuzz.progress import Progress
from buildfuzz.regression import check_known_findings
from buildfuzz.replay import ReplayReport
from buildfuzz.results import ResultsStore
from buildfuzz.rules import worth_building
from buildfuzz.runlog import RunLog
from buildfuzz.sequences import SequenceFinding, SequenceRunner, SequenceStats
from buildfuzz.session import CaseRecord, EngineUnavailable, Session
from buildfuzz.shard import Shard
from buildfuzz.strategies import cases
from buildfuzz.workdir import remove_tree

log = structlog.get_logger(__name__)

MAX_SKIPPED_FIRST = 200  # skipped cases before the first build that end a run
_Result = TypeVar("_Result")


@dataclass
class WorkerResult:
    stats: Stats = field(default_factory=Stats)
    written: WrittenFindings = field(default_factory=WrittenFindings)
    regressions: list[ReplayReport] = field(default_factory=list)
    interrupted: bool = False
    low_disk: bool = False
    error: str = ""  # why no case could run, when none could
    next_index: int = 0  # the first input this worker did not start
    sequences: SequenceStats = field(default_factory=SequenceStats)


@dataclass
class WorkerPlan:
    """Everything a worker needs; plain data, so a forked process can use it."""

    number: int  # 0 for the only worker of --jobs 1
    shard: Shard
    run_id: str
    run_dir: Path
    seed: int
    deadline: float  # time.monotonic() when no new case may start
    shrink_budget: float
    check_known: bool  # the CI mode's replay of known findings
    live_progress: bool
    start_index: int = 0  # inputs before this one ran in an earlier run


def run_worker(
    plan: WorkerPlan, options: Any, prepared: Any, claims: "Claims"
) -> WorkerResult:
    """Fuzz ``plan.shard`` until the deadline; return what happened."""
    result = WorkerResult()
    store = ResultsStore(options.results)  # the parent holds the lock
    run_log = RunLog(options.results, plan.run_id)
    session: Session | None = None
    fuzzer: Fuzzer | None = None
    progress = Progress(options.budget, live=plan.live_progress)

    def on_case(record: CaseRecord) -> None:
        phase = fuzzer.phase if fuzzer else "fuzz"
        log_case(record, phase)
        run_log.record(record, phase=phase)
        target = f"{record.case.engine_label}/{record.case.builder}"
        findings = len(result.written.new) + len(result.written.known)
        progress.update(result.stats, target, findings)

    def known(signature: Any) -> bool:
        if store.load(signature.id) is not None:
            return True
        return not claims.claim(signature.id)

    try:
        tools = ClientTools.prepare(tree_path(CLIENT_TREE), plan.run_dir)
        session = Session(
            prepared.definitions,
            tools,
            plan.run_dir,
            rules=prepared.rules,
            build_timeout=options.build_timeout,
            strict=options.strict,
            on_case=on_case,
            oracles=oracle_suite(
                prepared.definitions, options.differential, tree=options.tree_oracle
            ),
        )
        writer = FindingWriter(
            store,
            session,
            tools,
            profile=prepared.profile,
            targets=prepared.targets,
            seed=plan.seed,
            build_timeout=options.build_timeout,
        )
        result.written = writer.written
        if plan.check_known:
            result.regressions = check_known_findings(store, session)
        strategy = cases(prepared.profile, prepared.targets)
        if not options.strict:
            # Combinations that can never build waste builds (see rules.py).
            strategy = strategy.filter(partial(worth_building, prepared.rules))
        fuzzer = Fuzzer(
            strategy,
            _disk_guard(session.execute, plan.run_dir, options.min_free),
            profile=prepared.profile,
            targets=prepared.targets,
            seed=plan.seed,
            known=known,
            on_finding=_locked(writer.write, claims),
            may_continue=lambda: (
                _enough_disk(plan.run_dir, options.min_free, result)
                and _some_case_runs(session, result)
            ),
        )
        result.stats = fuzzer.stats
        # The profile's share of the budget goes to sequences, after the cases.
        share = prepared.profile.sequences.share
        with progress:
            try:
                fuzzer.run(
                    plan.deadline - share * options.budget,
                    plan.shrink_budget,
                    plan.shard,
                    start_index=plan.start_index,
                )
            finally:
                result.next_index = fuzzer.next_index
        result.interrupted = fuzzer.interrupted
        if share and not fuzzer.stopped:

            def write_sequence(finding: SequenceFinding) -> None:
                with claims.lock():
                    writer.write_sequence(finding)

            sequences = SequenceRunner(
                session,
                prepared.profile,
                prepared.targets,
                seed=plan.seed,
                known=known,
                on_finding=write_sequence,
                may_continue=lambda: _enough_disk(
                    plan.run_dir, options.min_free, result
                ),
                case_filter=None
                if options.strict
                else partial(worth_building, prepared.rules),
                shard=plan.shard,
            )
            result.sequences = sequences.stats
            sequences.run(plan.deadline, plan.shrink_budget)
            result.interrupted = sequences.interrupted
    except KeyboardInterrupt:
        result.interrupted = True
        log.warning("run interrupted; stopping engines", worker=plan.number)
    finally:
        if session is not None:
            session.close()
        remove_tree(plan.run_dir)
        run_log.close()
    return result


def _locked(
    write: Callable[[FindingEvent], None], claims: "Claims"
) -> Callable[[FindingEvent], None]:
    def locked_write(event: FindingEvent) -> None:
        with claims.lock():  # counts of a known finding are read, changed, written
            write(event)

    return locked_write


def _some_case_runs(session: Session | None, result: WorkerResult) -> bool:
    """Return False once many cases in a row were skipped and none ran."""
    stats = result.stats
    if stats.cases or stats.skipped < MAX_SKIPPED_FIRST or session is None:
        return True
    reasons = sorted(set(session.unusable.values()))
    result.error = (
        f"no case could run: {stats.skipped} were skipped because their engine "
        f"or builder could not start; the first reason: {reasons[0][:400]}"
        if reasons
        else f"no case could run: {stats.skipped} were skipped"
    )
    log.error("stopping: no case could run", skipped=stats.skipped)
    return False


def _disk_guard(
    execute: Callable[[Case], CaseRecord], directory: Path, min_free: int
) -> Callable[[Case], CaseRecord]:
    """Skip a case whose build could take free space below ``min_free``."""

    def guarded(case: Case) -> CaseRecord:
        free = shutil.disk_usage(directory).free
        needed = disk_needed(case)
        if free - needed < min_free:
            log.warning(
                "skipping a case that could fill the disk",
                case_id=case.id,
                needed_mib=needed // 2**20,
                free_mib=free // 2**20,
                min_free_mib=min_free // 2**20,
            )
            raise EngineUnavailable("disk", "not enough free disk for this case")
        return execute(case)

    return guarded


def _enough_disk(directory: Path, min_free: int, result: WorkerResult) -> bool:
    free = shutil.disk_usage(directory).free
    if free >= min_free:
        return True
    if not result.low_disk:
        result.low_disk = True
        log.warning(
            "free disk space below --min-free; starting no more cases",
            free_mib=free // 2**20,
            min_free_mib=min_free // 2**20,
            path=str(directory),
        )
    return False


def log_case(record: CaseRecord, phase: str) -> None:
    evaluation = record.evaluation
    log.info(
        "case",
        phase=phase,  # "fuzz", or "shrink" for builds that shrink a finding
        case_id=record.case.id,
        engine=record.case.engine_label,
        builder=record.case.builder,
        verdict=str(evaluation.verdict),
        signature=str(evaluation.signature) if evaluation.signature else None,
        rule=evaluation.rule,
        seconds=round(record.result.duration, 2),
    )


class Claims:
    """Which worker shrinks which new signature, and a lock for shared records.

    A claim is a file created with O_EXCL, so exactly one process wins it,
    without a manager process that a Ctrl-C could take down.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def claim(self, signature_id: str) -> bool:
        try:
            fd = os.open(self.directory / signature_id, os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    @contextmanager
    def lock(self) -> Iterator[None]:
        fd = os.open(self.directory / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def run_workers(
    plans: list[WorkerPlan], options: Any, prepared: Any, claims: Claims
) -> list[WorkerResult]:
    """Run one worker in this process, or several forked ones in parallel."""
    if len(plans) == 1:
        return [run_worker(plans[0], options, prepared, claims)]

    tasks = [partial(run_worker, plan, options, prepared, claims) for plan in plans]
    return [result for result in run_forked(tasks) if result is not None]


def run_forked(tasks: Sequence[Callable[[], _Result]]) -> list[_Result | None]:
    """Run each task in a forked process, all at once; return results in order.

    A task whose process died without a result has None in its place. A
    Ctrl-C reaches the children too, so this waits for them to clean up and
    return what they have.
    """
    context = multiprocessing.get_context("fork")
    queue: Any = context.Queue()

    def work(number: int, task: Callable[[], _Result]) -> None:
        queue.put((number, task()))

    processes = [
        context.Process(target=work, args=(number, task))
        for number, task in enumerate(tasks)
    ]
    for process in processes:
        process.start()
    results: list[_Result | None] = [None] * len(tasks)
    received = 0
    while received < len(processes):
        try:
            number, result = queue.get(timeout=1)
        except queue_module.Empty:
            if not any(p.is_alive() for p in processes) and queue.empty():
                break  # a worker died without a result
            continue
        except KeyboardInterrupt:
            continue  # the workers got the signal too; wait for their clean-up
        results[number] = result
        received += 1
    for process in processes:
        process.join()
    return results
