"""``buildfuzz doctor``: check the machine and say how to fix what is missing."""

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from buildfuzz import emulation
from buildfuzz.definitions import Definitions
from buildfuzz.external import daemon_status
from buildfuzz.install import (
    BUSYBOX_TREE,
    CLIENT_TREE,
    engine_tree_name,
    missing_trees,
)
from buildfuzz.limits import MemoryCgroup
from buildfuzz.packages import tree_path
from buildfuzz.profile import Profile
from buildfuzz.sbom_scanner import MARKER, SCANNER_COMMAND, SCANNER_VERSION, scanner_dir
from buildfuzz.workdir import DEFAULT_BASE

MIN_FREE_GIB = 5.0


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    required: bool = True  # needed by the default profile

    @property
    def status(self) -> str:
        if self.ok:
            return "ok"
        return "missing" if self.required else "optional"


def version_of(command: list[str]) -> str | None:
    """Return the first line that ``command`` prints, or None if it fails."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def run_checks(definitions: Definitions, profile: Profile) -> list[Check]:
    """Check what buildfuzz uses; ``required`` marks what the profile needs."""
    checks = [
        Check(
            "root",
            os.geteuid() == 0,
            f"effective user id {os.geteuid()}",
            "run buildfuzz as root: it starts Docker daemons and mounts file systems",
        ),
        _apt_check(),
        _client_check(),
        _busybox_check(),
    ]
    checks += [_engine_check(definitions, name) for name in profile.engines]
    checks += [
        _disk_check(DEFAULT_BASE, "free disk (work directory)"),
        _binfmt_check(),
        _go_check(),
        _syft_check(),
        _registry_check(),
        _fuse_check(),
        Check(
            "memory cgroup",
            MemoryCgroup.available(),
            "writable cgroup file system" if MemoryCgroup.available() else "read-only",
            "mount a writable cgroup file system for daemon memory limits",
            required=False,
        ),
    ]
    return checks


def default_profile_ready(checks: list[Check]) -> bool:
    return all(check.ok for check in checks if check.required)


def _apt_check() -> Check:
    found = shutil.which("apt-get") and shutil.which("dpkg-deb")
    return Check(
        "apt-get and dpkg-deb",
        bool(found),
        "found" if found else "not found",
        "buildfuzz fetches engines as Debian packages: use Debian 12 or 13",
    )


def _client_check() -> Check:
    cli = tree_path(CLIENT_TREE) / "usr/bin/docker"
    buildx = tree_path(CLIENT_TREE) / "usr/libexec/docker/cli-plugins/docker-buildx"
    cli_version = version_of([str(cli), "--version"]) if cli.exists() else None
    buildx_version = version_of([str(buildx), "version"]) if buildx.exists() else None
    detail = (
        f"{cli_version or 'docker CLI missing'}; {buildx_version or 'buildx missing'}"
    )
    return Check(
        "docker CLI and buildx",
        bool(cli_version and buildx_version),
        detail,
        "run `buildfuzz setup` (or ./dev.sh) to download them into the cache",
    )


def _busybox_check() -> Check:
    busybox = tree_path(BUSYBOX_TREE) / "bin/busybox"
    return Check(
        "busybox base",
        busybox.exists(),
        str(busybox) if busybox.exists() else "not downloaded",
        "run `buildfuzz setup`",
    )


def _engine_check(definitions: Definitions, name: str) -> Check:
    if definitions.engines[name].source == "dind":
        return _dind_check(definitions, name)
    if definitions.engines[name].source == "external":
        running, problem = daemon_status(definitions.engines[name])
        return Check(
            f"engine {name}",
            problem is None,
            problem or f"existing daemon, Docker {running}",
            "start the daemon, or correct its host or docker context",
        )
    dockerd = tree_path(engine_tree_name(name)) / "usr/sbin/dockerd"
    version = version_of([str(dockerd), "--version"]) if dockerd.exists() else None
    missing = missing_trees(definitions, [name])
    if version and not missing and definitions.engines[name].rootless:
        from buildfuzz.rootless import rootless_problem

        problem = rootless_problem()
        if problem is not None:
            return Check(f"engine {name}", False, problem, "see the reason")
    return Check(
        f"engine {name}",
        bool(version) and not missing,
        version or "not downloaded",
        f"run `buildfuzz setup --engine {name}`",
    )


def _dind_check(definitions: Definitions, name: str) -> Check:
    from buildfuzz.dind import dind_problem

    engine = definitions.engines[name]
    if missing_trees(definitions, [name]):
        return Check(
            f"engine {name}",
            False,
            f"host engine {engine.host} not downloaded",
            f"run `buildfuzz setup --engine {name}`",
        )
    problem = dind_problem(engine)
    return Check(
        f"engine {name}",
        problem is None,
        problem or f"dind on engine {engine.host}, docker.io of {engine.release}",
        "see the reason; `buildfuzz builders list` lists the engines that run here",
    )


def _disk_check(path: Path, name: str) -> Check:
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    return Check(
        name,
        free >= MIN_FREE_GIB,
        f"{free:.1f} GiB free under {probe}",
        f"free at least {MIN_FREE_GIB:.0f} GiB or give another --workdir",
    )


def _binfmt_check() -> Check:
    """Check for the qemu handlers that run RUN steps for foreign platforms."""
    directory = emulation.BINFMT_DIR
    handlers = emulation.qemu_handlers()
    native = set(emulation.native_platforms())
    emulated = sorted(emulation.runnable_platforms() - native)
    if emulated:
        detail = f"RUN steps run under qemu for {', '.join(emulated)}"
    elif handlers:
        names = ", ".join(handler.name for handler in handlers)
        detail = f"registered, but disabled or without flag F: {names}"
    elif not (directory / "register").exists():
        detail = f"binfmt_misc is not mounted at {directory}"
    elif (directory / "status").read_text().strip() != "enabled":
        detail = f"binfmt_misc is disabled: {directory}/status"
    else:
        detail = f"no qemu handler registered in {directory}"
    return Check(
        "qemu binfmt handlers",
        bool(emulated),
        detail,
        f"run ./dev.sh, or mount binfmt_misc at {directory}, apt-get install "
        "qemu-user-static binfmt-support and run update-binfmts --enable; "
        "without them RUN steps build only for this machine's platforms",
        required=False,
    )


def _go_check() -> Check:
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if Path("/usr/local/go/bin/go").exists() else None
    )
    version = version_of([go, "version"]) if go else None
    return Check(
        "Go toolchain",
        bool(version),
        version or "not found",
        "install Go (Debian golang-go, or the Go toolchain) to build BuildKit images",
        required=False,
    )


def _syft_check() -> Check:
    binary = scanner_dir() / SCANNER_COMMAND
    ready = (scanner_dir() / MARKER).is_file() and binary.exists()
    return Check(
        "syft (SBOM generator)",
        ready,
        f"{SCANNER_VERSION} in {binary}" if ready else "not built",
        "buildfuzz compiles it from the Go module proxy on the first SBOM case",
        required=False,
    )


def _registry_check() -> Check:
    binary = tree_path("registry") / "usr/bin/docker-registry"
    return Check(
        "loopback registry",
        binary.exists(),
        str(binary) if binary.exists() else "docker-registry not downloaded",
        "buildfuzz downloads Debian's docker-registry on first use",
        required=False,
    )


def _fuse_check() -> Check:
    ok = Path("/dev/fuse").exists()
    return Check(
        "/dev/fuse",
        ok,
        "present" if ok else "missing",
        "load the fuse module (modprobe fuse) for the fuse-overlayfs storage driver",
        required=False,
    )


def overlay_supported() -> bool:
    try:
        text = Path("/proc/filesystems").read_text()
    except OSError:
        return False
    return re.search(r"\boverlay\b", text) is not None
