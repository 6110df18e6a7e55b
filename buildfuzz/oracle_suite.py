"""The oracles that judge a build beyond its exit status, wired for a session.

For every case, ``OracleSuite.start`` gives a ``CaseChecks``: its
``inspect`` runs inside ``CaseRunner.run`` while the build's outputs still
exist (the tree and secret oracles read them there), and its ``finish``
runs after the build (engine health, and the differential oracle's second
build). The reports go to ``verdict.judge``.

Defaults: the tree, secret and engine-health oracles are on (a tree costs
a read of the output, ``docker image save`` for loaded images, and a prune
of BuildKit's copy of the context); the differential oracle is off,
because it builds each covered case twice.
"""

import lzma
import subprocess
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from python_on_whales import DockerClient, DockerException

from buildfuzz.build import BuildResult
from buildfuzz.case import Case, Output
from buildfuzz.definitions import Definitions
from buildfuzz.engine import SandboxEngine
from buildfuzz.errors import BuildfuzzError
from buildfuzz.oracle_diff import Pair, counterpart, differential_report, parse_pairs
from buildfuzz.oracle_health import EngineHealth, Snapshot
from buildfuzz.oracle_known import KnownDifference, load_known_differences
from buildfuzz.oracle_push import FETCH_ERRORS, push_report
from buildfuzz.oracle_result import model, read_result, tree_report
from buildfuzz.oracle_secret import (
    find_leaks,
    find_pushed_leaks,
    secret_report,
    secret_values,
)
from buildfuzz.oracle_tree import Tree
from buildfuzz.verdict import OracleReport

log = structlog.get_logger(__name__)

# Errors of reading a build's outputs (a truncated tar, a failed docker
# command): the oracle notes them and the build keeps its own verdict.
INSPECT_ERRORS = (
    OSError,
    EOFError,
    KeyError,
    TypeError,
    ValueError,
    tarfile.TarError,
    zlib.error,
    lzma.LZMAError,
    subprocess.SubprocessError,
    DockerException,
    BuildfuzzError,
)

# Builds ``case`` on its engine and builder with an inspector, without judging.
Rebuild = Callable[[Case, Callable[[BuildResult, Path], None]], BuildResult]


@dataclass(frozen=True)
class OracleSettings:
    # With tree or differential on, the runner removes BuildKit's copies of
    # each case's context after the build (CaseRunner.forget_contexts).
    tree: bool = True
    secret: bool = True
    health: bool = True
    differential: tuple[Pair, ...] = ()


