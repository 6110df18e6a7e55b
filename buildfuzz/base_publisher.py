"""Build the registry bases of ``base_formats`` and make them reachable by name.

A run builds each format it needs once. A host buildkitd of the newest
BuildKit release builds ``FROM scratch`` plus the busybox root file system of
each platform, and pushes the result to the run's loopback registry. The
``busybox-auth`` base goes to a second registry that requires htpasswd
login. Builders in
containers then pull ``localhost/buildfuzz/NAME:1`` through their registry
mirror. The classic builder and the docker driver read the engine's image
store, so the engine pulls the image from the registry once per platform and
tags it with the name the Dockerfile uses.

The busybox of a foreign architecture comes from Debian's busybox-static of
that architecture, downloaded with a private apt configuration into the cache.
"""

import json
import os
import secrets as token_source
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import structlog
from python_on_whales import DockerClient, DockerException

from buildfuzz import secrets
from buildfuzz.base_formats import (
    FORMATS_BY_NAME,
    NATIVE_PLATFORM,
    BaseFormat,
    architecture,
    base_dockerfile,
)
from buildfuzz.baseimage import busybox_rootfs_tar
from buildfuzz.buildkit_images import (
    HostBuildkitd,
    ensure_buildkit_binaries,
    newest_release,
)
from buildfuzz.errors import EngineError, SetupError
from buildfuzz.packages import MARKER, _apt_options, _run, _update_lists
from buildfuzz.paths import cache_root
from buildfuzz.registry import LoopbackRegistry

log = structlog.get_logger(__name__)

FOREIGN_SUITE = "bookworm"
# Variables with the credentials of the registry that requires login. When
# they are unset, the run makes up a password and sets them for its own
# processes only.
USER_VARIABLE = "BUILDFUZZ_REGISTRY_USER"
PASSWORD_VARIABLE = "BUILDFUZZ_REGISTRY_PASSWORD"
DEFAULT_USER = "buildfuzz"
# docker runs docker-credential-NAME for hosts that config.json maps to NAME.
HELPER_NAME = "buildfuzz-env"
PUSH_TIMEOUT = 300


class BasePullError(EngineError):
    """An engine failed to pull a registry base.

    ``output`` is the error output of ``docker pull``. The failure is an
    outcome of the case, not a broken set-up, so a caller judges it like a
    failed build whose log is ``output``.
    """

    def __init__(self, message: str, output: str) -> None:
        super().__init__(message)
        self.output = output


