"""``buildfuzz run``: a fuzzing campaign from set-up to summary."""

import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import structlog

from buildfuzz import secrets
from buildfuzz.capabilities import privileged_problem
from buildfuzz.client_user import user_client_problem
from buildfuzz.definitions import (
    BuilderDefinition,
    Definitions,
    EngineDefinition,
    load_definitions,
)
from buildfuzz.errors import (
    EXIT_FINDINGS,
    EXIT_INTERRUPTED,
    EXIT_KNOWN_FINDINGS,
    EXIT_OK,
    EngineError,
    SetupError,
    UsageError,
)
from buildfuzz.external import daemon_facts
from buildfuzz.finding_writer import WrittenFindings
from buildfuzz.fuzzer import Shard, Stats
from buildfuzz.install import (
    builder_problem,
    ensure_installed,
    missing_trees,
)
from buildfuzz.profile import Profile, load_profile
from buildfuzz.replay import ReplayReport, Status
from buildfuzz.results import ResultsStore, write_atomic
from buildfuzz.rules import Rule, check_rule_names, load_rules
from buildfuzz.runlog import RunLog
from buildfuzz.sequences import SequenceStats
from buildfuzz.strategies import Target
from buildfuzz.workdir import DEFAULT_BASE, check_workdir, create_run_dir, remove_tree
from buildfuzz.worker import Claims, WorkerPlan, WorkerResult, run_workers

log = structlog.get_logger(__name__)

HOST_ENGINE = "host"  # the name of the engine that --engine-host gives


@dataclass
class RunOptions:
    budget: float
    seed: int | None
    results: Path
    profile: str
    build_timeout: float
    shrink_budget: float | None
    strict: bool = False
    offline: bool = False
    ci: bool = False
    min_free: int = 2 * 2**30  # bytes free under the work directory to go on
    jobs: int = 1  # workers in parallel, each with its own engines
    engine_host: str | None = None  # an existing daemon to use instead of engines
    disposable_engine: bool = False  # engine_host is a throw-away daemon
    resume: bool = False  # go on with the saved seed from where the last run stopped
    differential: tuple[str, ...] = ()  # builder pairs A:B (oracle_diff)
    tree_oracle: bool = True  # compare built trees with the case's model
    workdir: Path = DEFAULT_BASE
    shard: Shard = Shard(1, 1)


