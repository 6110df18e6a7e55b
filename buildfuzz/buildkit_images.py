"""BuildKit releases built from source, as images and as host daemons.

The buildx ``docker-container`` driver runs BuildKit from an image, and the
``remote`` driver talks to a running buildkitd. No image can be pulled from a
public registry here, so buildfuzz compiles buildkitd and buildctl with the
machine's Go toolchain from the Go module proxy, caches them under
``~/.cache/buildfuzz/buildkit/VERSION/``, and either

- packs them with runc, its shared libraries and a static busybox into an
  image, imported into a sandbox engine and pushed to a loopback registry
  (``publish_buildkit_image``), or
- runs buildkitd as a host process on a unix socket (``HostBuildkitd``).

The releases are listed in ``builders/buildkit.toml``.
"""

import io
import json
import os
import re
import subprocess
import tarfile
import tempfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import structlog
from python_on_whales import DockerClient

from buildfuzz.certs import TlsFiles
from buildfuzz.engine import CLOSED_PROXY, MAX_SOCKET_PATH
from buildfuzz.errors import DataFileError, EngineError, SetupError
from buildfuzz.go_build import compile_release, staged_directory, version_tuple
from buildfuzz.install import BUSYBOX_TREE, engine_tree_name
from buildfuzz.packages import tree_path
from buildfuzz.paths import builders_dir, cache_root
from buildfuzz.registry import LoopbackRegistry, free_port
from buildfuzz.workdir import kill_processes_under, log_tail, remove_tree, stop_process

log = structlog.get_logger(__name__)

RELEASES_FILE = "buildkit.toml"
RELEASE_KEYS = ("version", "go_module", "description")
VERSION_PATTERN = re.compile(r"v(\d+)\.(\d+)\.(\d+)")
BINARIES = ("buildkitd", "buildctl")
# The build tags of BuildKit's own Dockerfile. With "seccomp", buildkitd runs
# RUN steps under Docker's default seccomp profile.
BUILD_TAGS = "osusergo netgo static_build seccomp"
MARKER = ".buildfuzz-complete"
IMAGE_REPOSITORY = "buildfuzz/buildkit"
# The engine whose runc (Debian bookworm's, linked to libseccomp) goes into
# the images and runs the host daemons' RUN steps.
RUNC_ENGINE = "26.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class BuildkitRelease:
    """One entry of ``builders/buildkit.toml``."""

    version: str
    go_module: str
    description: str

    @property
    def sort_key(self) -> tuple[int, ...]:
        return version_tuple(self.version)


