"""Replay every known finding before fuzzing, as the CI mode does."""

import structlog

from buildfuzz.case import load_case
from buildfuzz.errors import BuildfuzzError
from buildfuzz.replay import ReplayReport, expected_signature
from buildfuzz.results import ResultsStore
from buildfuzz.session import EngineUnavailable, Session
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
        except BuildfuzzError as error:
            log.warning("cannot replay finding", id=record.id, error=str(error))
            continue
        report = ReplayReport(name=record.id, expected=expected, runs=runs)
        for _ in range(runs):
            try:
                outcome = session.execute(case)
            except EngineUnavailable as error:
                report.signatures.append(f"engine unavailable: {error.label}")
                continue
            evaluation = outcome.evaluation
            signature = evaluation.signature
            report.signatures.append(str(signature) if signature else "pass")
            if evaluation.verdict is Verdict.FINDING and signature == expected:
                report.reproduced += 1
        log.info("regression check", id=record.id, status=str(report.status))
        reports.append(report)
    return reports
