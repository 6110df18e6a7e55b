"""Resource limits for sandbox daemons: a small data-root and a memory cap."""

import os
import subprocess
from pathlib import Path

import structlog

from buildfuzz.errors import EngineError

log = structlog.get_logger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def mount_small_filesystem(image: Path, mount_point: Path, mib: int) -> None:
    """Mount a fresh ext4 file system of ``mib`` MiB, kept in a sparse file."""
    mount_point.mkdir(parents=True, exist_ok=True)
    with image.open("wb") as stream:
        stream.truncate(mib * 1024 * 1024)
    _run(["mkfs.ext4", "-q", "-F", str(image)], f"format {image}")
    # The loop device goes away with the unmount ("autoclear" is the default
    # for loop devices that mount sets up).
    _run(["mount", "-o", "loop", str(image), str(mount_point)], f"mount {image}")


def _run(command: list[str], purpose: str) -> None:
    try:
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise EngineError(
            f"{command[0]} not found; install e2fsprogs and mount (util-linux)"
        ) from None
    if completed.returncode != 0:
        raise EngineError(f"failed to {purpose}: {completed.stderr.strip()}")


class MemoryCgroup:
    """A memory cgroup (v1 or v2) that a daemon and its children run in."""

    def __init__(self, name: str, mib: int) -> None:
        self.mib = mib
        unified = (CGROUP_ROOT / "cgroup.controllers").exists()
        base = CGROUP_ROOT if unified else CGROUP_ROOT / "memory"
        self.path = base / name
        self._limit_file = "memory.max" if unified else "memory.limit_in_bytes"

    @staticmethod
    def available() -> bool:
        unified = (CGROUP_ROOT / "cgroup.controllers").exists()
        base = CGROUP_ROOT if unified else CGROUP_ROOT / "memory"
        return os.access(base, os.W_OK)

    def create(self) -> None:
        try:
            self.path.mkdir(exist_ok=True)
            (self.path / self._limit_file).write_text(str(self.mib * 1024 * 1024))
        except OSError as error:
            raise EngineError(
                f"cannot create memory cgroup {self.path}: {error}; "
                "memory limits need a writable cgroup file system"
            ) from None

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def remove(self) -> None:
        try:
            self.path.rmdir()
        except FileNotFoundError:
            pass
        except OSError as error:
            log.warning(
                "cannot remove memory cgroup", path=str(self.path), error=str(error)
            )
