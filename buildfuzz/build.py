"""Run one case on one engine and builder, capturing everything about it."""

import functools
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import structlog
from docker import APIClient
from docker import errors as docker_errors
from python_on_whales import DockerClient, DockerException
from python_on_whales.utils import stream_stdout_and_stderr

from buildfuzz import secrets
from buildfuzz.case import Case, Output
from buildfuzz.churn import ContextChurn
from buildfuzz.client_user import UserClient
from buildfuzz.context import materialize
from buildfuzz.definitions import BuilderDefinition
from buildfuzz.errors import EngineError
from buildfuzz.workdir import kill_processes_under

log = structlog.get_logger(__name__)

IMAGE_NAME = "buildfuzz-case"
LOADED_IMAGE = f"{IMAGE_NAME}:loaded"  # the name of a loaded Output.DOCKER_TAR image
PUSH_REPOSITORY = "buildfuzz-case/pushed"  # on the registry of Output.PUSH cases
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
    pushed: str = ""  # the reference an Output.PUSH build pushed to

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
        push_registry: Callable[[], str] | None = None,
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
        # The thread of a prune that _forget_contexts started.
        self._forgetting: threading.Thread | None = None
        # Returns the host (localhost:PORT) of the registry that Output.PUSH
        # cases push to, starting it on first use.
        self.push_registry = push_registry
        self._user_client = UserClient(work_dir)
        self._counter = 0
        self._api: APIClient | None = None  # see _engine_api

    def run(self, case: Case, inspect: Inspector | None = None) -> BuildResult:
        """Build ``case``; ``inspect`` reads the outputs before they are removed."""
        self._counter += 1
        case_dir = self.work_dir / f"case-{self._counter}"
        context = materialize(case, case_dir / "context")
        builder = self.builders[case.builder]
        pushed = ""
        try:
            pushed = self._push_reference(case)
            self._wait_for_forgetting()
            with ContextChurn(case, context) as churn:
                result = self._build(case, builder, case_dir, context, pushed)
            if churn.error is not None:
                result.notes.append(f"the context did not change: {churn.error}")
            if inspect is not None:
                inspect(result, case_dir)
            return result
        finally:
            self._remove_image(image_names(case, builder, pushed))
            if self.forget_contexts and not builder.classic:
                self._forget_contexts(builder)
            shutil.rmtree(case_dir, ignore_errors=True)

    def _build(
        self,
        case: Case,
        builder: BuilderDefinition,
        case_dir: Path,
        context: Path,
        pushed: str,
    ) -> BuildResult:
        lines: list[str] = []
        timeout = scaled_timeout(case, self.timeout)
        watchdog = _Watchdog(case_dir, timeout)
        started = time.monotonic()
        exit_status = 0
        watchdog.start()
        try:
            for line in self._stream(case, builder, case_dir, context, pushed):
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
            pushed=pushed,
        )
        if watchdog.fired:
            result.notes.append(f"the build timed out after {timeout:.0f} s")
        if result.succeeded and case.output is Output.DOCKER_TAR:
            self._load(case_dir / "image.tar", result)

        return result

    def _push_reference(self, case: Case) -> str:
        """Return a reference on the push registry that no earlier build used."""
        if case.output is not Output.PUSH:
            return ""
        if self.push_registry is None:
            raise EngineError(
                f"case {case.id} pushes its image, but this runner has no registry; "
                "give CaseRunner a push_registry"
            )
        return f"{self.push_registry()}/{PUSH_REPOSITORY}:{case.id}-{self._counter}"

    def _stream(
        self,
        case: Case,
        builder: BuilderDefinition,
        case_dir: Path,
        context: Path,
        pushed: str = "",
    ) -> Iterator[str]:
        # Secret values reach the client through its environment: a bare
        # `--build-arg NAME` reads $NAME, so no value shows in `ps`.
        arguments, environment = build_arguments(case)
        environment |= provide_secrets(case, context)
        if builder.classic:
            command = [*self.docker.docker_cmd, "build", "--tag", tag_for(case)]
            command += arguments
            environment["DOCKER_BUILDKIT"] = "0"
        else:
            command = [*self.docker_for(builder).docker_cmd, "buildx", "build"]
            command += buildx_arguments(
                case, self.builder_name(builder), case_dir, pushed
            )
            command += arguments
        command += case.option_arguments(str(context))
        command.append(case.context_argument(str(context)))
        if case.client_user:
            command, variables = self._user_client.wrap(command, case_dir, case.id)
            environment |= variables
        if case.context_from:
            yield from stream_with_stdin(command, environment, case, context, case_dir)
            return
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
        """Start removing the builder's copies of build contexts (source.local).

        The prune runs in a thread while the next case is prepared, and the
        next build waits for it (``_wait_for_forgetting``): a build that
        starts before the prune ends may still get a file of an earlier case.
        The engine's own BuildKit (the docker driver) is pruned through one
        Engine API request on a unix socket, other builders, and the engine
        when that request fails, by `docker buildx prune`.
        """
        name = self.builder_name(builder)
        docker = self.docker_for(builder)
        host = docker.client_config.host or ""
        command = [*docker.docker_cmd, "buildx", "prune", "--force"]
        if name is not None:
            command += ["--builder", name]
        command += ["--filter", "type=source.local"]
        prune: Callable[[], str]
        if name is None and host.startswith("unix://"):
            prune = functools.partial(_prune_engine_contexts, host, command)
        else:
            prune = functools.partial(_prune_with_buildx, command)
        self._forgetting = threading.Thread(
            target=_log_prune_error,
            args=(prune, builder.name),
            name=f"prune-{builder.name}",
            daemon=True,
        )
        self._forgetting.start()

    def close(self) -> None:
        """Wait for a running prune; call before the runner's engine stops."""
        self._wait_for_forgetting()
        if self._api is not None:
            self._api.close()
            self._api = None

    def _wait_for_forgetting(self) -> None:
        """Wait for the prune that ``_forget_contexts`` started, if any."""
        if self._forgetting is not None:
            self._forgetting.join()
            self._forgetting = None

    def _remove_image(self, names: list[str]) -> None:
        """Remove the images ``names`` that the build made.

        On a unix socket this takes one Engine API request per tag on a kept
        connection, not a docker CLI process, whose start costs more than the
        removal of a small image.
        """
        client = self._engine_api()
        if client is not None and _remove_through_api(client, names):
            return
        try:
            self.docker.image.remove(names, force=True, prune=True)
        except DockerException:
            pass  # nothing was tagged: the build failed or did not load

    def _engine_api(self) -> APIClient | None:
        """Return an Engine API client of the runner's engine on a unix socket."""
        host = self.docker.client_config.host or ""
        if not host.startswith("unix://"):
            return None
        if self._api is None:
            self._api = APIClient(base_url=host, version=ENGINE_API_VERSION, timeout=60)
        return self._api


