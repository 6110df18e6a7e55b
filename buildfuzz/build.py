"""Run one case on one engine and builder, capturing everything about it."""

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from python_on_whales import DockerClient, DockerException
from python_on_whales.utils import stream_stdout_and_stderr

from buildfuzz import secrets
from buildfuzz.case import Case, Output
from buildfuzz.context import materialize
from buildfuzz.definitions import BuilderDefinition
from buildfuzz.workdir import kill_processes_under

log = structlog.get_logger(__name__)

IMAGE_NAME = "buildfuzz-case"
# A build's timeout grows with its context: each builder reads every byte
# (a sparse file's holes too) and handles every file, several times over on
# the vfs storage driver. These allowances are generous on purpose: a hang
# is judged by the time it took, and a slow machine must not look like one.
SECONDS_PER_GIB = 120.0
SECONDS_PER_THOUSAND_FILES = 2.0
# Copies of the context's bytes that a build may write (see disk_needed).
# NOTE: an estimate; the vfs storage driver copies every layer once more.
DISK_COPIES = 4


@dataclass
class BuildResult:
    """What one build did: its exit status, complete log and duration."""

    exit_status: int
    log: str
    duration: float
    timed_out: bool = False
    load_log: str = ""
    engine_alive: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.exit_status == 0 and not self.timed_out


# Called after a build with its result and case directory (rootfs.tar,
# rootfs/, context/), while the image is still in the engine.
Inspector = Callable[["BuildResult", Path], None]


class CaseRunner:
    """Materialize cases and build them on one sandbox engine."""

    def __init__(
        self,
        docker: DockerClient,
        builders: dict[str, BuilderDefinition],
        work_dir: Path,
        *,
        timeout: float,
        builder_name: Callable[[BuilderDefinition], str | None] = lambda _: None,
        docker_for: Callable[[BuilderDefinition], DockerClient] | None = None,
        forget_contexts: bool = False,
    ) -> None:
        self.docker = docker
        self.builders = builders
        self.work_dir = work_dir
        self.timeout = timeout
        self.builder_name = builder_name  # the buildx builder; None: the default
        # The client whose buildx plugin a builder uses (its buildx version).
        self.docker_for = docker_for or (lambda _: docker)
        # BuildKit takes a context file from an earlier build on the same
        # builder when its path, size, mtime and mode match, whatever its
        # content. Pruning its copies after each case keeps cases independent
        # where content matters (the tree oracle).
        self.forget_contexts = forget_contexts
        self._counter = 0

    def run(self, case: Case, inspect: Inspector | None = None) -> BuildResult:
        """Build ``case``; ``inspect`` reads the outputs before they are removed."""
        self._counter += 1
        case_dir = self.work_dir / f"case-{self._counter}"
        context = materialize(case, case_dir / "context")
        builder = self.builders[case.builder]
        try:
            result = self._build(case, builder, case_dir, context)
            if inspect is not None:
                inspect(result, case_dir)
            return result
        finally:
            self._remove_image(case.tags)
            if self.forget_contexts and not builder.classic:
                self._forget_contexts(builder)
            shutil.rmtree(case_dir, ignore_errors=True)

    def _build(
        self, case: Case, builder: BuilderDefinition, case_dir: Path, context: Path
    ) -> BuildResult:
        lines: list[str] = []
        timeout = scaled_timeout(case, self.timeout)
        watchdog = _Watchdog(case_dir, timeout)
        started = time.monotonic()
        exit_status = 0
        watchdog.start()
        try:
            for line in self._stream(case, builder, case_dir, context):
                lines.append(line)
        except DockerException as error:
            exit_status = error.return_code or 1
        except UnicodeDecodeError:
            # python-on-whales decodes a failed build's stderr as strict UTF-8
            # to pick its exception class; file names that are not UTF-8 make
            # that fail. The build failed all the same, and its log is in lines.
            exit_status = 1
        finally:
            watchdog.cancel()
        duration = time.monotonic() - started

        result = BuildResult(
            exit_status=exit_status,
            log="".join(lines),
            duration=duration,
            timed_out=watchdog.fired,
        )
        if watchdog.fired:
            result.notes.append(f"the build timed out after {timeout:.0f} s")
        if result.succeeded and case.output is Output.DOCKER_TAR:
            self._load(case_dir / "image.tar", result)

        return result

    def _stream(
        self, case: Case, builder: BuilderDefinition, case_dir: Path, context: Path
    ) -> Iterator[str]:
        # Secret values reach the client through its environment: a bare
        # `--build-arg NAME` reads $NAME, so no value shows in `ps`.
        arguments, environment = build_arguments(case)
        if builder.classic:
            command = [*self.docker.docker_cmd, "build", "--tag", tag_for(case)]
            command += arguments
            environment["DOCKER_BUILDKIT"] = "0"
        else:
            command = [*self.docker_for(builder).docker_cmd, "buildx", "build"]
            command += buildx_arguments(case, self.builder_name(builder), case_dir)
            command += arguments
        command += [*case.option_arguments(str(context)), str(context)]
        for _, raw in stream_stdout_and_stderr(command, env=environment):
            yield raw.decode("utf-8", errors="replace")

    def _load(self, tar_path: Path, result: BuildResult) -> None:
        try:
            loaded = self.docker.image.load(tar_path, quiet=True)
            result.load_log = "\n".join(str(name) for name in loaded or [])
        except DockerException as error:
            result.exit_status = error.return_code or 1
            result.load_log = _text(error.stderr) or str(error)

    def _forget_contexts(self, builder: BuilderDefinition) -> None:
        command = [*self.docker_for(builder).docker_cmd, "buildx", "prune", "--force"]
        name = self.builder_name(builder)
        if name is not None:
            command += ["--builder", name]
        command += ["--filter", "type=source.local"]
        completed = subprocess.run(command, capture_output=True, check=False)
        if completed.returncode != 0:
            log.warning(
                "could not remove the builder's copies of earlier contexts",
                builder=builder.name,
                error=_text(completed.stderr).strip()[-300:],
            )

    def _remove_image(self, extra_tags: tuple[str, ...] = ()) -> None:
        try:
            self.docker.image.remove(
                [f"{IMAGE_NAME}:latest", f"{IMAGE_NAME}:loaded", *extra_tags],
                force=True,
                prune=True,
            )
        except DockerException:
            pass  # nothing was tagged: the build failed or did not load


