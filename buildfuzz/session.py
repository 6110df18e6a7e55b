"""A run's sandbox engines and the builds that run on them.

Engines start on first use and serve every case that needs them until the
session closes. A daemon that dies during a case is reported through the
case's evaluation and restarted before the next case.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog
from python_on_whales import DockerClient, DockerException

from buildfuzz.base_publisher import BasePullError
from buildfuzz.baseimage import import_busybox
from buildfuzz.build import BuildResult, CaseRunner, Inspector
from buildfuzz.buildx_builders import BuilderPool
from buildfuzz.buildx_versions import ensure_buildx_plugin
from buildfuzz.case import Case
from buildfuzz.client import ClientTools
from buildfuzz.definitions import BuilderDefinition, Definitions
from buildfuzz.dind import sandbox_engine
from buildfuzz.engine import EngineOptions, SandboxEngine
from buildfuzz.errors import EngineError, SetupError
from buildfuzz.external import ExternalEngine
from buildfuzz.install import CLIENT_TREE, busybox_binary, engine_tree
from buildfuzz.oracle_suite import OracleSuite
from buildfuzz.packages import tree_path
from buildfuzz.rules import Rule
from buildfuzz.sbom_scanner import needs_scanner
from buildfuzz.verdict import Evaluation, judge

log = structlog.get_logger(__name__)

MAX_ENGINES = 10  # daemons at once (each with its containerd: an estimated 100 MB)


@dataclass(frozen=True)
class CaseRecord:
    """One executed case with its build result and verdict."""

    case: Case
    result: BuildResult
    evaluation: Evaluation


class EngineUnavailable(Exception):
    """The engine a case needs could not be started in this run."""

    def __init__(self, label: str, reason: str) -> None:
        super().__init__(f"engine {label} is unavailable: {reason}")
        self.label = label
        self.reason = reason


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
        oracles: OracleSuite | None = None,
    ) -> None:
        self.definitions = definitions
        # Oracles beyond the exit status (see oracle_suite); the differential
        # one builds on this session's engines through _rebuild.
        self.oracles = oracles or OracleSuite(definitions)
        self.oracles.rebuild = self._rebuild
        self.oracles.docker_for = lambda case: self.tools.docker(self.engine(case).host)
        self.tools = tools
        self.run_dir = run_dir
        self.rules = rules
        self.build_timeout = build_timeout
        self.strict = strict
        self.on_case = on_case
        self.engines: dict[str, SandboxEngine | ExternalEngine] = {}
        # Engine labels that failed to start, with the error; never retried.
        self.unusable: dict[str, str] = {}
        self.pool = BuilderPool(run_dir)
        self._buildx_tools: dict[str, ClientTools] = {}
        self._runners: dict[str, CaseRunner] = {}
        # Why the SBOM scanner image could not be made, once it failed.
        self._scanner_error: str | None = None

    def engine(self, case: Case) -> SandboxEngine | ExternalEngine:
        """Return the engine that ``case`` needs, starting it on first use.

        Each set of daemon options gets its own daemon. At most
        ``MAX_ENGINES`` run at once; the least recently used one stops first.
        """
        label = case.engine_label
        if label in self.unusable:
            raise EngineUnavailable(label, self.unusable[label])
        engine = self.engines.pop(label, None)
        if engine is None:
            while len(self.engines) >= MAX_ENGINES:
                oldest = next(iter(self.engines))
                self.pool.forget_engine(oldest)
                self._close_runner(oldest)
                self.engines.pop(oldest).stop()
            definition = self.definitions.engines[case.engine]
            if definition.sandboxed:
                engine = sandbox_engine(
                    definition,
                    engine_tree(self.definitions, case.engine),
                    self.run_dir,
                    EngineOptions.of(case),
                )
            else:
                engine = ExternalEngine(definition, self.run_dir)
            self._start(engine)
        self.engines[label] = engine  # re-inserted: most recently used last
        return engine

    def _start(self, engine: SandboxEngine | ExternalEngine) -> None:
        docker = self.tools.docker(engine.host)
        try:
            engine.start()
            import_busybox(docker, Path(busybox_binary()), engine.directory)
        except (EngineError, DockerException) as error:
            engine.stop()
            self.unusable[engine.label] = str(error)
            log.warning(
                "engine cannot run cases; skipping its cases",
                engine=engine.label,
                error=str(error).splitlines()[-1][:300],
            )
            raise EngineUnavailable(engine.label, str(error)) from None
        label = engine.label
        host = engine.host

        def builder_name(builder: BuilderDefinition) -> str | None:
            return self.pool.builder(
                label, self.tools_for(builder).docker(host), builder
            )

        self._runners[engine.label] = CaseRunner(
            docker,
            self.definitions.builders,
            engine.directory / "cases",
            timeout=self.build_timeout,
            builder_name=builder_name,
            docker_for=lambda builder: self.tools_for(builder).docker(host),
            forget_contexts=self.oracles.compares_content,
            push_registry=lambda: self.pool.registry_host(docker),
        )

    def tools_for(self, builder: BuilderDefinition) -> ClientTools:
        """Return the client of the builder's buildx version."""
        if not builder.buildx:
            return self.tools
        if builder.buildx not in self._buildx_tools:
            plugin = ensure_buildx_plugin(builder.buildx)
            self._buildx_tools[builder.buildx] = ClientTools.prepare(
                tree_path(CLIENT_TREE), self.run_dir, plugin
            )
        return self._buildx_tools[builder.buildx]

    def execute(self, case: Case) -> CaseRecord:
        """Build ``case`` and judge it; restart its engine if the build killed it."""
        engine = self.engine(case)
        target = f"{engine.label}/{case.builder}"
        if target in self.unusable:
            raise EngineUnavailable(target, self.unusable[target])
        checks = self.oracles.start(case, engine, self.tools.docker(engine.host))
        try:
            result = self._run(engine, case, checks.inspect)
        except EngineError as error:
            # The builder itself could not be set up on this engine.
            self.unusable[target] = str(error)
            log.warning(
                "builder cannot run cases; skipping its cases",
                target=target,
                error=str(error)[:300],
            )
            raise EngineUnavailable(target, str(error)) from None

        reports = checks.finish(result)
        tail = ""
        if not result.succeeded and not engine.is_healthy():
            result.engine_alive = False
            tail = engine.log_tail(20)
            if isinstance(engine, ExternalEngine):
                self.unusable[engine.label] = "the existing daemon stopped answering"
                raise EngineUnavailable(engine.label, self.unusable[engine.label])
            log.warning("engine died during a case; restarting it", engine=engine.label)
            # Its builders and pulled bases went with it.
            self.pool.forget_engine(engine.label)
            engine.stop()
            self._start(engine)
        elif result.timed_out:
            self._reset(engine)

        builder = self.definitions.builders[case.builder]
        evaluation = judge(
            case,
            result,
            classic=builder.classic,
            rules=self.rules,
            strict=self.strict,
            daemon_log_tail=tail,
            reports=reports,
        )
        record = CaseRecord(case, result, evaluation)
        if self.on_case is not None:
            self.on_case(record)
        return record

    def _reset(self, engine: SandboxEngine | ExternalEngine) -> None:
        """Reset the builders after a build that hung, before the next case.

        A hung build may go on inside the daemon or BuildKit after its
        client is killed, so a sandbox engine is restarted and every buildx
        builder on the engine is made again on next use. An existing daemon
        keeps running; only its builders are made again.
        """
        log.warning("build timed out; resetting its engine", engine=engine.label)
        self.pool.forget_engine(engine.label)
        if isinstance(engine, ExternalEngine):
            return
        self._close_runner(engine.label)
        engine.stop()
        self._start(engine)

    def _rebuild(self, case: Case, inspect: Inspector) -> BuildResult:
        """Build ``case`` without judging it: an oracle's second build."""
        try:
            engine = self.engine(case)
        except EngineUnavailable as error:
            raise EngineError(str(error)) from None
        return self._run(engine, case, inspect)

    def _run(
        self,
        engine: SandboxEngine | ExternalEngine,
        case: Case,
        inspect: Inspector | None,
    ) -> BuildResult:
        """Provide the case's registry bases, then build it on ``engine``."""
        builder = self.definitions.builders[case.builder]
        docker = self.tools_for(builder).docker(engine.host)
        try:
            self.pool.provide_bases(engine.label, docker, case, builder)
        except BasePullError as error:
            # The engine could not pull a base: an outcome of the case, which
            # is judged like a build that failed with that output.
            return BuildResult(exit_status=1, log=error.output, duration=0.0)
        if needs_scanner(case.attest):
            self._provide_scanner(engine.label, docker, case, builder)
        return self._runners[engine.label].run(case, inspect)

    def _provide_scanner(
        self, label: str, docker: DockerClient, case: Case, builder: BuilderDefinition
    ) -> None:
        """Make the SBOM scanner image reachable, or skip the case without it.

        The docker driver runs a generator only on the containerd image store;
        on the others it rejects attestations before it looks for one.
        """
        if builder.driver == "docker" and not case.containerd_store:
            return
        if self._scanner_error is None:
            try:
                self.pool.provide_scanner(label, docker, builder)
                return
            except SetupError as error:
                self._scanner_error = str(error)
                log.warning(
                    "sbom scanner unavailable; skipping cases with SBOMs",
                    error=self._scanner_error[:300],
                )
        raise EngineUnavailable("sbom-scanner", self._scanner_error)

    def _close_runner(self, label: str) -> None:
        runner = self._runners.pop(label, None)
        if runner is not None:
            runner.close()

    def close(self) -> None:
        for label in list(self.engines):
            self.pool.forget_engine(label)
            self._close_runner(label)
        self.pool.close()
        for engine in self.engines.values():
            if isinstance(engine, ExternalEngine):
                engine.stop(self.tools.docker(engine.host))
            else:
                engine.stop()
        self.engines.clear()
        self._runners.clear()
