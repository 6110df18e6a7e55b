"""Sandbox engines: private dockerd daemons that buildfuzz starts and stops.

Each daemon gets its own data-root, exec-root, pid file and unix socket
under the run directory, with no bridge network and no iptables or
forwarding changes, so it never touches the host's own Docker set-up.
"""

import hashlib
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import structlog

from buildfuzz.case import Case
from buildfuzz.definitions import EngineDefinition
from buildfuzz.errors import EngineError
from buildfuzz.limits import MemoryCgroup, mount_small_filesystem
from buildfuzz.workdir import kill_processes_under, log_tail, remove_tree, stop_process

log = structlog.get_logger(__name__)

START_TIMEOUT = 60.0
SNAPSHOTTERS = {"overlay2": "overlayfs", "vfs": "native"}
# sun_path holds 108 bytes on Linux, but containerd refuses paths over 104.
MAX_SOCKET_PATH = 104
CLOSED_PROXY = "http://127.0.0.1:9"  # the discard port; nothing listens there
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class EngineOptions:
    """Daemon settings that are axes of a case; each set gets its own daemon."""

    storage_driver: str = ""  # "" is the engine definition's own driver
    containerd_store: bool = False
    data_root_mib: int = 0
    memory_mib: int = 0

    @classmethod
    def of(cls, case: Case) -> "EngineOptions":
        return cls(
            storage_driver=case.storage_driver,
            containerd_store=case.containerd_store,
            data_root_mib=case.data_root_mib,
            memory_mib=case.memory_mib,
        )

    def label(self, engine: str) -> str:
        probe = Case(
            engine=engine,
            storage_driver=self.storage_driver,
            containerd_store=self.containerd_store,
            data_root_mib=self.data_root_mib,
            memory_mib=self.memory_mib,
        )
        return probe.engine_label


@dataclass(frozen=True)
class EngineInfo:
    """Versions and settings that the running daemon reports."""

    version: str
    api_version: str
    storage_driver: str
    containerd_version: str
    kernel: str
    operating_system: str


def read_engine_info(host: str) -> EngineInfo:
    """Ask the daemon at ``host`` for its versions and settings."""
    client = docker.DockerClient(base_url=host, timeout=30)
    try:
        version: dict[str, Any] = client.version()
        info: dict[str, Any] = client.info()
    finally:
        client.close()
    return engine_info(version, info)


def engine_info(version: dict[str, Any], info: dict[str, Any]) -> EngineInfo:
    """Return the EngineInfo of a daemon's /version and /info replies."""
    containerd = next(
        (c.get("Version", "") for c in version.get("Components", [])
         if c.get("Name") == "containerd"),
        "",
    )  # fmt: skip
    return EngineInfo(
        version=str(version.get("Version", "")),
        api_version=str(version.get("ApiVersion", "")),
        storage_driver=str(info.get("Driver", "")),
        containerd_version=str(containerd),
        kernel=str(info.get("KernelVersion", "")),
        operating_system=str(info.get("OperatingSystem", "")),
    )


def responds(host: str, timeout: float = 30) -> bool:
    """Return whether the daemon at ``host`` replies to a ping."""
    try:
        client = docker.DockerClient(base_url=host, timeout=timeout)
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except docker.errors.DockerException:
        return False
    finally:
        client.close()


