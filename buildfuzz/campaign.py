"""``buildfuzz run``: a fuzzing campaign from set-up to summary."""

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from buildfuzz.case import load_case
from buildfuzz.client import ClientTools
from buildfuzz.definitions import Definitions, load_definitions
from buildfuzz.environment import describe
from buildfuzz.errors import (
    EXIT_FINDINGS,
    EXIT_INTERRUPTED,
    EXIT_OK,
    BuildfuzzError,
    SetupError,
    UsageError,
)
from buildfuzz.finding_page import render_finding_readme
from buildfuzz.fuzzer import FindingEvent, Fuzzer, Stats
from buildfuzz.install import CLIENT_TREE, ensure_installed, missing_trees
from buildfuzz.packages import tree_path
from buildfuzz.profile import Profile, load_profile
from buildfuzz.repro import render_repro
from buildfuzz.results import (
    FindingRecord,
    ResultsStore,
    json_text,
    now,
    write_atomic,
)
from buildfuzz.rules import Rule, load_rules
from buildfuzz.session import CaseRecord, Session
from buildfuzz.strategies import Target, cases
from buildfuzz.workdir import DEFAULT_BASE, create_run_dir, remove_tree

log = structlog.get_logger(__name__)


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
    workdir: Path = DEFAULT_BASE


@dataclass
class RunSummary:
    seed: int
    profile: str
    budget: float
    elapsed: float
    stats: Stats
    new_findings: list[str] = field(default_factory=list)
    known_findings: list[str] = field(default_factory=list)
    interrupted: bool = False
    results: Path = Path("results")

    @property
    def distinct_findings(self) -> int:
        return len(self.new_findings) + len(self.known_findings)

    @property
    def builds_per_minute(self) -> float:
        builds = self.stats.cases + self.stats.shrink_builds
        return builds / (self.elapsed / 60) if self.elapsed > 0 else 0.0

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_FINDINGS if self.distinct_findings else EXIT_OK


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
    profile = load_profile(options.profile)
    definitions = load_definitions()
    rules = load_rules(profile.rules)
    ResultsStore.check(options.results)

    for engine in profile.engines:
        if engine not in definitions.engines:
            known = ", ".join(sorted(definitions.engines))
            raise UsageError(
                f"profile {profile.name}: unknown engine {engine!r}; "
                f"defined engines: {known}"
            )
    for builder in profile.builders:
        if builder not in definitions.builders:
            known = ", ".join(sorted(definitions.builders))
            raise UsageError(
                f"profile {profile.name}: unknown builder {builder!r}; "
                f"defined builders: {known}"
            )
    targets = tuple(
        Target(engine, builder, definitions.builders[builder].outputs)
        for engine in profile.engines
        for builder in profile.builders
    )

    missing = missing_trees(definitions, list(profile.engines))
    if missing and options.offline:
        raise UsageError(
            f"engine or client packages missing from the cache ({', '.join(missing)}) "
            "and --offline was given; run `buildfuzz setup` first"
        )
    return Prepared(profile, definitions, rules, targets)


def run_campaign(options: RunOptions) -> RunSummary:
    prepared = prepare(options)
    seed = options.seed if options.seed is not None else random.randrange(2**32)
    ensure_installed(prepared.definitions, list(prepared.profile.engines))

    store = ResultsStore(options.results).open()
    run_dir = create_run_dir(options.workdir)
    started = time.monotonic()
    summary = RunSummary(
        seed=seed,
        profile=prepared.profile.name,
        budget=options.budget,
        elapsed=0.0,
        stats=Stats(),
        results=options.results,
    )
    session: Session | None = None
    log.info(
        "run started", seed=seed, profile=prepared.profile.name, budget=options.budget
    )
    try:
        tools = ClientTools.prepare(tree_path(CLIENT_TREE), run_dir)
        session = Session(
            prepared.definitions,
            tools,
            run_dir,
            rules=prepared.rules,
            build_timeout=options.build_timeout,
            strict=options.strict,
            on_case=_log_case,
        )
        writer = _FindingWriter(store, session, tools, prepared, seed, options, summary)
        fuzzer = Fuzzer(
            cases(prepared.profile, prepared.targets),
            session.execute,
            profile=prepared.profile,
            targets=prepared.targets,
            seed=seed,
            known=lambda signature: store.load(signature.id) is not None,
            on_finding=writer.write,
        )
        summary.stats = fuzzer.stats
        shrink_budget = options.shrink_budget or max(60.0, options.budget * 0.25)
        fuzzer.run(started + options.budget, shrink_budget)
        summary.interrupted = fuzzer.interrupted
    except KeyboardInterrupt:
        summary.interrupted = True
        log.warning("run interrupted; stopping engines and writing the summary")
    finally:
        summary.elapsed = time.monotonic() - started
        if session is not None:
            session.close()
        remove_tree(run_dir)
        store.close()

    log.info(
        "run finished",
        cases=summary.stats.cases,
        findings=summary.distinct_findings,
        seconds=round(summary.elapsed, 1),
    )
    return summary