# Docker 20.10's, the oldest engine in builders/engines.toml. docker-py 7.2
# sends build cache filters only for API 1.39 or later.
ENGINE_API_VERSION = "1.41"


def _remove_through_api(client: APIClient, names: list[str]) -> bool:
    """Remove the images ``names`` that exist; return False if the engine rejected
    a request."""
    try:
        for name in names:
            try:
                client.remove_image(name, force=True)
            except docker_errors.NotFound:
                pass  # not tagged: the build failed or did not load
    except (OSError, docker_errors.DockerException) as error:
        # An engine that no longer accepts ENGINE_API_VERSION, for example.
        log.info("removing through the Engine API failed", error=str(error)[-300:])
        return False
    return True


def _prune_engine_contexts(host: str, command: list[str]) -> str:
    """Remove the source.local records of the engine's BuildKit at ``host``.

    It does what `docker buildx prune --force --filter type=source.local`
    does for a docker-driver builder, without starting two processes. When
    the engine rejects the request (an API version it no longer accepts,
    for example), it runs ``command``, that prune, instead. Returns an
    error message, or "" on success.
    """
    client = APIClient(base_url=host, version=ENGINE_API_VERSION, timeout=60)
    try:
        client.prune_builds(filters={"type": ["source.local"]})
    except (OSError, docker_errors.DockerException) as error:
        # docker's APIError and requests' errors are OSErrors.
        log.info("pruning through the Engine API failed", error=str(error)[-300:])
        return _prune_with_buildx(command)
    finally:
        client.close()
    return ""


def _prune_with_buildx(command: list[str]) -> str:
    """Run `docker buildx prune`; return its error message, or "" on success."""
    completed = subprocess.run(command, capture_output=True, check=False)
    if completed.returncode == 0:
        return ""
    return _text(completed.stderr) or f"exit status {completed.returncode}"


def _log_prune_error(prune: Callable[[], str], builder_name: str) -> None:
    error = prune()
    if error:
        log.warning(
            "could not remove the builder's copies of earlier contexts",
            builder=builder_name,
            error=error.strip()[-300:],
        )


def tar_command(context: Path) -> list[str]:
    """Return the GNU tar command that writes ``context`` as a tar to stdout.

    It keeps numeric owners, modes, symlinks, hardlinks, device nodes, FIFOs
    and user.* extended attributes, and mtimes in whole seconds, as the
    docker CLI's own context tar does. GNU tar leaves unix sockets out, with
    a warning on stderr. Sparse files are sent as their full length of zeros.

    The pax time records are left out, because the docker CLI (26.1, and
    buildx 0.13) reads the first 512 bytes of stdin as a tar header to decide
    whether stdin is a tar. A pax header there fails that test ("ambiguous
    Dockerfile source: both stdin and flag correspond to Dockerfiles").
    """
    return [
        "tar", "--create", "--file=-", "--format=pax", "--numeric-owner",
        "--pax-option=delete=atime,delete=ctime,delete=mtime",
        "--xattrs", "--xattrs-include=user.*", "--sort=name",
        "--directory", str(context), ".",
    ]  # fmt: skip


