"""A run's sandbox engines and the builds that run on them.

Engines start on first use and serve every case that needs them until the
session closes. A daemon that dies during a case is reported through the
case's evaluation and restarted before the next case.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from buildfuzz.baseimage import import_busybox
from buildfuzz.build import BuildResult, CaseRunner
from buildfuzz.case import Case
from buildfuzz.client import ClientTools
from buildfuzz.definitions import Definitions
from buildfuzz.engine import EngineInfo, SandboxEngine
from buildfuzz.install import busybox_binary, engine_tree_name
from buildfuzz.packages import tree_path
from buildfuzz.rules import Rule
from buildfuzz.verdict import Evaluation, judge

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CaseRecord:
    """One executed case with its build result and verdict."""

    case: Case
    result: BuildResult
    evaluation: Evaluation


class Session:
    """Start engines on demand and run cases on them."""

    def __init__(
        self,
        definitions: Definitions,
        tools: ClientTools,
        run_dir: Path,
        *,
        rules: tuple[Rule, ...],
        build_timeout: float,
        strict: bool = False,
        on_case: Callable[[CaseRecord], None] | None = None,
    ) -> None:
        self.definitions = definitions
        self.tools = tools
        self.run_dir = run_dir
        self.rules = rules
        self.build_timeout = build_timeout
        self.strict = strict
        self.on_case = on_case
        self.engines: dict[str, SandboxEngine] = {}
        self._runners: dict[str, CaseRunner] = {}

    def engine(self, name: str) -> SandboxEngine:
        """Return the running engine ``name``, starting it on first use."""
        engine = self.engines.get(name)
        if engine is None:
            engine = SandboxEngine(
                self.definitions.engines[name],
                tree_path(engine_tree_name(name)),
                self.run_dir,
            )
            self.engines[name] = engine
            self._start(engine)
        return engine

    def engine_info(self, name: str) -> EngineInfo | None:
        return self.engine(name).info

    def _start(self, engine: SandboxEngine) -> None:
        engine.start()
        docker = self.tools.docker(engine.host)
        import_busybox(docker, Path(busybox_binary()), engine.directory)
        self._runners[engine.name] = CaseRunner(
            docker,
            self.definitions.builders,
            engine.directory / "cases",
            timeout=self.build_timeout,
        )

    def execute(self, case: Case) -> CaseRecord:
        """Build ``case`` and judge it; restart its engine if the build killed it."""
        engine = self.engine(case.engine)
        result = self._runners[engine.name].run(case)

        tail = ""
        if not result.succeeded and not engine.is_healthy():
            result.engine_alive = False
            tail = engine.log_tail(20)
            log.warning("engine died during a case; restarting it", engine=engine.name)
            engine.stop()
            self._start(engine)

        builder = self.definitions.builders[case.builder]
        evaluation = judge(
            case,
            result,
            classic=builder.classic,
            rules=self.rules,
            strict=self.strict,
            daemon_log_tail=tail,
        )
        record = CaseRecord(case, result, evaluation)
        if self.on_case is not None:
            self.on_case(record)
        return record

    def close(self) -> None:
        for engine in self.engines.values():
            engine.stop()
        self.engines.clear()
        self._runners.clear()