def _log_case(record: CaseRecord) -> None:
    evaluation = record.evaluation
    log.info(
        "case",
        case_id=record.case.id,
        engine=record.case.engine,
        builder=record.case.builder,
        verdict=str(evaluation.verdict),
        signature=str(evaluation.signature) if evaluation.signature else None,
        rule=evaluation.rule,
        seconds=round(record.result.duration, 2),
    )


class _FindingWriter:
    """Turn the fuzzer's finding events into results directories."""

    def __init__(
        self,
        store: ResultsStore,
        session: Session,
        tools: ClientTools,
        prepared: Prepared,
        seed: int,
        options: RunOptions,
        summary: RunSummary,
    ) -> None:
        self.store = store
        self.session = session
        self.tools = tools
        self.prepared = prepared
        self.seed = seed
        self.options = options
        self.summary = summary

    def write(self, event: FindingEvent) -> None:
        signature = event.signature
        if not event.new:
            known = self.store.seen_again(signature.id)
            if known is not None:
                self._refresh_readme(known)
            if (
                signature.id
                not in self.summary.known_findings + self.summary.new_findings
            ):
                self.summary.known_findings.append(signature.id)
            return

        original = event.original
        shrunk = event.shrunk
        best = shrunk.record if shrunk else original
        engine = self.session.engines[best.case.engine]
        environment = describe(
            self.tools.docker(engine.host),
            engine.info,
            seed=self.seed,
            profile=self.prepared.profile.name,
        )
        timestamp = now()
        record = FindingRecord(
            id=signature.id,
            phase=str(signature.phase),
            message=signature.message,
            oracle=str(original.evaluation.oracle),
            builder=best.case.builder,
            engine=best.case.engine,
            count=1,
            first_seen=timestamp,
            last_seen=timestamp,
            shrunk=bool(shrunk and shrunk.shrunk),
            shrink_complete=bool(shrunk and shrunk.complete),
            shrink_builds=shrunk.builds if shrunk else 0,
            reproduced=shrunk.reproduced if shrunk else 0,
            attempts=shrunk.attempts if shrunk else 0,
            flaky=bool(shrunk and shrunk.flaky),
            seed=self.seed,
            profile=self.prepared.profile.name,
            explanation=[
                {"axis": r.axis, "value": r.value, "status": r.status,
                 "failing": r.failing, "passing": r.passing}
                for r in (shrunk.explanation if shrunk else [])
            ],
        )  # fmt: skip
        directory = self.store.write(
            record,
            {
                "case.json": best.case.to_json(),
                "original.json": original.case.to_json(),
                "build.log": best.result.log + best.result.load_log,
                "environment.json": json_text(environment),
                "repro.sh": render_repro(
                    best.case, signature, timeout=self.options.build_timeout
                ),
                "README.md": render_finding_readme(
                    record,
                    best.case,
                    profile=self.prepared.profile,
                    targets=self.prepared.targets,
                    environment=environment,
                    log=best.result.log + best.result.load_log,
                ),
            },
        )
        self.summary.new_findings.append(signature.id)
        log.info(
            "finding written",
            id=signature.id,
            signature=str(signature),
            path=str(directory),
            shrink_builds=record.shrink_builds,
        )

    def _refresh_readme(self, record: FindingRecord) -> None:
        """Rewrite a known finding's README.md with its new counts."""
        directory = self.store.finding_dir(record.id)
        try:
            case = load_case(directory / "case.json")
            environment = json.loads((directory / "environment.json").read_text())
            log_text = (directory / "build.log").read_text(errors="replace")
        except (OSError, ValueError, BuildfuzzError) as error:
            log.warning("cannot refresh finding README", id=record.id, error=str(error))
            return
        page = render_finding_readme(
            record,
            case,
            profile=self.prepared.profile,
            targets=self.prepared.targets,
            environment=environment,
            log=log_text,
        )
        write_atomic(directory / "README.md", page)
