"""Turn the fuzzer's finding events into results directories."""

import json
from dataclasses import dataclass, field
from typing import Any

import structlog

from buildfuzz.case import Case, load_case
from buildfuzz.client import ClientTools
from buildfuzz.engine import SandboxEngine
from buildfuzz.environment import describe
from buildfuzz.errors import BuildfuzzError
from buildfuzz.external import ExternalEngine
from buildfuzz.finding_page import render_finding_readme, render_sequence_readme
from buildfuzz.fuzzer import FindingEvent
from buildfuzz.profile import Profile
from buildfuzz.repro import render_repro
from buildfuzz.results import (
    FindingRecord,
    ResultsStore,
    json_text,
    now,
    write_atomic,
)
from buildfuzz.sequence_repro import render_sequence_repro
from buildfuzz.sequences import SequenceFinding, steps_from_json, steps_json
from buildfuzz.session import Session
from buildfuzz.strategies import Target

log = structlog.get_logger(__name__)


@dataclass
class WrittenFindings:
    """Ids of the findings a run wrote or saw again."""

    new: list[str] = field(default_factory=list)
    known: list[str] = field(default_factory=list)


def case_target(case: Case) -> str:
    """Return the engine and builder a case ran on, such as ``26.1+vfs/classic``."""
    return f"{case.engine_label}/{case.builder}"