class SandboxEngine:
    """One dockerd that buildfuzz starts and owns, from an unpacked package tree.

    ``buildfuzz.dind.sandbox_engine`` makes the right kind for a definition:
    this one, or a ``DindEngine`` for a definition of source "dind".
    """

    def __init__(
        self,
        definition: EngineDefinition,
        tree: Path,
        run_dir: Path,
        options: EngineOptions | None = None,
    ):
        self.definition = definition
        self.tree = tree
        self.options = options or EngineOptions()
        self.label = self.options.label(definition.name)
        # A short name: containerd's debug socket sits four levels below and
        # unix socket paths are limited to about 104 bytes.
        digest = hashlib.sha256(self.label.encode()).hexdigest()[:8]
        self.directory = run_dir / f"e-{digest}"
        self._cgroup: MemoryCgroup | None = None
        self.socket = self.directory / "docker.sock"
        self.log_path = self.directory / "dockerd.log"
        self._process: subprocess.Popen[bytes] | None = None
        self.info: EngineInfo | None = None

    @property
    def name(self) -> str:
        return self.definition.name

    @property
    def host(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> EngineInfo:
        dockerd = self.tree / "usr" / "sbin" / "dockerd"
        if not dockerd.exists():
            # The layout of an official static release: docker/dockerd.
            dockerd = self.tree / "dockerd"
        if not dockerd.exists():
            raise EngineError(
                f"dockerd of engine {self.name} not found at {dockerd}; "
                + (
                    "give a directory with dockerd, containerd and runc as path"
                    if self.definition.source == "binaries"
                    else "run `buildfuzz setup` to download the engine packages"
                )
            )
        if os.geteuid() != 0:
            raise EngineError(
                "starting a sandbox engine needs root (dockerd mounts file systems); "
                "run buildfuzz as root"
            )

        deepest = self.directory / "exec" / "containerd" / "containerd-debug.sock"
        if len(str(deepest)) > MAX_SOCKET_PATH:
            raise EngineError(
                f"socket path {deepest} is longer than {MAX_SOCKET_PATH} bytes, "
                "the limit of unix sockets; give a shorter --workdir"
            )
        self.directory.mkdir(parents=True)
        if self.options.data_root_mib:
            mount_small_filesystem(
                self.directory / "data-root.img",
                self.directory / "root",
                self.options.data_root_mib,
            )
        self._prepare_directory()
        command = self._command(dockerd)
        if self.options.memory_mib:
            self._cgroup = MemoryCgroup(self.directory.name, self.options.memory_mib)
            self._cgroup.create()
            # Join the cgroup before exec, so containerd and every shim that
            # dockerd starts are counted against the limit too.
            script = 'echo $$ > "$0" && exec "$@"'
            command = ["/bin/sh", "-c", script, str(self._cgroup.procs_file), *command]
        # Append mode: every write lands at the end, so a line that someone
        # else appends (a restart's notes, a test) is never overwritten.
        log_file = self.log_path.open("ab")
        started = time.monotonic()
        self._process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            # A session of its own: Ctrl-C on the terminal reaches buildfuzz
            # only, and buildfuzz stops the daemon in order.
            start_new_session=True,
        )
        log_file.close()

        self.info = self._wait_until_ready()
        log.info(
            "engine started",
            engine=self.label,
            version=self.info.version,
            storage_driver=self.info.storage_driver,
            seconds=round(time.monotonic() - started, 1),
        )
        return self.info

    def _prepare_directory(self) -> None:
        """Make the daemon's directory ready; rootless engines hand it over."""

    def _command(self, dockerd: Path) -> list[str]:
        """Return the command line that starts the daemon."""
        return [str(dockerd), *self._daemon_arguments()]

    def _daemon_arguments(self) -> list[str]:
        driver = self.options.storage_driver or self.definition.storage_driver
        if self.options.containerd_store:
            # With the containerd image store, storage-driver names a
            # containerd snapshotter; "overlay2" would fail with
            # "snapshotter not loaded: overlay2".
            driver = SNAPSHOTTERS.get(driver, driver)
        config: dict[str, Any] = {"storage-driver": driver}
        features = dict(self.definition.features)
        if self.options.containerd_store:
            # 26.1 has no --feature flag; the feature goes into daemon.json.
            features["containerd-snapshotter"] = True
        if features:
            config["features"] = features
        config_path = self.directory / "daemon.json"
        config_path.write_text(json.dumps(config, indent=2))

        return [
            f"--config-file={config_path}",
            f"--data-root={self.directory / 'root'}",
            f"--exec-root={self.directory / 'exec'}",
            f"--pidfile={self.directory / 'dockerd.pid'}",
            f"--host={self.host}",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--userland-proxy=false",
        ]

    def _environment(self, tree: Path | None = None) -> dict[str, str]:
        tree = tree or self.tree
        bins = [tree / "usr" / "sbin", tree / "usr" / "bin", tree]
        path = ":".join([*map(str, bins), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        libraries = sorted(
            str(p)
            for pattern in ("lib/*-linux-gnu", "usr/lib/*-linux-gnu")
            for p in tree.glob(pattern)
        )
        return {
            "PATH": path,
            # Libraries unpacked with the engine, such as fuse-overlayfs' libfuse3.
            "LD_LIBRARY_PATH": ":".join(libraries),
            "HOME": str(self.directory),
            "LANG": "C.UTF-8",
            # Every registry request that is not for a loopback registry goes
            # to a closed port on 127.0.0.1, so a mistaken image reference
            # fails at once instead of reaching a public registry.
            "HTTP_PROXY": CLOSED_PROXY,
            "HTTPS_PROXY": CLOSED_PROXY,
            "NO_PROXY": "localhost,127.0.0.1,::1",
        }

    def _wait_until_ready(self) -> EngineInfo:
        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self._process is not None
            if self._process.poll() is not None:
                raise EngineError(
                    f"dockerd of engine {self.name} exited with status "
                    f"{self._process.returncode}: {self.log_tail()}",
                    log_path=self.log_path,
                )
            if self.socket.exists():
                try:
                    return self._read_info()
                except docker.errors.DockerException as error:
                    last_error = error
            time.sleep(0.1)

        self.stop()
        raise EngineError(
            f"dockerd of engine {self.name} did not answer within "
            f"{START_TIMEOUT:.0f} s ({last_error}); see {self.log_path}",
            log_path=self.log_path,
        )

    def api_client(self) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.host, timeout=30)

    def _read_info(self) -> EngineInfo:
        return read_engine_info(self.host)

    def is_healthy(self) -> bool:
        """Return whether the daemon process runs and answers a ping."""
        if self._process is None or self._process.poll() is not None:
            return False
        return responds(self.host)

    def log_tail(self, lines: int = 5) -> str:
        return log_tail(self.log_path, lines, "(no daemon log)")

    def stop(self) -> None:
        """Stop the daemon and remove its state, even if it is already gone."""
        stop_process(self._process, STOP_TIMEOUT, f"dockerd {self.name}")
        self._process = None
        kill_processes_under(self.directory)
        remove_tree(self.directory)
        if self._cgroup is not None:
            self._cgroup.remove()
            self._cgroup = None
        log.info("engine stopped", engine=self.label)

    def restart(self) -> EngineInfo:
        """Replace a crashed or stuck daemon with a fresh one."""
        self.stop()
        return self.start()