@dataclass
class RunSummary:
    seed: int
    profile: str
    budget: float
    elapsed: float
    stats: Stats
    written: WrittenFindings = field(default_factory=WrittenFindings)
    interrupted: bool = False
    results: Path = Path("results")
    ci: bool = False
    regressions: list[ReplayReport] = field(default_factory=list)
    low_disk: bool = False  # the run stopped early for lack of disk space
    sequences: SequenceStats = field(default_factory=SequenceStats)

    @property
    def new_findings(self) -> list[str]:
        return self.written.new

    @property
    def known_findings(self) -> list[str]:
        return self.written.known

    @property
    def distinct_findings(self) -> int:
        return len(self.new_findings) + len(self.known_findings)

    @property
    def builds_per_minute(self) -> float:
        builds = self.stats.cases + self.stats.shrink_builds
        builds += self.sequences.builds + self.sequences.shrink_builds
        return builds / (self.elapsed / 60) if self.elapsed > 0 else 0.0

    def to_dict(self, run_id: str) -> dict[str, object]:
        return {
            "run_id": run_id,
            "seed": self.seed,
            "profile": self.profile,
            "budget": self.budget,
            "elapsed": round(self.elapsed, 1),
            "interrupted": self.interrupted,
            "cases": self.stats.cases,
            "passes": self.stats.passes,
            "expected": self.stats.expected,
            "finding_builds": self.stats.findings,
            "shrink_builds": self.stats.shrink_builds,
            "builds_per_minute": round(self.builds_per_minute, 1),
            "per_target": self.stats.per_verdict_target,
            "new_findings": self.new_findings,
            "known_findings": self.known_findings,
            "regressions": {r.name: str(r.status) for r in self.regressions},
            "sequences": asdict(self.sequences),
        }

    @property
    def changed_regressions(self) -> list[ReplayReport]:
        return [r for r in self.regressions if r.status is Status.CHANGED]

    @property
    def exit_code(self) -> int:
        """0 no findings, 1 findings (in CI mode: new ones), 3 known only."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        if not self.ci:
            return EXIT_FINDINGS if self.distinct_findings else EXIT_OK
        if self.new_findings or self.changed_regressions:
            return EXIT_FINDINGS
        still_failing = [
            r for r in self.regressions if r.status is Status.STILL_FAILING
        ]
        if self.known_findings or still_failing:
            return EXIT_KNOWN_FINDINGS
        return EXIT_OK


@dataclass(frozen=True)
class Prepared:
    """Everything validated before a run creates any file."""

    profile: Profile
    definitions: Definitions
    rules: tuple[Rule, ...]
    targets: tuple[Target, ...]


def prepare(options: RunOptions) -> Prepared:
    """Validate the options and data files; raise before anything is written."""
    if os.geteuid() != 0:
        raise SetupError(
            "buildfuzz run needs root to start its sandbox Docker daemons; "
            "run it as root or with sudo"
        )
    if options.build_timeout <= 0:
        raise UsageError("--build-timeout must be a positive duration")
    check_workdir(options.workdir.absolute())
    _check_free_disk(options.workdir, options.min_free)
    profile = load_profile(options.profile)
    secrets.check_available(profile.build.build_args, f"profile {profile.name}")
    definitions = load_definitions()
    rules = load_rules(profile.rules)
    ResultsStore.check(options.results)
    ResultsStore.check_findings(options.results)
    if options.disposable_engine and not options.engine_host:
        raise UsageError(
            "--disposable-engine marks the --engine-host daemon as a throw-away "
            "one; give --engine-host or --engine-context too"
        )
    if options.engine_host:
        # Every case runs on the daemon the user named, as engine "host".
        definitions.engines[HOST_ENGINE] = EngineDefinition(
            name=HOST_ENGINE,
            description=f"the existing daemon at {options.engine_host}",
            storage_driver="",
            packages=(),
            storage_drivers=(),
            source="external",
            host=options.engine_host,
            disposable=options.disposable_engine,
        )
        profile = replace(profile, engines=(HOST_ENGINE,))

    for engine in profile.engines:
        if engine not in definitions.engines:
            known = ", ".join(sorted(definitions.engines))
            raise UsageError(
                f"profile {profile.name}: unknown engine {engine!r}; "
                f"defined engines: {known}"
            )
    drivers = {d for e in definitions.engines.values() for d in e.storage_drivers}
    for driver in profile.engine.storage_drivers:
        if driver and driver not in drivers:
            raise UsageError(
                f"profile {profile.name}: unknown storage driver {driver!r}; "
                f'use "" (each engine\'s own) or one of {", ".join(sorted(drivers))}'
            )
    check_rule_names(rules, definitions)
    for engine in profile.engines:
        if definitions.engines[engine].source == "external":
            # Before anything is written: an unreachable daemon ends the run.
            daemon_facts(definitions.engines[engine])
    for builder in profile.builders:
        if builder not in definitions.builders:
            known = ", ".join(sorted(definitions.builders))
            raise UsageError(
                f"profile {profile.name}: unknown builder {builder!r}; "
                f"defined builders: {known}"
            )
    builders = usable_builders(definitions, profile)
    clients_allowed = _user_clients_allowed(profile, options.workdir)
    targets = tuple(
        Target(
            engine,
            builder,
            definitions.builders[builder].outputs,
            storage_drivers=definitions.engines[engine].storage_drivers,
            containerd_store=definitions.engines[engine].containerd_store,
            limits=definitions.engines[engine].sandboxed,
            engine_store=_reads_engine_store(definitions.builders[builder]),
            registry=_reaches_loopback(definitions.engines[engine]),
            client_users=definitions.engines[engine].sandboxed
            and _reads_engine_store(definitions.builders[builder])
            and clients_allowed,
        )
        for engine in profile.engines
        for builder in builders
        if _fits_engine(definitions, engine, builder)
    )
    if not targets:
        raise UsageError(
            f"profile {profile.name}: none of its builders can run on its engines; "
            "an existing daemon needs builders of the docker-container or remote "
            "driver, such as container-v0-34, or --disposable-engine when it is a "
            "throw-away daemon"
        )

    missing = missing_trees(definitions, list(profile.engines))
    if missing and options.offline:
        raise UsageError(
            f"engine or client packages missing from the cache ({', '.join(missing)}) "
            "and --offline was given; run `buildfuzz setup` first"
        )
    return Prepared(profile, definitions, rules, targets)


def _check_free_disk(workdir: Path, min_free: int) -> None:
    """Raise SetupError when the disk is below ``min_free`` before any case."""
    probe = workdir.absolute()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < min_free:
        raise SetupError(
            f"free disk space under {probe} is {free // 2**20} MiB, below "
            f"--min-free {min_free // 2**20} MiB; free some space or give a "
            "smaller --min-free"
        )


def _user_clients_allowed(profile: Profile, workdir: Path) -> bool:
    """Return whether cases may run their client as the unprivileged user."""
    if profile.build.client_users == ("",):
        return False
    problem = user_client_problem(workdir)
    if problem is not None and "" not in profile.build.client_users:
        raise UsageError(
            f"profile {profile.name}: every case runs its client as a non-root "
            f"user (client_users), but {problem}"
        )
    if problem is not None:
        log.warning("cases with a non-root client left out", reason=problem)
    return problem is None


def _reads_engine_store(builder: BuilderDefinition) -> bool:
    return builder.classic or builder.driver == "docker"


def _reaches_loopback(engine: EngineDefinition) -> bool:
    """Return whether the engine can pull from this machine's 127.0.0.1.

    A dind engine's container has no network, a rootless engine has a
    network namespace of its own, and an existing daemon
    reached over TCP (a CI job's dind service) has a loopback of its own.
    """
    if engine.source == "dind" or engine.rootless:
        return False
    return engine.sandboxed or engine.host.startswith("unix://")


def _fits_engine(definitions: Definitions, engine: str, builder: str) -> bool:
    """Leave out builders that cannot or must not run on ``engine``.

    The docker driver and the classic builder stay off existing daemons
    unless they are disposable: both would build with the daemon's own
    cache and images, which belong to its owner; builders of the other
    drivers keep their state apart.
    The docker-container driver stays off engines that cannot start its
    privileged container on this machine (see buildfuzz.capabilities), off
    dind engines, whose containers have no network, and off rootless
    engines, whose network namespace has a loopback of its own.
    """
    driver = definitions.builders[builder]
    if driver.driver == "docker-container":
        problem: str | None = None
        if definitions.engines[engine].source == "dind":
            problem = (
                "a dind engine has no network, so a builder container on it "
                "cannot reach the loopback registry"
            )
        elif definitions.engines[engine].rootless:
            problem = (
                "a rootless engine's network namespace has its own 127.0.0.1, "
                "so a builder container on it cannot reach the loopback registry"
            )
        else:
            problem = privileged_problem(definitions.engines[engine])
        if problem is not None:
            log.warning(
                "builder left out on this engine",
                builder=builder,
                engine=engine,
                reason=problem,
            )
            return False
    definition = definitions.engines[engine]
    if definition.sandboxed or definition.disposable:
        return True
    if driver.classic or driver.driver == "docker":
        log.warning(
            "builder left out on an existing daemon", builder=builder, engine=engine
        )
        return False
    return True


def usable_builders(definitions: Definitions, profile: Profile) -> list[str]:
    """Return the profile's builders that can run here; warn about the others."""
    usable = []
    for name in profile.builders:
        problem = builder_problem(definitions, name)
        if problem is None:
            usable.append(name)
        else:
            log.warning("builder left out of this run", builder=name, reason=problem)
    if not usable:
        raise SetupError(
            f"profile {profile.name}: none of its builders can run here; "
            "see `buildfuzz builders list`"
        )
    return usable


def run_campaign(options: RunOptions) -> RunSummary:
    prepared = prepare(options)
    state_key = f"{prepared.profile.name} {options.shard.index}/{options.shard.count}"
    saved = read_state(options.results).get(state_key, {}) if options.resume else {}
    seed = options.seed if options.seed is not None else saved.get("seed")
    if seed is None:
        seed = random.randrange(2**32)
    start_index = int(saved.get("next_index", 0)) if saved.get("seed") == seed else 0
    if options.resume and not saved:
        log.warning(
            "--continue: no earlier run of this profile and shard; starting anew",
            state=str(options.results / STATE_FILE),
        )
    elif options.resume and saved.get("seed") != seed:
        log.warning(
            "--continue: --seed is not the saved seed; starting at its first case",
            saved_seed=saved.get("seed"),
        )
    builders = sorted({target.builder for target in prepared.targets})
    ensure_installed(
        prepared.definitions,
        list(prepared.profile.engines),
        builders,
        prepared.profile.dockerfile.bases,
        prepared.profile.build.attestations,
    )

    run_dir = create_run_dir(options.workdir)
    try:
        store = ResultsStore(options.results).open()
    except BaseException:
        remove_tree(run_dir)
        raise
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + f"-{seed}"
    started = time.monotonic()
    summary = RunSummary(
        seed=seed,
        profile=prepared.profile.name,
        budget=options.budget,
        elapsed=0.0,
        stats=Stats(),
        results=options.results,
        ci=options.ci,
    )
    shrink_budget = options.shrink_budget or max(60.0, options.budget * 0.25)
    plans = [
        WorkerPlan(
            number=number,
            shard=_worker_shard(options.shard, number, options.jobs),
            run_id=run_id if options.jobs == 1 else f"{run_id}-w{number + 1}",
            run_dir=run_dir / f"w{number + 1}",
            seed=seed,
            deadline=started + options.budget,
            shrink_budget=shrink_budget,
            check_known=options.ci and number == 0,
            live_progress=options.jobs == 1 and sys.stderr.isatty(),
            start_index=start_index,
        )
        for number in range(options.jobs)
    ]
    log.info(
        "run started",
        seed=seed,
        profile=prepared.profile.name,
        budget=options.budget,
        jobs=options.jobs,
    )
    try:
        results = run_workers(plans, options, prepared, Claims(run_dir / "claims"))
        _merge(summary, results)
        if results:
            # Continue where the slowest worker stopped; a few inputs of the
            # faster ones run again rather than some being left out.
            next_index = min(result.next_index for result in results)
            write_state(options.results, state_key, seed, next_index)
        errors = [result.error for result in results if result.error]
        if errors and not summary.stats.cases:
            raise EngineError(errors[0])
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("run interrupted; stopping engines and writing the summary")
    finally:
        summary.elapsed = time.monotonic() - started
        remove_tree(run_dir)
        builds = summary.stats.cases + summary.stats.shrink_builds
        if builds or summary.sequences.builds:
            RunLog(options.results, run_id).finish(summary.to_dict(run_id))
        store.close()

    log.info(
        "run finished",
        cases=summary.stats.cases,
        findings=summary.distinct_findings,
        seconds=round(summary.elapsed, 1),
    )
    return summary


def _worker_shard(shard: Shard, number: int, jobs: int) -> Shard:
    """Split the run's shard among ``jobs`` workers, disjointly and completely.

    Shard K/N runs the inputs K-1, K-1+N, ...; its worker j of J takes every
    J-th of those: K-1+N*j, K-1+N*j+N*J, ...
    """
    return Shard(shard.index + shard.count * number, shard.count * jobs)


def _merge(summary: RunSummary, results: list[WorkerResult]) -> None:
    for result in results:
        stats = result.stats
        total = summary.stats
        total.cases += stats.cases
        total.passes += stats.passes
        total.expected += stats.expected
        total.findings += stats.findings
        total.shrink_builds += stats.shrink_builds
        total.skipped += stats.skipped
        for target, count in stats.per_target.items():
            total.per_target[target] = total.per_target.get(target, 0) + count
        for target, verdicts in stats.per_verdict_target.items():
            merged = total.per_verdict_target.setdefault(target, {})
            for verdict, count in verdicts.items():
                merged[verdict] = merged.get(verdict, 0) + count
        for finding_id in result.written.new:
            summary.written.new.append(finding_id)
        for finding_id in result.written.known:
            if finding_id not in summary.written.known + summary.written.new:
                summary.written.known.append(finding_id)
        summary.regressions += result.regressions
        summary.sequences.add(result.sequences)
        summary.interrupted = summary.interrupted or result.interrupted
        summary.low_disk = summary.low_disk or result.low_disk
    # A signature one worker wrote and another saw again is new, not known.
    summary.written.known = [
        finding for finding in summary.written.known
        if finding not in summary.written.new
    ]  # fmt: skip


STATE_FILE = "state.json"


def read_state(results: Path) -> dict[str, dict[str, int]]:
    """Read where earlier runs stopped, per profile and shard; {} if unknown."""
    try:
        data = json.loads((results / STATE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_state(results: Path, key: str, seed: int, next_index: int) -> None:
    state = read_state(results)
    state[key] = {"seed": seed, "next_index": next_index}
    write_atomic(
        results / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n"
    )