def stream_with_stdin(
    command: list[str],
    environment: dict[str, str],
    case: Case,
    context: Path,
    case_dir: Path,
) -> Iterator[str]:
    """Run a build whose stdin is the context tar or the Dockerfile; yield its output.

    The tar goes from a ``tar`` process through a pipe, and the Dockerfile is
    opened as a file, so nothing in buildfuzz feeds stdin and no pipe can fill
    up. Both processes run in ``case_dir``, where the watchdog finds them.
    """
    command = [str(word) for word in command]  # docker_cmd contains a Path
    full_environment = os.environ | environment
    producer: subprocess.Popen[bytes] | None = None
    tar_log = case_dir / "tar.log"
    if case.context_from == "stdin-tar":
        with tar_log.open("wb") as errors:
            producer = subprocess.Popen(
                tar_command(context),
                cwd=case_dir,
                stdout=subprocess.PIPE,
                stderr=errors,
            )
        assert producer.stdout is not None
        stdin: IO[bytes] = producer.stdout
    else:
        stdin = (context / case.dockerfile_name).open("rb")
    try:
        with subprocess.Popen(
            command,
            cwd=case_dir,
            env=full_environment,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        ) as process:
            stdin.close()  # the build process has its own copy
            assert process.stdout is not None
            for raw in process.stdout:
                yield raw.decode("utf-8", errors="replace")
    finally:
        stdin.close()
        if producer is not None:
            _finish_tar(producer, tar_log)
    if process.returncode != 0:
        raise DockerException(command, process.returncode)


def _finish_tar(producer: subprocess.Popen[bytes], tar_log: Path) -> None:
    """Wait for the tar process; kill it when the build stopped reading early."""
    try:
        producer.wait(timeout=10)
    except subprocess.TimeoutExpired:
        producer.kill()
        producer.wait()
    errors = tar_log.read_text(encoding="utf-8", errors="replace").strip()
    if producer.returncode != 0 and errors:
        log.info("tar of the context ended with errors", errors=errors[-300:])


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


def image_names(case: Case, builder: BuilderDefinition, pushed: str = "") -> list[str]:
    """Return the names of the images that building ``case`` may create.

    ``pushed`` is the reference that an Output.PUSH case pushes to; the
    docker driver keeps that image in the engine too.
    """
    names = list(case.tags) + ([pushed] if pushed else [])
    if builder.classic or case.output is Output.LOAD:
        names.insert(0, tag_for(case))
    elif case.output is Output.DOCKER_TAR:
        names.insert(0, LOADED_IMAGE)
    return names


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


def provide_secrets(case: Case, context: Path) -> dict[str, str]:
    """Write the files of the case's build secrets; return the variables of the rest.

    The flags that name them come from ``Case.option_arguments``; a file goes
    beside the context, readable by its owner only.
    """
    environment = {}
    for secret_id, source in case.build_secrets:
        value = secrets.build_secret_value(secret_id)
        if source == "env":
            environment[secrets.secret_variable(secret_id)] = value
            continue
        path = Path(secrets.secret_file(str(context), secret_id))
        path.parent.mkdir(mode=0o700, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
            stream.write(value)
    return environment


def buildx_arguments(
    case: Case, builder: str | None, case_dir: Path, pushed: str = ""
) -> list[str]:
    """Return the ``docker buildx build`` flags that the classic builder lacks.

    ``pushed`` is the reference that an Output.PUSH case pushes to.
    """
    arguments = ["--progress", "plain"]
    if builder is not None:
        arguments += ["--builder", builder]
    if case.output is Output.LOAD:
        arguments += ["--load", "--tag", tag_for(case)]
    output = buildx_output(case, case_dir, pushed)
    if output:
        arguments += ["--output", ",".join(f"{k}={v}" for k, v in output.items())]
    # The sandbox daemons have no bridge network, so BuildKit RUN steps fail
    # with "network bridge not found" without --network none.
    arguments += ["--network", "none"]
    return arguments


def buildx_output(case: Case, case_dir: Path, pushed: str = "") -> dict[str, str]:
    if case.output is Output.PUSH:
        return push_output(case, pushed)
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
            "name": LOADED_IMAGE,
        }
    return {}


def push_output(case: Case, reference: str) -> dict[str, str]:
    """Return the attributes of ``--output type=image,push=true`` for ``case``."""
    output = {"type": "image", "name": reference, "push": "true"}
    if case.compression:
        output["compression"] = case.compression
    if case.force_compression:
        output["force-compression"] = "true"
    if case.oci_mediatypes:
        output["oci-mediatypes"] = case.oci_mediatypes
    return output


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