@dataclass
class CaseChecks:
    """The oracles' state for one case, from before its build to its verdict."""

    suite: "OracleSuite"
    case: Case
    engine: object
    docker: DockerClient
    before: Snapshot | None = None
    reports: list[OracleReport] = field(default_factory=list)
    model: Tree | None = None
    tree: Tree | None = None

    def inspect(self, result: BuildResult, case_dir: Path) -> None:
        """Read the build's outputs before the runner removes them."""
        if not result.succeeded:
            return
        settings = self.suite.settings
        try:
            if self.case.output is Output.PUSH:
                self._check_push(result)
                return
            if settings.tree or settings.differential:
                self._check_tree(result, case_dir)
            if settings.secret:
                self._check_secrets(result, case_dir)
        except INSPECT_ERRORS as error:
            # An oracle that cannot look is no finding; the case says so.
            result.notes.append(f"oracle could not inspect the build: {error}")
            log.warning("oracle could not inspect the build", error=str(error)[:300])

    def _check_push(self, result: BuildResult) -> None:
        """Check the manifests of a pushed image, and scan it for secrets."""
        # NOTE: the files of a pushed image are not compared with the model.
        result.notes.append("tree oracle: a pushed image's files are not compared")
        if not result.pushed:
            return
        settings = self.suite.settings
        values = secret_values(self.case) if settings.secret else {}
        try:
            reports = [push_report(self.case, result.pushed)] if settings.tree else []
            if values:
                reports.append(secret_report(find_pushed_leaks(result.pushed, values)))
        except FETCH_ERRORS as error:
            result.notes.append(f"oracle could not read the pushed image: {error}")
            return
        self.reports += [report for report in reports if report is not None]

    def _check_tree(self, result: BuildResult, case_dir: Path) -> None:
        classic = self.suite.definitions.builders[self.case.builder].classic
        self.model = model(self.case, result.notes, classic=classic)
        if self.model is None:
            return
        self.tree = read_result(self.case, case_dir, self.docker)
        if self.tree is None:
            result.notes.append("tree oracle: the built tree could not be read")
            return
        if not self.suite.settings.tree:
            return
        report = tree_report(
            self.case, self.model, self.tree, self.suite.known, result.notes
        )
        if report is not None:
            self.reports.append(report)

    def _check_secrets(self, result: BuildResult, case_dir: Path) -> None:
        values = secret_values(self.case)
        if not values:
            return
        report = secret_report(find_leaks(self.case, case_dir, self.docker, values))
        if report is not None:
            self.reports.append(report)

    def finish(self, result: BuildResult) -> list[OracleReport]:
        """Check the engine and run the differential build; return every report."""
        engine = self.engine
        if self.before is not None and isinstance(engine, SandboxEngine):
            report = self.suite.health.check(engine, self.before)
            if report is not None:
                self.reports.append(report)
        if result.succeeded and self.model is not None and self.tree is not None:
            self._differential(result)
        return self.reports

    def _differential(self, result: BuildResult) -> None:
        suite = self.suite
        other = counterpart(self.case, suite.settings.differential, suite.definitions)
        if other is None or suite.rebuild is None or self.model is None:
            return
        classic = suite.definitions.builders[other.builder].classic
        other_model = model(other, [], classic=classic)
        if other_model is None or set(other_model.nodes) != set(self.model.nodes):
            # The builders read different ignore files, so the trees differ.
            result.notes.append("differential oracle: the sides' models differ")
            return
        trees: list[Tree] = []

        def read_other(other_result: BuildResult, case_dir: Path) -> None:
            if other_result.succeeded:
                tree = read_result(other, case_dir, suite.docker_for(other))
                if tree is not None:
                    trees.append(tree)

        try:
            other_result = suite.rebuild(other, read_other)
        except BuildfuzzError as error:
            result.notes.append(f"differential oracle: {other.builder}: {error}")
            return
        if not trees:
            result.notes.append(
                f"differential oracle: no tree from {other.engine}/{other.builder}"
                f" (exit status {other_result.exit_status})"
            )
            return
        assert self.model is not None and self.tree is not None
        report = differential_report(
            self.model,
            (self.case, self.tree),
            (other, trees[0]),
            suite.known,
            result.notes,
        )
        if report is not None:
            self.reports.append(report)


class OracleSuite:
    """The oracles of one session, with their state across cases."""

    def __init__(
        self,
        definitions: Definitions,
        settings: OracleSettings | None = None,
        *,
        known: tuple[KnownDifference, ...] | None = None,
    ) -> None:
        self.definitions = definitions
        self.settings = settings or OracleSettings()
        self.known = load_known_differences() if known is None else known
        self.health = EngineHealth()
        self.rebuild: Rebuild | None = None  # set by the session
        self.docker_for: Callable[[Case], DockerClient] = _no_docker

    @property
    def compares_content(self) -> bool:
        """Whether an oracle reads file contents, so cases must not share any."""
        return self.settings.tree or bool(self.settings.differential)

    def start(self, case: Case, engine: object, docker: DockerClient) -> CaseChecks:
        checks = CaseChecks(self, case, engine, docker)
        if self.settings.health and isinstance(engine, SandboxEngine):
            checks.before = self.health.snapshot(engine)
        return checks


def oracle_suite(
    definitions: Definitions,
    differential: tuple[str, ...] = (),
    *,
    tree: bool = True,
) -> OracleSuite:
    """Return the default oracles, with the differential pairs ``A:B`` given."""
    pairs = parse_pairs(list(differential), definitions)
    return OracleSuite(definitions, OracleSettings(tree=tree, differential=pairs))


def _no_docker(case: Case) -> DockerClient:
    raise BuildfuzzError("no docker client for the differential oracle")