def load_buildkit_releases(path: Path | None = None) -> dict[str, BuildkitRelease]:
    """Read the BuildKit releases, keyed by version, oldest first."""
    path = path or builders_dir() / RELEASES_FILE
    try:
        data = tomllib.loads(path.read_text())
    except OSError as error:
        raise DataFileError(path, f"cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise DataFileError(path, f"invalid TOML: {error}") from None

    entries = data.get("releases")
    if not isinstance(entries, list) or not entries:
        raise DataFileError(path, "needs at least one [[releases]] entry")
    releases: dict[str, BuildkitRelease] = {}
    for number, raw in enumerate(entries, start=1):
        where = f"[[releases]] entry {number}"
        if not isinstance(raw, dict):
            raise DataFileError(path, f"{where} is not a table")
        unknown = sorted(set(raw) - set(RELEASE_KEYS))
        if unknown:
            raise DataFileError(
                path, f"{where}: unknown keys {unknown}; allowed: {list(RELEASE_KEYS)}"
            )
        for key in RELEASE_KEYS:
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise DataFileError(path, f"{where}: {key} must be a non-empty string")
        release = BuildkitRelease(**raw)
        if not VERSION_PATTERN.fullmatch(release.version):
            raise DataFileError(
                path, f"{where}: version {release.version!r} is not of the form vX.Y.Z"
            )
        if release.version in releases:
            raise DataFileError(path, f"{where}: version {release.version} repeats")
        releases[release.version] = release

    return dict(sorted(releases.items(), key=lambda item: item[1].sort_key))


def newest_release(releases: dict[str, BuildkitRelease] | None = None) -> str:
    """Return the newest version listed in ``builders/buildkit.toml``."""
    releases = releases or load_buildkit_releases()
    return max(releases.values(), key=lambda release: release.sort_key).version


def _release(version: str) -> BuildkitRelease:
    releases = load_buildkit_releases()
    if version not in releases:
        raise SetupError(
            f"BuildKit {version} is not listed in "
            f"{builders_dir() / RELEASES_FILE}; add it there or choose one of "
            f"{', '.join(releases)}"
        )
    return releases[version]


# Binaries -----------------------------------------------------------------


def buildkit_binaries_dir(version: str) -> Path:
    return cache_root() / "buildkit" / version


def ensure_buildkit_binaries(version: str) -> Path:
    """Return the directory containing ``buildkitd`` and ``buildctl`` of ``version``.

    They are compiled on the first call and reused from the cache afterwards.
    """
    release = _release(version)
    directory = buildkit_binaries_dir(version)
    marker = directory / MARKER
    if marker.is_file() and marker.read_text() == _fingerprint(release):
        return directory

    started = time.monotonic()
    log.info("buildkit build started", version=version)
    with staged_directory(directory) as staging:
        compile_release(
            release.go_module,
            release.version,
            staging,
            BINARIES,
            program=f"BuildKit {release.version}",
            fix=f"choose an older release in {builders_dir() / RELEASES_FILE}",
            tags=BUILD_TAGS,
        )
        (staging / MARKER).write_text(_fingerprint(release))

    log.info(
        "buildkit built",
        version=version,
        seconds=round(time.monotonic() - started, 1),
        directory=str(directory),
    )
    return directory


def _fingerprint(release: BuildkitRelease) -> str:
    return json.dumps(
        {"module": release.go_module, "version": release.version, "tags": BUILD_TAGS}
    )


# Images -------------------------------------------------------------------


def runc_binary() -> Path:
    """Return the runc of the engine tree that the images and host daemons use."""
    tree = tree_path(engine_tree_name(RUNC_ENGINE))
    for candidate in (tree / "usr/sbin/runc", tree / "usr/bin/runc"):
        if candidate.is_file():
            return candidate.resolve()
    raise SetupError(
        f"runc not found in {tree}; run `buildfuzz setup` to download engine "
        f"{RUNC_ENGINE}"
    )


def _busybox_binary() -> Path:
    busybox = tree_path(BUSYBOX_TREE) / "bin" / "busybox"
    if not busybox.is_file():
        raise SetupError(
            f"busybox not found at {busybox}; run `buildfuzz setup` to download it"
        )
    return busybox


def shared_libraries(binary: Path) -> list[Path]:
    """Return the paths of the libraries and loader that ``binary`` links to."""
    completed = subprocess.run(
        ["ldd", str(binary)], capture_output=True, text=True, check=False
    )
    if "not a dynamic executable" in completed.stdout + completed.stderr:
        return []
    if completed.returncode != 0:
        raise SetupError(f"ldd {binary} failed: {completed.stderr.strip()}")
    libraries = []
    for line in completed.stdout.splitlines():
        if "not found" in line:
            raise SetupError(
                f"{binary} needs {line.split()[0]}, which this machine lacks; "
                "install it with apt-get (runc needs libseccomp2)"
            )
        path = next((part for part in line.split() if part.startswith("/")), None)
        if path:
            libraries.append(Path(path))
    return libraries


def buildkit_rootfs_tar(version: str, destination: Path) -> Path:
    """Write the root filesystem of a BuildKit image as a tar at ``destination``.

    The tar contains buildkitd and buildctl, runc with its shared libraries, a
    static busybox as /bin/sh, and the directories that buildkitd uses.
    """
    binaries = ensure_buildkit_binaries(version)
    runc = runc_binary()
    files: list[tuple[str, Path]] = [
        *((f"usr/bin/{name}", binaries / name) for name in BINARIES),
        ("usr/bin/runc", runc),
        ("bin/busybox", _busybox_binary()),
        *((str(library).lstrip("/"), library) for library in shared_libraries(runc)),
    ]
    directories = {"etc/buildkit", "var/lib/buildkit", "run", "tmp", "root"}
    for name, _ in files:
        directories.update(str(parent) for parent in Path(name).parents)
    directories.discard(".")

    with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as archive:
        for name in sorted(directories):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name == "tmp" else 0o755
            archive.addfile(info)
        for name, source in files:
            info = tarfile.TarInfo(name)
            info.size = source.stat().st_size
            info.mode = 0o755
            with source.open("rb") as stream:
                archive.addfile(info, stream)
        link = tarfile.TarInfo("bin/sh")
        link.type = tarfile.SYMTYPE
        link.linkname = "busybox"
        archive.addfile(link)
        for name, text in (
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", "root:x:0:\n"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            archive.addfile(info, io.BytesIO(text.encode()))

    return destination


def buildkit_image_reference(registry: LoopbackRegistry, version: str) -> str:
    return registry.image(IMAGE_REPOSITORY, version)


def container_driver_options(image: str) -> dict[str, str]:
    """Return the ``--driver-opt`` values of a docker-container builder of ``image``.

    The sandbox engines have no bridge network, so the builder container
    joins the host network.
    """
    return {"image": image, "network": "host"}


def publish_buildkit_image(
    docker: DockerClient, registry: LoopbackRegistry, version: str
) -> str:
    """Import the BuildKit ``version`` image into ``docker``'s engine and push it.

    Return its reference, ``localhost:PORT/buildfuzz/buildkit:VERSION``, for
    ``docker buildx create --driver docker-container --driver-opt image=...``.
    The driver pulls the image before it starts a builder; as it lives on the
    loopback registry, that pull stays on 127.0.0.1.
    """
    reference = buildkit_image_reference(registry, version)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="buildfuzz-buildkit-") as scratch:
        tar_path = buildkit_rootfs_tar(version, Path(scratch) / "rootfs.tar")
        docker.image.import_(
            tar_path,
            reference,
            changes=['ENTRYPOINT ["buildkitd"]', "ENV PATH=/usr/bin:/bin"],
        )
    if registry.username is not None and registry.password is not None:
        docker.login(registry.host, registry.username, registry.password)
    docker.image.push(reference, quiet=True)
    log.info(
        "buildkit image published",
        image=reference,
        seconds=round(time.monotonic() - started, 1),
    )
    return reference


# Host daemons -------------------------------------------------------------


class HostBuildkitd:
    """buildkitd of one release as a root process on a unix socket.

    Its state, socket and log are in ``base/buildkitd-VERSION``, and the buildx
    remote driver connects to ``address``. RUN steps use runc from the engine
    tree and the host network (or none), because there is no CNI set-up.
    """

    def __init__(
        self,
        version: str,
        base: Path,
        config_text: str = "",
        *,
        tls: TlsFiles | None = None,
    ) -> None:
        self.version = version
        self.config_text = config_text
        # With TLS files, buildkitd listens on TCP on 127.0.0.1 as well and
        # requires client certificates signed by tls.cacert.
        self.tls = tls
        self.tcp_port = free_port() if tls is not None else 0
        self.directory = base / f"buildkitd-{version}"
        self.socket = self.directory / "buildkitd.sock"
        self.log_path = self.directory / "buildkitd.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    @property
    def tcp_address(self) -> str:
        return f"tcp://127.0.0.1:{self.tcp_port}"

    def start(self) -> None:
        if os.geteuid() != 0:
            raise EngineError(
                "a host buildkitd needs root (it mounts file systems); "
                "run buildfuzz as root"
            )
        if len(str(self.socket)) > MAX_SOCKET_PATH:
            raise EngineError(
                f"socket path {self.socket} is longer than {MAX_SOCKET_PATH} bytes, "
                "the limit of unix sockets; give a shorter --workdir"
            )

        binaries = ensure_buildkit_binaries(self.version)
        runc = runc_binary()
        self.directory.mkdir(parents=True)
        # A configuration file of its own, so that buildkitd does not read the
        # machine's /etc/buildkit/buildkitd.toml.
        config = self.directory / "buildkitd.toml"
        config.write_text(self.config_text)
        command = [
            str(binaries / "buildkitd"),
            f"--config={config}",
            f"--root={self.directory / 'root'}",
            f"--addr={self.address}",
            "--oci-worker=true",
            "--containerd-worker=false",
            "--oci-worker-net=host",
        ]
        if self.tls is not None:
            command += [
                f"--addr={self.tcp_address}",
                f"--tlscacert={self.tls.cacert}",
                f"--tlscert={self.tls.cert}",
                f"--tlskey={self.tls.key}",
            ]

        started = time.monotonic()
        with self.log_path.open("wb") as log_file:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self._environment(runc.parent),
                start_new_session=True,
            )
        try:
            self._wait_until_ready(binaries / "buildctl")
        except BaseException:
            self.stop()
            raise
        log.info(
            "buildkitd started",
            version=self.version,
            address=self.address,
            seconds=round(time.monotonic() - started, 1),
        )

    def _environment(self, runc_dir: Path) -> dict[str, str]:
        path = ":".join([str(runc_dir), "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        return {
            "PATH": path,
            "HOME": str(self.directory),
            "LANG": "C.UTF-8",
            # As with the sandbox engines, requests to registries other than
            # loopback ones go to a closed port, so such pulls fail at once.
            "HTTP_PROXY": CLOSED_PROXY,
            "HTTPS_PROXY": CLOSED_PROXY,
            "NO_PROXY": "localhost,127.0.0.1,::1",
        }

    def _wait_until_ready(self, buildctl: Path) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EngineError(
                    f"buildkitd {self.version} exited with status "
                    f"{self._process.returncode}: {self.log_tail()}",
                    log_path=self.log_path,
                )
            if self.socket.exists():
                probe = subprocess.run(
                    [str(buildctl), f"--addr={self.address}", "debug", "workers"],
                    capture_output=True,
                    timeout=10,
                    check=False,
                )
                if probe.returncode == 0:
                    return
            time.sleep(0.2)
        raise EngineError(
            f"buildkitd {self.version} did not respond on {self.address} within "
            f"{START_TIMEOUT:.0f} s; see {self.log_path}",
            log_path=self.log_path,
        )

    def log_tail(self, lines: int = 5) -> str:
        return log_tail(self.log_path, lines, "(no buildkitd log)")

    def stop(self) -> None:
        """Stop buildkitd and remove its state, even if it is already gone."""
        stop_process(self._process, STOP_TIMEOUT, f"buildkitd {self.version}")
        self._process = None
        kill_processes_under(self.directory)
        remove_tree(self.directory)
        log.info("buildkitd stopped", version=self.version)

    def __enter__(self) -> "HostBuildkitd":
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
