"""``buildfuzz replay``: run a recorded case again on a fresh sandbox engine."""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from buildfuzz.case import Case, load_case
from buildfuzz.client import ClientTools
from buildfuzz.definitions import load_definitions
from buildfuzz.errors import DataFileError, SetupError, UsageError
from buildfuzz.install import CLIENT_TREE, ensure_installed
from buildfuzz.packages import tree_path
from buildfuzz.rules import load_rules
from buildfuzz.session import Session
from buildfuzz.signature import Phase, Signature
from buildfuzz.workdir import DEFAULT_BASE, create_run_dir, remove_tree

log = structlog.get_logger(__name__)


@dataclass
class ReplayReport:
    expected: Signature | None
    runs: int
    reproduced: int = 0
    signatures: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.reproduced else 1


def expected_signature(path: Path) -> Signature | None:
    """Read the signature of the finding that ``path`` belongs to, if any."""
    directory = path if path.is_dir() else path.parent
    finding = directory / "finding.json"
    if not finding.exists():
        return None
    try:
        data = json.loads(finding.read_text())
        return Signature(Phase(data["phase"]), str(data["message"]))
    except (OSError, ValueError, KeyError) as error:
        raise DataFileError(finding, f"invalid finding record: {error}") from None


def replay(
    path: Path, *, runs: int, build_timeout: float, workdir: Path = DEFAULT_BASE
) -> ReplayReport:
    if runs < 1:
        raise UsageError(f"--runs must be at least 1, not {runs}")
    if os.geteuid() != 0:
        raise SetupError(
            "buildfuzz replay needs root to start a sandbox Docker daemon; "
            "run it as root or with sudo"
        )
    case = load_case(path)
    expected = expected_signature(path)
    definitions = load_definitions()
    _check_known(case, definitions.engines, definitions.builders)
    ensure_installed(definitions, [case.engine])

    report = ReplayReport(expected=expected, runs=runs)
    run_dir = create_run_dir(workdir)
    session = None
    try:
        tools = ClientTools.prepare(tree_path(CLIENT_TREE), run_dir)
        session = Session(
            definitions,
            tools,
            run_dir,
            rules=load_rules("none"),
            build_timeout=build_timeout,
        )
        for attempt in range(1, runs + 1):
            record = session.execute(case)
            signature = record.evaluation.signature
            report.signatures.append(str(signature) if signature else "pass")
            matched = signature is not None and (
                expected is None or signature == expected
            )
            report.reproduced += matched
            log.info(
                "replay",
                attempt=attempt,
                reproduced=matched,
                signature=str(signature) if signature else "pass",
                seconds=round(record.result.duration, 2),
            )
    finally:
        if session is not None:
            session.close()
        remove_tree(run_dir)
    return report


def _check_known(case: Case, engines: dict, builders: dict) -> None:
    if case.engine not in engines:
        raise UsageError(
            f"case names engine {case.engine!r}, which builders/engines.toml does not "
            f"define; defined engines: {', '.join(sorted(engines))}"
        )
    if case.builder not in builders:
        raise UsageError(
            f"case names builder {case.builder!r}, which builders/builders.toml does "
            f"not define; defined builders: {', '.join(sorted(builders))}"
        )