def context_size(case: Case) -> tuple[int, int]:
    """Return the bytes (a sparse file's holes too) and files of the context."""
    size = sum(entry.size for entry in case.files)
    count = len(case.files)
    if case.bulk is not None:
        size += case.bulk.count * max(case.bulk.sizes)
        count += case.bulk.count
    return size, count


def scaled_timeout(case: Case, base: float) -> float:
    """Return the time a build of ``case`` may take: ``base`` for a small one."""
    size, count = context_size(case)
    return (
        base
        + size / 2**30 * SECONDS_PER_GIB
        + count / 1000 * SECONDS_PER_THOUSAND_FILES
    )


def disk_needed(case: Case) -> int:
    """Return an estimate of the disk space a build of ``case`` may fill.

    Builders write the context's bytes several times (their copy of the
    context, the layer, the exported image) and do not keep holes sparse.
    """
    return context_size(case)[0] * DISK_COPIES


def tag_for(case: Case) -> str:
    return f"{IMAGE_NAME}:latest"


def build_arguments(case: Case) -> tuple[list[str], dict[str, str]]:
    """Return the flags both builders share, and the environment they read.

    A secret build argument (``env:NAME``) is passed as a bare
    ``--build-arg ARG`` with its value in the environment under ``ARG``.
    """
    arguments = []
    if case.platform:
        arguments += ["--platform", case.platform]
    environment: dict[str, str] = {}
    for name, value in case.build_args:
        if secrets.is_reference(value):
            environment[name] = secrets.resolve(value)
            arguments += ["--build-arg", name]
        else:
            arguments += ["--build-arg", f"{name}={value}"]
    return arguments, environment


def buildx_arguments(case: Case, builder: str | None, case_dir: Path) -> list[str]:
    """Return the ``docker buildx build`` flags that the classic builder lacks."""
    arguments = ["--progress", "plain"]
    if builder is not None:
        arguments += ["--builder", builder]
    if case.output is Output.LOAD:
        arguments += ["--load", "--tag", tag_for(case)]
    output = buildx_output(case, case_dir)
    if output:
        arguments += ["--output", ",".join(f"{k}={v}" for k, v in output.items())]
    # The sandbox daemons have no bridge network, so BuildKit RUN steps fail
    # with "network bridge not found" without --network none.
    arguments += ["--network", "none"]
    return arguments


def buildx_output(case: Case, case_dir: Path) -> dict[str, str]:
    if case.output is Output.TAR:
        return {"type": "tar", "dest": str(case_dir / "rootfs.tar")}
    if case.output is Output.LOCAL:
        return {"type": "local", "dest": str(case_dir / "rootfs")}
    if case.output is Output.OCI:
        return {"type": "oci", "dest": str(case_dir / "image-oci.tar")}
    if case.output is Output.DOCKER_TAR:
        return {
            "type": "docker",
            "dest": str(case_dir / "image.tar"),
            "name": f"{IMAGE_NAME}:loaded",
        }
    return {}


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value or "")


class _Watchdog:
    """Kill the build's client processes when the build runs out of time."""

    def __init__(self, case_dir: Path, timeout: float) -> None:
        self.fired = False
        self._case_dir = case_dir
        self._timer = threading.Timer(timeout, self._fire)
        self._timer.daemon = True

    def start(self) -> None:
        self._timer.start()

    def cancel(self) -> None:
        self._timer.cancel()

    def _fire(self) -> None:
        self.fired = True
        log.warning("build timed out; killing its client", case_dir=str(self._case_dir))
        kill_processes_under(self._case_dir)
