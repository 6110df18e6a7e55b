"""Download Debian packages into the cache without touching the system's apt.

apt-get runs with a private sources file, package lists and archive cache
under ``~/.cache/buildfuzz/apt``, so the machine's own apt configuration and
installed packages are neither read nor changed. Unpacked trees live under
``~/.cache/buildfuzz/trees/<name>`` and are reused while their package list
is unchanged.
"""

import hashlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import structlog

from buildfuzz.definitions import PackageSet
from buildfuzz.errors import SetupError
from buildfuzz.paths import cache_root

log = structlog.get_logger(__name__)

DEBIAN_MIRROR = "http://deb.debian.org/debian"
KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
LISTS_MAX_AGE = 7 * 86400
MARKER = ".buildfuzz-complete"


def tree_path(name: str) -> Path:
    return cache_root() / "trees" / name


def tree_is_ready(name: str, packages: Iterable[PackageSet]) -> bool:
    marker = tree_path(name) / MARKER
    return marker.is_file() and marker.read_text() == _fingerprint(packages)


def ensure_tree(name: str, packages: tuple[PackageSet, ...]) -> Path:
    """Return an unpacked tree of ``packages``, downloading only what is missing."""
    root = tree_path(name)
    if tree_is_ready(name, packages):
        return root

    debs: list[Path] = []
    for package_set in packages:
        debs.extend(_download(package_set))

    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(staging)], f"unpack {deb.name}")
    (staging / MARKER).write_text(_fingerprint(packages))

    shutil.rmtree(root, ignore_errors=True)
    staging.rename(root)
    log.info("packages unpacked", tree=name, packages=[d.name for d in debs])

    return root


def _fingerprint(packages: Iterable[PackageSet]) -> str:
    listing = [[p.suite, list(p.names)] for p in packages]
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def _download(package_set: PackageSet) -> list[Path]:
    apt_dir = cache_root() / "apt" / package_set.suite
    options = _apt_options(apt_dir, package_set.suite)
    _update_lists(apt_dir, options, package_set.suite)

    archive = apt_dir / "debs"
    archive.mkdir(parents=True, exist_ok=True)
    found = [_cached_deb(archive, name) for name in package_set.names]
    missing = [
        name for name, deb in zip(package_set.names, found, strict=True) if deb is None
    ]
    if missing:
        _run(
            ["apt-get", *options, "download", *missing],
            f"download {', '.join(missing)} from Debian {package_set.suite}",
            cwd=archive,
        )

    debs = []
    for name in package_set.names:
        deb = _cached_deb(archive, name)
        if deb is None:
            raise SetupError(f"apt-get did not download {name} ({package_set.suite})")
        debs.append(deb)

    return debs


def _cached_deb(archive: Path, name: str) -> Path | None:
    matches = sorted(archive.glob(f"{name}_*.deb"))
    return matches[-1] if matches else None


def _apt_options(apt_dir: Path, suite: str) -> list[str]:
    sources = apt_dir / "debian.sources"  # deb822 needs this suffix
    if not sources.exists():
        apt_dir.mkdir(parents=True, exist_ok=True)
        sources.write_text(
            "Types: deb\n"
            f"URIs: {DEBIAN_MIRROR}\n"
            f"Suites: {suite}\n"
            "Components: main\n"
            f"Signed-By: {KEYRING}\n"
        )
    for sub in ("lists/partial", "cache/archives/partial"):
        (apt_dir / sub).mkdir(parents=True, exist_ok=True)

    return [
        "-q",
        "-o", f"Dir::Etc::SourceList={sources}",
        "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", f"Dir::State::Lists={apt_dir / 'lists'}",
        "-o", f"Dir::Cache={apt_dir / 'cache'}",
        "-o", "Dir::State::status=/dev/null",
        # The private directories belong to root; apt's sandbox user cannot
        # write there, so download as the calling user instead.
        "-o", "APT::Sandbox::User=root",
    ]  # fmt: skip


def _update_lists(apt_dir: Path, options: list[str], suite: str) -> None:
    stamp = apt_dir / "lists.stamp"
    if stamp.exists() and time.time() - stamp.stat().st_mtime < LISTS_MAX_AGE:
        return
    if not KEYRING.exists():
        raise SetupError(
            f"{KEYRING} not found; "
            "install it with: apt-get install debian-archive-keyring"
        )
    _run(["apt-get", *options, "update"], f"read Debian {suite} package lists")
    stamp.touch()


def _run(command: list[str], purpose: str, cwd: Path | None = None) -> None:
    if shutil.which(command[0]) is None:
        raise SetupError(f"{command[0]} not found; buildfuzz needs Debian's apt tools")
    completed = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        last = detail[-1] if detail else f"exit status {completed.returncode}"
        raise SetupError(f"failed to {purpose}: {last}")