def busybox_for(arch: str) -> Path:
    """Return a static busybox binary of ``arch`` (``amd64``, ``arm64``, ...)."""
    from buildfuzz.install import busybox_binary

    if arch == architecture(NATIVE_PLATFORM):
        return Path(busybox_binary())
    tree = cache_root() / "trees" / f"busybox-{arch}"
    binary = tree / "bin" / "busybox"
    if (tree / MARKER).is_file() and binary.is_file():
        return binary

    # A lists directory of its own: the shared one lists amd64 packages only.
    apt_dir = cache_root() / "apt" / f"{FOREIGN_SUITE}-{arch}"
    options = [*_apt_options(apt_dir, FOREIGN_SUITE)]
    options += ["-o", f"APT::Architectures::={arch}"]
    _update_lists(apt_dir, options, f"{FOREIGN_SUITE} ({arch})")
    archive = apt_dir / "debs"
    archive.mkdir(parents=True, exist_ok=True)
    debs = sorted(archive.glob(f"busybox-static_*_{arch}.deb"))
    if not debs:
        _run(
            ["apt-get", *options, "download", f"busybox-static:{arch}"],
            f"download busybox-static for {arch} from Debian {FOREIGN_SUITE}",
            cwd=archive,
        )
        debs = sorted(archive.glob(f"busybox-static_*_{arch}.deb"))
    if not debs:
        raise SetupError(f"apt-get did not download busybox-static for {arch}")

    staging = tree.with_name(tree.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _run(["dpkg-deb", "-x", str(debs[-1]), str(staging)], f"unpack {debs[-1].name}")
    (staging / MARKER).write_text(debs[-1].name)
    shutil.rmtree(tree, ignore_errors=True)
    staging.rename(tree)
    log.info("packages unpacked", tree=tree.name, packages=[debs[-1].name])
    return binary


def ensure_base_parts(names: Iterable[str]) -> None:
    """Download and build what publishing the bases ``names`` needs.

    For ``buildfuzz setup``: the BuildKit release that builds them, the
    registry, and the busybox of every foreign platform they carry. The
    host buildkitd also needs runc from the engine tree that
    ``buildkit_images.RUNC_ENGINE`` names, which setup fetches for BuildKit
    builders. Names that are no registry base (scratch, busybox, stage) are
    skipped.
    """
    bases = [FORMATS_BY_NAME[name] for name in names if name in FORMATS_BY_NAME]
    if not bases:
        return
    from buildfuzz.registry import registry_binary

    ensure_buildkit_binaries(newest_release())
    registry_binary()
    for platform in sorted({p for base in bases for p in base.platforms}):
        busybox_for(architecture(platform))


def write_base_context(
    directory: Path, platforms: tuple[str, ...], names: tuple[str, ...]
) -> Path:
    """Write the build context of the bases ``names``.

    It contains the Dockerfile, one root file system tar a platform and a
    file for each base's own layer.
    """
    (directory / "names").mkdir(parents=True, exist_ok=True)
    (directory / "Dockerfile").write_text(base_dockerfile())
    for name in names:
        (directory / "names" / name).write_text(f"{name}\n")
    for platform in platforms:
        arch = architecture(platform)
        tar_path = directory / f"rootfs-{arch}.tar"
        if not tar_path.exists():
            busybox_rootfs_tar(busybox_for(arch), tar_path)
    return directory


def registry_credentials() -> tuple[str, str]:
    """Return the user name and password of the registry that requires login.

    Both come from the environment. A missing password is made up and set in
    this process' environment, where the credential helper reads it.
    """
    username = os.environ.setdefault(USER_VARIABLE, DEFAULT_USER)
    password = os.environ.get(PASSWORD_VARIABLE) or token_source.token_urlsafe(18)
    os.environ[PASSWORD_VARIABLE] = password
    secrets.register([password])
    return username, password


def install_credential_helper(bin_dir: Path) -> Path:
    """Write ``docker-credential-buildfuzz-env`` into ``bin_dir`` and put it on PATH.

    The helper prints the credentials from the environment, so that no
    password is written to the docker configuration (``docker login`` would
    store it there) or to any other file.
    """
    bin_dir.mkdir(parents=True, exist_ok=True)
    helper = bin_dir / f"docker-credential-{HELPER_NAME}"
    helper.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "if sys.argv[1:] != ['get']:\n"
        "    sys.exit('this helper only reads credentials')\n"
        "server = sys.stdin.read().strip()\n"
        f"user = os.environ.get({USER_VARIABLE!r})\n"
        f"password = os.environ.get({PASSWORD_VARIABLE!r})\n"
        "if not user or not password:\n"
        "    print('credentials not found in native keychain')\n"
        "    sys.exit(1)\n"
        "print(json.dumps({'ServerURL': server, 'Username': user,"
        " 'Secret': password}))\n"
    )
    helper.chmod(0o755)
    path = os.environ.get("PATH", "/usr/bin:/bin")
    if str(bin_dir) not in path.split(":"):
        os.environ["PATH"] = f"{bin_dir}:{path}"
    return helper


def use_credential_helper(docker: DockerClient, hosts: list[str]) -> None:
    """Make the client behind ``docker`` ask the helper for ``hosts``' credentials."""
    config_dir = docker.client_config.config
    if config_dir is None:
        raise EngineError("the docker client has no configuration directory")
    config_path = Path(config_dir) / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError):
        config = {}
    helpers = config.setdefault("credHelpers", {})
    if all(helpers.get(host) == HELPER_NAME for host in hosts):
        return
    helpers.update({host: HELPER_NAME for host in hosts})
    config_path.write_text(json.dumps(config, indent=2) + "\n")


