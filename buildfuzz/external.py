"""A Docker daemon that already runs, used without changing what it owns.

buildfuzz starts nothing here and stops nothing. Its builds run on
builders of the docker-container driver, whose state lives in a builder
container and volume that buildfuzz creates and removes; the engine's own
BuildKit cache is not used. At the end, buildfuzz removes the images it
tagged (``buildfuzz-case``, the busybox base and the images it pushed to
its loopback registry) and nothing else.
"""

from pathlib import Path

import docker
import structlog
from python_on_whales import DockerClient, DockerException

from buildfuzz.definitions import EngineDefinition
from buildfuzz.engine import EngineInfo, EngineOptions
from buildfuzz.errors import EngineError

log = structlog.get_logger(__name__)

# Image references that buildfuzz creates on an engine; only these are removed.
OWN_IMAGE_PREFIXES = ("buildfuzz-case:", "localhost/buildfuzz/")


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
        client = docker.DockerClient(base_url=self.host, timeout=30)
        try:
            version = client.version()
            info = client.info()
        except docker.errors.DockerException as error:
            where = (
                f"docker context {self.definition.context}"
                if self.definition.context
                else "DOCKER_HOST or the engine's host"
            )
            raise EngineError(
                f"cannot reach the Docker daemon at {self.host}: {error}; check {where}"
            ) from None
        finally:
            client.close()
        containerd = next(
            (c.get("Version", "") for c in version.get("Components", [])
             if c.get("Name") == "containerd"),
            "",
        )  # fmt: skip
        self.info = EngineInfo(
            version=str(version.get("Version", "")),
            api_version=str(version.get("ApiVersion", "")),
            storage_driver=str(info.get("Driver", "")),
            containerd_version=str(containerd),
            kernel=str(info.get("KernelVersion", "")),
            operating_system=str(info.get("OperatingSystem", "")),
        )
        log.info("using existing engine", engine=self.label, host=self.host)
        return self.info

    def is_healthy(self) -> bool:
        client = docker.DockerClient(base_url=self.host, timeout=10)
        try:
            return bool(client.ping())
        except docker.errors.DockerException:
            return False
        finally:
            client.close()

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
