"""Replay every known finding before fuzzing, as the CI mode does."""

import structlog

from buildfuzz.case import Case, load_case
from buildfuzz.errors import BuildfuzzError
from buildfuzz.profile import load_profile
from buildfuzz.replay import ReplayReport, expected_signature, load_steps
from buildfuzz.results import ResultsStore
from buildfuzz.sequences import Step, replay_steps
from buildfuzz.session import EngineUnavailable, Session
from buildfuzz.signature import Signature
from buildfuzz.verdict import Verdict

log = structlog.get_logger(__name__)


def check_known_findings(
    store: ResultsStore, session: Session, *, runs: int = 1
) -> list[ReplayReport]:
    """Build each known finding's case again and report its status."""
    reports = []
    for record in store.findings():
        directory = store.finding_dir(record.id)
        try:
            case = load_case(directory)
            expected = expected_signature(directory)
            steps = load_steps(directory)
        except BuildfuzzError as error:
            log.warning("cannot replay finding", id=record.id, error=str(error))
            continue
        report = ReplayReport(name=record.id, expected=expected, runs=runs)
        for _ in range(runs):
            try:
                signature, finding = _replay_once(session, case, steps)
            except EngineUnavailable as error:
                report.signatures.append(f"engine unavailable: {error.label}")
                continue
            report.signatures.append(str(signature) if signature else "pass")
            if finding and signature == expected:
                report.reproduced += 1
        log.info("regression check", id=record.id, status=str(report.status))
        reports.append(report)
    return reports


def _replay_once(
    session: Session, case: Case, steps: list[Step] | None
) -> tuple[Signature | None, bool]:
    """Return one replay's signature, and whether the replay was a finding."""
    if steps is not None:
        mismatch = replay_steps(session, steps, load_profile("default"))
        return (None, False) if mismatch is None else (mismatch.signature, True)
    evaluation = session.execute(case).evaluation
    return evaluation.signature, evaluation.verdict is Verdict.FINDING