class BasePublisher:
    """Publish registry bases once a run, and pull them into engines on demand."""

    def __init__(
        self,
        run_dir: Path,
        registry: LoopbackRegistry,
        auth_registry: LoopbackRegistry | None = None,
    ) -> None:
        self.directory = run_dir / "bases"
        self.registry = registry
        self.auth_registry = auth_registry
        self._buildkitd: HostBuildkitd | None = None
        self._published: set[str] = set()
        # (engine label, base name) -> platform of the image tagged there
        self._pulled: dict[tuple[str, str], str] = {}

    def registry_of(self, base: BaseFormat) -> LoopbackRegistry:
        if not base.authenticated:
            return self.registry
        if self.auth_registry is None:
            raise EngineError(
                f"base {base.name} needs the registry with login, "
                "which this run did not start"
            )
        return self.auth_registry

    def provide(
        self,
        engine_label: str,
        docker: DockerClient,
        bases: list[BaseFormat],
        *,
        platform: str = "",
        engine_store: bool = True,
    ) -> None:
        """Publish ``bases`` and, with ``engine_store``, tag them in the engine.

        ``platform`` is the case's ``--platform``; a multi-platform base is
        pulled for it, so that the engine's tag names that platform's image.
        """
        for base in bases:
            self.publish(base)
            if engine_store:
                self._pull(engine_label, docker, base, platform or NATIVE_PLATFORM)

    def publish(self, base: BaseFormat) -> str:
        """Build and push ``base`` once a run, and return its registry reference."""
        registry = self.registry_of(base)
        reference = base.reference(registry.host)
        if base.name in self._published:
            return reference

        started = time.monotonic()
        context = write_base_context(
            self.directory / "context", base.platforms, (base.name,)
        )
        buildctl, address = self._ensure_buildkitd()
        command = [str(buildctl), f"--addr={address}", "build"]
        command += ["--frontend=dockerfile.v0"]
        command += [f"--local=context={context}", f"--local=dockerfile={context}"]
        command += [*base.buildctl_options(), "--output", base.output(reference)]
        try:
            completed = subprocess.run(
                command,
                capture_output=True,
                text=True,
                errors="replace",
                env=self._buildctl_environment(),
                timeout=PUSH_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise EngineError(
                f"building base {base.name} timed out after {PUSH_TIMEOUT} s; "
                f"see {self.directory}"
            ) from None
        if completed.returncode != 0:
            lines = completed.stderr.strip().splitlines() or ["(no output)"]
            raise EngineError(
                f"failed to build base {base.name}: {secrets.redact(lines[-1])}"
            )
        self._published.add(base.name)
        log.info(
            "base published",
            base=base.name,
            image=reference,
            seconds=round(time.monotonic() - started, 1),
        )
        return reference

    def _ensure_buildkitd(self) -> tuple[Path, str]:
        """Start the newest release's host buildkitd, and return buildctl and address.

        buildctl talks to it directly, so publishing needs no engine and no
        buildx builder.
        """
        version = newest_release()
        if self._buildkitd is None:
            from buildfuzz.buildx_builders import mirror_config

            buildkitd = HostBuildkitd(
                version, self.directory, mirror_config(self.registry)
            )
            buildkitd.start()
            self._buildkitd = buildkitd
        buildctl = ensure_buildkit_binaries(version) / "buildctl"
        return buildctl, self._buildkitd.address

    def _buildctl_environment(self) -> dict[str, str]:
        """Return buildctl's environment: a docker config that only names the helper."""
        config_dir = self.directory / "docker-config"
        config_dir.mkdir(parents=True, exist_ok=True)
        hosts = []
        if self.auth_registry is not None:
            hosts = [self.auth_registry.host, self.auth_registry.address]
        helpers = {host: HELPER_NAME for host in hosts}
        (config_dir / "config.json").write_text(json.dumps({"credHelpers": helpers}))
        environment = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("DOCKER_", "BUILDKIT_"))
        }
        environment["DOCKER_CONFIG"] = str(config_dir)
        return environment

    def _pull(
        self, engine_label: str, docker: DockerClient, base: BaseFormat, platform: str
    ) -> None:
        if base.multi_platform and platform not in base.platforms:
            platform = NATIVE_PLATFORM
        if not base.multi_platform:
            platform = base.platforms[0]
        key = (engine_label, base.name)
        # A restarted engine starts with an empty image store, so the record
        # alone is not enough.
        if self._pulled.get(key) == platform and docker.image.exists(base.image):
            return

        registry = self.registry_of(base)
        reference = base.reference(registry.host)
        if base.authenticated:
            use_credential_helper(docker, [registry.host, registry.address])
        command = [*docker.docker_cmd, "pull", "--quiet"]
        if base.multi_platform:
            command += ["--platform", platform]
        try:
            completed = subprocess.run(
                [*command, reference],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=PUSH_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise EngineError(
                f"engine {engine_label} timed out pulling base {base.name} "
                f"after {PUSH_TIMEOUT} s"
            ) from None
        if completed.returncode != 0:
            output = secrets.redact(completed.stderr.strip())
            raise BasePullError(
                f"engine {engine_label} failed to pull base {base.name} "
                f"({reference}): {output}",
                output,
            )
        try:
            docker.image.tag(reference, base.image)
        except DockerException as error:
            raise EngineError(
                f"engine {engine_label} failed to tag base {base.name}: "
                f"{error.stderr or error}"
            ) from None
        self._pulled[key] = platform

    def forget_engine(self, engine_label: str) -> None:
        """Forget what an engine pulled, because it is stopping or restarting."""
        for key in [key for key in self._pulled if key[0] == engine_label]:
            del self._pulled[key]

    def close(self) -> None:
        """Stop the buildkitd of the bases. The registries belong to the caller."""
        if self._buildkitd is not None:
            self._buildkitd.stop()
            self._buildkitd = None
        self._published.clear()
        self._pulled.clear()
