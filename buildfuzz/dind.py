"""dind engines: dockerd in a privileged container on another engine.

Many CI systems run their builds against dockerd in a privileged
``docker:<version>-dind`` container. No image can be pulled here, so
buildfuzz makes such an image itself. ``mmdebstrap`` writes a minimal Debian
root file system with the release's docker.io into a tar file, cached under
``~/.cache/buildfuzz/dind/``. The tar is imported into the host engine as
``localhost/buildfuzz/dind:<release>``. The host engine is a sandbox engine
that the dind engine starts for itself, or an existing local daemon.

The container runs with ``--privileged --network none``, and dockerd inside
has no bridge and changes no iptables rules. Its data-root is a volume. Its
unix socket and log are in a directory bind-mounted from the run directory,
where buildfuzz's client reaches them. Without a network the inner daemon
cannot reach the loopback registry, so only the classic builder and the
buildx docker driver run on it. Container and volume carry the run
directory as a label. They are removed when the engine stops, and a later
run removes those of runs that died.
"""

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import docker
import docker.errors
import docker.types
import structlog

from buildfuzz.capabilities import privileged_problem
from buildfuzz.definitions import EngineDefinition
from buildfuzz.engine import (
    CLOSED_PROXY,
    START_TIMEOUT,
    EngineInfo,
    EngineOptions,
    SandboxEngine,
    read_engine_info,
    responds,
)
from buildfuzz.errors import EngineError, SetupError
from buildfuzz.external import ExternalEngine
from buildfuzz.packages import DEBIAN_MIRROR
from buildfuzz.paths import cache_root
from buildfuzz.workdir import _owner_alive, remove_tree

log = structlog.get_logger(__name__)

IMAGE_REPOSITORY = "localhost/buildfuzz/dind"
RUN_LABEL = "buildfuzz.dind.run"  # the run directory that owns the object
NAME_PREFIX = "buildfuzz-dind-"
PACKAGES = ("docker.io", "tini")
MARKER = ".buildfuzz-complete"
MMDEBSTRAP_TIMEOUT = 1800.0
# The container's command, with the shared directory as $0. On a cgroup v2
# host it moves every process out of the root cgroup, so that dockerd can
# enable controllers for its children, as the entry script of the
# docker:dind image does. Then it starts dockerd, logging to the directory.
ENTRY_SCRIPT = """
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    mkdir -p /sys/fs/cgroup/init
    for pid in $(cat /sys/fs/cgroup/cgroup.procs); do
        echo "$pid" > /sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
    done
    sed -e 's/ / +/g' -e 's/^/+/' < /sys/fs/cgroup/cgroup.controllers \\
        > /sys/fs/cgroup/cgroup.subtree_control || :
fi
exec tini -- dockerd "$@" > "$0/dockerd.log" 2>&1
"""


def rootfs_path(release: str) -> Path:
    return cache_root() / "dind" / release / "rootfs.tar"


def rootfs_ready(release: str) -> bool:
    return (rootfs_path(release).parent / MARKER).is_file()


def dind_problem(definition: EngineDefinition) -> str | None:
    """Return why the dind engine ``definition`` cannot run here, or None."""
    host = definition.host_engine
    assert host is not None, "dind definitions are linked to their host on loading"
    if not rootfs_ready(definition.release) and shutil.which("mmdebstrap") is None:
        return (
            "mmdebstrap not found (it makes the dind image); "
            "install it with apt-get install mmdebstrap, as ./dev.sh does"
        )
    if host.source == "external" and not host.host.startswith("unix://"):
        return (
            f"host engine {host.name} is at {host.host}; a dind engine needs a "
            "local daemon (unix://) to bind-mount its socket directory"
        )
    return privileged_problem(host)


def ensure_rootfs(release: str) -> Path:
    """Return the cached root file system tar of ``release``, making it first.

    NOTE: a cached tar is kept when Debian updates docker.io; remove its
    directory to make it again with the current packages.
    """
    path = rootfs_path(release)
    if rootfs_ready(release):
        return path
    if shutil.which("mmdebstrap") is None:
        raise SetupError(
            "mmdebstrap not found (it makes the dind image); "
            "install it with apt-get install mmdebstrap"
        )

    path.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own: parallel workers may make the same tar at once.
    partial = path.with_suffix(f".partial-{os.getpid()}")
    command = [
        "mmdebstrap",
        "--variant=essential",
        f"--include={','.join(PACKAGES)}",
        "--mode=root",
        "--format=tar",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        release,
        str(partial),
        f"deb {DEBIAN_MIRROR} {release} main",
    ]

    log.info("making the dind root file system", release=release)
    started = time.monotonic()
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=MMDEBSTRAP_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        partial.unlink(missing_ok=True)
        raise SetupError(
            f"mmdebstrap for {release} timed out after {MMDEBSTRAP_TIMEOUT:.0f} s"
        ) from None
    if completed.returncode != 0:
        partial.unlink(missing_ok=True)
        lines = (completed.stderr or completed.stdout).strip().splitlines()
        raise SetupError(
            f"mmdebstrap failed to make the {release} dind root file system: "
            + (lines[-1] if lines else f"exit status {completed.returncode}")
        )

    partial.rename(path)
    (path.parent / MARKER).write_text(" ".join(PACKAGES) + "\n")
    log.info(
        "dind root file system made",
        release=release,
        mib=path.stat().st_size >> 20,
        seconds=round(time.monotonic() - started, 1),
    )
    return path