class FindingWriter:
    """Turn the fuzzer's finding events into results directories."""

    def __init__(
        self,
        store: ResultsStore,
        session: Session,
        tools: ClientTools,
        *,
        profile: Profile,
        targets: tuple[Target, ...],
        seed: int,
        build_timeout: float,
    ) -> None:
        self.store = store
        self.session = session
        self.tools = tools
        self.profile = profile
        self.targets = targets
        self.seed = seed
        self.build_timeout = build_timeout
        self.written = WrittenFindings()

    def write(self, event: FindingEvent) -> None:
        signature = event.signature
        if not event.new:
            self._seen_again(signature.id, event.original.case)
            return

        original = event.original
        shrunk = event.shrunk
        best = shrunk.record if shrunk else original
        engine = self.session.engine(best.case)
        environment = self._environment(engine)
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
            shrink_interrupted=bool(shrunk and shrunk.interrupted),
            seed=self.seed,
            profile=self.profile.name,
            explanation=[
                {"axis": r.axis, "value": r.value, "status": r.status,
                 "failing": r.failing, "passing": r.passing}
                for r in (shrunk.explanation if shrunk else [])
            ],
            seen_on=sorted({case_target(original.case), case_target(best.case)}),
        )  # fmt: skip
        # An oracle's finding (a tree diff, a leak) explains itself in diff.txt.
        detail = best.evaluation.detail or original.evaluation.detail
        extra = {"diff.txt": detail} if detail else {}
        directory = self.store.write(
            record,
            {
                **extra,
                "case.json": best.case.to_json(),
                "original.json": original.case.to_json(),
                "build.log": best.result.log + best.result.load_log,
                "daemon.log": daemon_log(engine),
                "environment.json": json_text(environment),
                "repro.sh": render_repro(
                    best.case, signature, timeout=self.build_timeout
                ),
                "README.md": render_finding_readme(
                    record,
                    best.case,
                    profile=self.profile,
                    targets=self.targets,
                    environment=environment,
                    log=best.result.log + best.result.load_log,
                    results_name=self.store.root.name,
                ),
            },
        )
        self.written.new.append(signature.id)
        log.info(
            "finding written",
            id=signature.id,
            signature=str(signature),
            path=str(directory),
            shrink_builds=record.shrink_builds,
        )

    def _seen_again(self, finding_id: str, case: Case) -> None:
        known = self.store.seen_again(finding_id)
        if known is not None:
            target = case_target(case)
            if target not in known.seen_on:
                known.seen_on = sorted({*known.seen_on, target})
                self.store.save(known)
            self._refresh_readme(known)
        if finding_id not in self.written.known + self.written.new:
            self.written.known.append(finding_id)

    def _environment(self, engine: SandboxEngine | ExternalEngine) -> dict[str, Any]:
        """Return the versions and settings that environment.json records."""
        return describe(
            self.tools.docker(engine.host),
            engine.info,
            seed=self.seed,
            profile=self.profile.name,
            embedded_buildkit=engine.definition.buildkit,
        )

    def write_sequence(self, finding: SequenceFinding) -> None:
        """Write a sequence finding: its steps, the last case and both builds."""
        signature = finding.signature
        last = finding.steps[-1].case
        if not finding.new:
            self._seen_again(signature.id, last)
            return

        engine = self.session.engine(last)
        environment = self._environment(engine)
        timestamp = now()
        record = FindingRecord(
            id=signature.id,
            phase=str(signature.phase),
            message=signature.message,
            oracle=SEQUENCE_ORACLE,
            builder=last.builder,
            engine=last.engine,
            count=1,
            first_seen=timestamp,
            last_seen=timestamp,
            shrunk=finding.shrunk,
            shrink_complete=finding.complete,
            shrink_builds=finding.shrink_builds,
            reproduced=finding.reproduced,
            attempts=finding.attempts,
            flaky=finding.flaky,
            shrink_interrupted=finding.interrupted,
            seed=self.seed,
            profile=self.profile.name,
            seen_on=[case_target(last)],
        )
        build_log = (
            "== build with the cache ==\n"
            + finding.cached.result.log
            + "\n== build from scratch (--no-cache) ==\n"
            + finding.scratch.result.log
        )
        directory = self.store.write(
            record,
            {
                "diff.txt": finding.mismatch.detail,
                "steps.json": steps_json(finding.steps),
                "original-steps.json": steps_json(finding.original_steps),
                "case.json": last.to_json(),
                "build.log": build_log,
                "daemon.log": daemon_log(engine),
                "environment.json": json_text(environment),
                "repro.sh": render_sequence_repro(
                    finding.steps, finding.mismatch, timeout=self.build_timeout
                ),
                "README.md": render_sequence_readme(
                    record,
                    [step.description for step in finding.steps],
                    last,
                    environment=environment,
                    detail=finding.mismatch.detail,
                    log=build_log,
                    results_name=self.store.root.name,
                ),
            },
        )
        self.written.new.append(signature.id)
        log.info(
            "sequence finding written",
            id=signature.id,
            signature=str(signature),
            path=str(directory),
            steps=len(finding.steps),
        )

    def _refresh_readme(self, record: FindingRecord) -> None:
        """Rewrite a known finding's README.md with its new counts."""
        if record.oracle == SEQUENCE_ORACLE:
            self._refresh_sequence_readme(record)
            return
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
            profile=self.profile,
            targets=self.targets,
            environment=environment,
            log=log_text,
            results_name=self.store.root.name,
        )
        write_atomic(directory / "README.md", page)

    def _refresh_sequence_readme(self, record: FindingRecord) -> None:
        directory = self.store.finding_dir(record.id)
        try:
            steps = steps_from_json((directory / "steps.json").read_text())
            environment = json.loads((directory / "environment.json").read_text())
            detail = (directory / "diff.txt").read_text(errors="replace")
            log_text = (directory / "build.log").read_text(errors="replace")
        except (OSError, ValueError, BuildfuzzError) as error:
            log.warning("cannot refresh finding README", id=record.id, error=str(error))
            return
        page = render_sequence_readme(
            record,
            [step.description for step in steps],
            steps[-1].case,
            environment=environment,
            detail=detail,
            log=log_text,
            results_name=self.store.root.name,
        )
        write_atomic(directory / "README.md", page)


SEQUENCE_ORACLE = "sequence"  # finding.json's oracle of a sequence finding
DAEMON_LOG_BYTES = 256 * 1024  # the end of the daemon's log kept with a finding


def daemon_log(engine: object) -> str:
    """Return the end of the engine's daemon log, or why there is none."""
    path = getattr(engine, "log_path", None)
    try:
        with open(path, "rb") as stream:  # type: ignore[arg-type]
            stream.seek(0, 2)
            size = stream.tell()
            stream.seek(max(0, size - DAEMON_LOG_BYTES))
            return stream.read().decode("utf-8", errors="replace")
    except (OSError, TypeError):
        return "(no daemon log: the engine was not started by buildfuzz)\n"
