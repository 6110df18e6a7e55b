"""A Docker daemon that already runs, used without changing what it owns.

buildfuzz starts nothing here and stops nothing. Its builds run on
builders of the docker-container driver, whose state lives in a builder
container and volume that buildfuzz creates and removes; the engine's own
BuildKit cache is not used. At the end, buildfuzz removes the images it
tagged (``buildfuzz-case``, the busybox base and the images it pushed to
its loopback registry) and nothing else.
"""

from pathlib import Path
from typing import Any

import docker
import structlog
from python_on_whales import DockerClient, DockerException
from requests.exceptions import RequestException

from buildfuzz.definitions import EngineDefinition
from buildfuzz.engine import EngineInfo, EngineOptions, engine_info, responds
from buildfuzz.errors import EngineError

log = structlog.get_logger(__name__)

# Image references that buildfuzz creates on an engine; only these are removed.
OWN_IMAGE_PREFIXES = ("buildfuzz-case:", "localhost/buildfuzz/")


def daemon_facts(definition: EngineDefinition) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return the version and info of the daemon an external engine names.

    Raise EngineError naming the host and where it came from when the
    daemon cannot be reached or the host is not a URL the client reads.
    """
    try:
        client = docker.DockerClient(base_url=definition.host, timeout=30)
        try:
            return client.version(), client.info()
        finally:
            client.close()
    except (
        docker.errors.DockerException,
        RequestException,
        OSError,
        ValueError,
    ) as error:
        where = (
            f"docker context {definition.context}"
            if definition.context
            else "the daemon's address (unix:///PATH or tcp://HOST:PORT)"
        )
        raise EngineError(
            f"cannot reach the Docker daemon at {definition.host!r}: "
            f"{_root_cause(error)}; "
            f"check {where}"
        ) from None


def _root_cause(error: BaseException) -> str:
    """Return the system error under docker-py's and requests' wrappers.

    "Connection refused" is clearer than "Max retries exceeded with url" and
    the pool's repr around it; an error without one keeps its first line.
    """
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:300]


def daemon_status(definition: EngineDefinition) -> tuple[str, str | None]:
    """Return an external engine's version and why it cannot be used, or None."""
    try:
        version, _ = daemon_facts(definition)
    except EngineError as error:
        return "?", str(error)
    return str(version.get("Version", "?")), None


class ExternalEngine:
    """The same interface as SandboxEngine, for a daemon at ``definition.host``."""

    def __init__(self, definition: EngineDefinition, run_dir: Path) -> None:
        self.definition = definition
        self.options = EngineOptions()
        self.label = definition.name
        self.host = definition.host
        self.directory = run_dir / f"x-{definition.name}"
        self.log_path = self.directory / "no-daemon-log"
        self.info: EngineInfo | None = None

    @property
    def name(self) -> str:
        return self.definition.name

    def start(self) -> EngineInfo:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.info = engine_info(*daemon_facts(self.definition))
        log.info("using existing engine", engine=self.label, host=self.host)
        return self.info

    def is_healthy(self) -> bool:
        return responds(self.host, timeout=10)

    def log_tail(self, lines: int = 5) -> str:
        return "(the daemon's log belongs to its owner)"

    def stop(self, cli: DockerClient | None = None) -> None:
        """Remove the images buildfuzz tagged; leave everything else as it was."""
        if cli is not None:
            remove_own_images(cli)

    def restart(self) -> EngineInfo:
        raise EngineError(
            f"the engine at {self.host} stopped answering; buildfuzz does not "
            "restart daemons it did not start"
        )


def remove_own_images(cli: DockerClient) -> None:
    try:
        images = cli.image.list()
    except DockerException as error:
        log.warning("cannot list images to clean up", error=str(error))
        return
    own = [
        tag
        for image in images
        for tag in image.repo_tags
        if tag.startswith(OWN_IMAGE_PREFIXES) or _on_own_registry(tag)
    ]
    if own:
        try:
            cli.image.remove(own, force=True, prune=True)
        except DockerException as error:
            log.warning("cannot remove images", images=own, error=str(error))


def _on_own_registry(tag: str) -> bool:
    """Return whether ``tag`` names an image on buildfuzz's loopback registry."""
    host, _, path = tag.partition("/")
    return host.startswith("localhost:") and path.startswith("buildfuzz/")