def remove_leftovers(client: docker.DockerClient) -> list[str]:
    """Remove dind containers and volumes of runs whose buildfuzz is gone."""
    removed = []
    for container in client.containers.list(all=True, filters={"label": RUN_LABEL}):
        if _run_alive(container.labels.get(RUN_LABEL, "")):
            continue
        container.remove(force=True, v=True)
        removed.append(container.name)
    for volume in client.volumes.list(filters={"label": RUN_LABEL}):
        if _run_alive((volume.attrs.get("Labels") or {}).get(RUN_LABEL, "")):
            continue
        try:
            volume.remove(force=True)
        except docker.errors.APIError as error:
            log.warning("cannot remove volume", volume=volume.name, error=str(error))
            continue
        removed.append(volume.name)
    if removed:
        log.warning("removed dind leftovers of a dead run", objects=removed)
    return removed


def _run_alive(run_dir: str) -> bool:
    return bool(run_dir) and Path(run_dir).is_dir() and _owner_alive(Path(run_dir))


class DindEngine(SandboxEngine):
    """dockerd in a privileged container on the engine ``definition.host`` names.

    ``sandbox_engine`` makes one of these for a dind definition.
    """

    def __init__(
        self,
        definition: EngineDefinition,
        tree: Path,
        run_dir: Path,
        options: EngineOptions | None = None,
    ):
        super().__init__(definition, tree, run_dir, options)
        digest = hashlib.sha256(self.label.encode()).hexdigest()[:8]
        self.directory = run_dir / f"d-{digest}"
        self.run_dir = run_dir
        self.shared = self.directory / "s"
        self.socket = self.shared / "docker.sock"
        self.log_path = self.shared / "dockerd.log"
        self.container_name = f"{NAME_PREFIX}{os.getpid()}-{digest}"
        self.volume_name = f"{self.container_name}-data"
        self.host_engine: SandboxEngine | ExternalEngine | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> EngineInfo:
        host = self.definition.host_engine
        assert host is not None, "dind definitions are linked to their host"
        if self.options.data_root_mib or self.options.memory_mib:
            raise EngineError(
                f"engine {self.name} is a dind engine, which takes no data-root "
                "or memory limit; leave these options out of its profile"
            )
        if self.options.containerd_store:
            raise EngineError(
                f"engine {self.name} is a dind engine, which has no containerd "
                "image store option; leave it out of its profile"
            )
        problem = dind_problem(self.definition)
        if problem is not None:
            raise EngineError(f"dind engine {self.name} cannot run: {problem}")
        started = time.monotonic()
        try:
            rootfs = ensure_rootfs(self.definition.release)
        except SetupError as error:
            raise EngineError(f"dind engine {self.name} cannot run: {error}") from None
        self.directory.mkdir(parents=True)
        self.shared.mkdir()
        if host.source == "external":
            self.host_engine = ExternalEngine(host, self.directory)
        else:
            from buildfuzz.install import definition_tree

            self.host_engine = SandboxEngine(
                host, definition_tree(host), self.directory
            )
        try:
            self.host_engine.start()
            self._run_container(rootfs)
            self.info = self._wait_for_inner_daemon()
        except BaseException:
            self.stop()
            raise
        log.info(
            "engine started",
            engine=self.label,
            version=self.info.version,
            on=host.name,
            seconds=round(time.monotonic() - started, 1),
        )
        return self.info

    def _host_client(self) -> docker.DockerClient:
        assert self.host_engine is not None
        return docker.DockerClient(base_url=self.host_engine.host, timeout=120)

    def _run_container(self, rootfs: Path) -> None:
        image = f"{IMAGE_REPOSITORY}:{self.definition.release}"
        client = self._host_client()
        try:
            remove_leftovers(client)
            try:
                client.images.get(image)
            except docker.errors.ImageNotFound:
                client.api.import_image_from_file(
                    str(rootfs),
                    repository=IMAGE_REPOSITORY,
                    tag=self.definition.release,
                    changes=["ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
                )
                log.info("dind image imported", image=image)
            labels = {RUN_LABEL: str(self.run_dir)}
            client.volumes.create(self.volume_name, labels=labels)
            client.containers.run(
                image,
                [
                    "/bin/sh",
                    "-c",
                    ENTRY_SCRIPT,
                    str(self.shared),
                    *self._inner_arguments(),
                ],
                name=self.container_name,
                labels=labels,
                detach=True,
                privileged=True,
                network_mode="none",
                environment=self._inner_environment(),
                mounts=[
                    docker.types.Mount(
                        "/var/lib/docker", self.volume_name, type="volume"
                    ),
                    # The same path inside, so that the command lines of tini
                    # and dockerd name the run directory: the clean-up of a
                    # killed run finds them there (workdir.kill_processes_under).
                    docker.types.Mount(str(self.shared), str(self.shared), type="bind"),
                ],
            )
        except docker.errors.DockerException as error:
            raise EngineError(
                f"cannot start the container of dind engine {self.name}: {error}"
            ) from None
        finally:
            client.close()

    def _inner_arguments(self) -> list[str]:
        driver = self.options.storage_driver or self.definition.storage_driver
        return [
            f"--host={self.host}",
            f"--storage-driver={driver}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--userland-proxy=false",
        ]

    def _inner_environment(self) -> dict[str, str]:
        # The container has no network. The proxy makes a mistaken image
        # reference fail the same way as on the other sandbox engines.
        return {
            "HTTP_PROXY": CLOSED_PROXY,
            "HTTPS_PROXY": CLOSED_PROXY,
            "NO_PROXY": "localhost,127.0.0.1,::1",
        }

    def _container_state(self) -> dict[str, Any] | None:
        client = self._host_client()
        try:
            state: dict[str, Any] = client.api.inspect_container(self.container_name)[
                "State"
            ]
            return state
        except docker.errors.DockerException:
            return None
        finally:
            client.close()

    def _wait_for_inner_daemon(self) -> EngineInfo:
        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            state = self._container_state()
            if state is None or not state.get("Running"):
                code = state.get("ExitCode") if state else "?"
                raise EngineError(
                    f"the container of dind engine {self.name} exited with status "
                    f"{code}: {self.log_tail()}",
                    log_path=self.log_path,
                )
            if self.socket.exists():
                try:
                    return read_engine_info(self.host)
                except docker.errors.DockerException as error:
                    last_error = error
            time.sleep(0.2)
        raise EngineError(
            f"dockerd of dind engine {self.name} timed out: no response within "
            f"{START_TIMEOUT:.0f} s ({last_error}); see {self.log_path}",
            log_path=self.log_path,
        )

    def is_healthy(self) -> bool:
        state = self._container_state()
        if state is None or not state.get("Running"):
            return False
        return responds(self.host)

    def log_tail(self, lines: int = 5) -> str:
        tail = super().log_tail(lines)
        if tail != "(no daemon log)" or self.host_engine is None:
            return tail
        client = self._host_client()
        try:
            text = client.api.logs(self.container_name, tail=lines)
        except docker.errors.DockerException:
            return tail
        finally:
            client.close()
        return " | ".join(text.decode(errors="replace").strip().splitlines())

    def _remove_image(self) -> None:
        """Remove the dind image from a daemon that buildfuzz does not own."""
        client = self._host_client()
        try:
            client.images.remove(f"{IMAGE_REPOSITORY}:{self.definition.release}")
        except docker.errors.DockerException as error:
            log.warning("cannot remove the dind image", error=str(error))
        finally:
            client.close()

    def stop(self) -> None:
        """Remove the container and its volume, then stop the host engine."""
        host = self.host_engine
        if host is not None:
            try:
                client = self._host_client()
                try:
                    try:
                        client.api.remove_container(
                            self.container_name, force=True, v=True
                        )
                    except docker.errors.NotFound:
                        pass
                    try:
                        client.volumes.get(self.volume_name).remove(force=True)
                    except docker.errors.NotFound:
                        pass
                finally:
                    client.close()
            except docker.errors.DockerException as error:
                log.warning(
                    "cannot remove the dind container",
                    container=self.container_name,
                    error=str(error),
                )
            if isinstance(host, ExternalEngine):
                self._remove_image()
            host.stop()
            self.host_engine = None
        remove_tree(self.directory)
        log.info("engine stopped", engine=self.label)


def sandbox_engine(
    definition: EngineDefinition,
    tree: Path,
    run_dir: Path,
    options: EngineOptions | None = None,
) -> SandboxEngine:
    """Return the engine buildfuzz starts for ``definition``.

    That is a dind engine, a rootless dockerd or a dockerd run by root.
    """
    from buildfuzz.rootless import RootlessEngine

    kind: type[SandboxEngine] = SandboxEngine
    if definition.source == "dind":
        kind = DindEngine
    elif definition.rootless:
        kind = RootlessEngine
    return kind(definition, tree, run_dir, options)
