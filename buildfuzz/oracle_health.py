"""The engine-health oracle: after each case the daemon must still be sound.

After every case it reads the part of the daemon's log written since the
previous case and looks for Go panics, fatal runtime errors and
``level=fatal`` or ``level=panic`` lines. It also compares the mounts under
the engine's directory and the processes that name it with what was there
before the case: a mount or process that a finished build left behind and
that is still there after a short wait is a leak, unless it belongs to a
container that is running (the BuildKit container of a docker-container
builder, for example).

A healthy daemon logs warnings during normal builds (IPv4 forwarding off,
grpc reconnects to "localhost", "cleaning up after shim disconnected",
"cleanup warnings ... level=warning" from runc) and, with the containerd
image store, "Error looking up image leases" at level=error for
cross-platform builds; none of these is a finding. Nested ``level=`` texts
inside a message are not the line's level.
"""

import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker
import psutil

from buildfuzz.engine import SandboxEngine
from buildfuzz.signature import Phase, Signature, normalise
from buildfuzz.verdict import Oracle, OracleReport

SETTLE_SECONDS = 3.0  # how long a new mount or process may take to go away
_POLL = 0.25
_LOG_PROBLEM = re.compile(
    r"^(?:panic: .*|fatal error: .*|time=\"[^\"]*\" level=(?:fatal|panic) .*)$",
    re.MULTILINE,
)
# The daemon's own processes; each container's shim is checked separately.
_DAEMON_NAMES = ("dockerd", "containerd")


@dataclass(frozen=True)
class Snapshot:
    mounts: frozenset[str]
    processes: frozenset[int]


@dataclass
class _LogPosition:
    inode: int = -1
    offset: int = 0


@dataclass
class EngineHealth:
    """Track each engine's log offset and check its health after a case."""

    settle_seconds: float = SETTLE_SECONDS
    _logs: dict[str, _LogPosition] = field(default_factory=dict)

    def snapshot(self, engine: SandboxEngine) -> Snapshot:
        return Snapshot(_mounts_under(engine.directory), _processes_under(engine))

    def check(self, engine: SandboxEngine, before: Snapshot) -> OracleReport | None:
        problem = self.new_log_problems(engine)
        if problem:
            message = f"daemon log: {normalise(problem[0])}"
            return _report(message, "\n".join(problem))
        leaked_mounts, leaked_processes = self._leaks(engine, before)
        if leaked_mounts:
            detail = "\n".join(sorted(leaked_mounts))
            return _report("mount left behind by a finished build", detail)
        if leaked_processes:
            detail = "\n".join(_describe(pid) for pid in sorted(leaked_processes))
            return _report("process left behind by a finished build", detail)
        return None

    def new_log_problems(self, engine: SandboxEngine) -> list[str]:
        """Return panic and fatal lines the daemon logged since the last check."""
        text = self._read_new(engine.log_path)
        return [match.group(0) for match in _LOG_PROBLEM.finditer(text)]

    def _read_new(self, path: Path) -> str:
        position = self._logs.setdefault(str(path), _LogPosition())
        try:
            with path.open("rb") as stream:
                info = os.fstat(stream.fileno())
                if info.st_ino != position.inode or info.st_size < position.offset:
                    position.inode, position.offset = info.st_ino, 0  # a new daemon
                stream.seek(position.offset)
                data = stream.read()
        except OSError:
            return ""
        # Leave a last line without its newline for the next read.
        end = data.rfind(b"\n") + 1
        position.offset += end
        return data[:end].decode("utf-8", "replace")

    def _leaks(
        self, engine: SandboxEngine, before: Snapshot
    ) -> tuple[set[str], set[int]]:
        deadline = time.monotonic() + self.settle_seconds
        while True:
            mounts = set(_mounts_under(engine.directory) - before.mounts)
            processes = set(_processes_under(engine) - before.processes)
            if not mounts and not processes:
                return set(), set()
            if time.monotonic() >= deadline:
                break
            time.sleep(_POLL)
        running = _running_containers(engine)
        mounts = {m for m in mounts if not any(c in m for c in running)}
        processes = {p for p in processes if not _belongs_to(p, running)}
        return mounts, processes


def _report(message: str, detail: str) -> OracleReport:
    return OracleReport(
        Oracle.ENGINE_HEALTH,
        Signature(Phase.ENGINE, normalise(message)),
        f"engine-health oracle\n{detail}\n",
    )


# The daemon's network namespace for containers without a network, made for
# the first container it starts (a builder's) and kept until it stops.
_DAEMON_MOUNTS = ("exec/netns/default",)


def _mounts_under(directory: Path) -> frozenset[str]:
    prefix = str(directory) + "/"
    own = {prefix + path for path in _DAEMON_MOUNTS}
    found = set()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as stream:
            for line in stream:
                point = line.split()[4].encode().decode("unicode_escape")
                if point.startswith(prefix) and point not in own:
                    found.add(point)
    except OSError:
        pass
    return frozenset(found)


def _processes_under(engine: SandboxEngine) -> frozenset[int]:
    """Processes that name the engine's directory, but the daemons themselves."""
    prefix = str(engine.directory)
    found = set()
    for process in psutil.process_iter(["pid", "name", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if not any(prefix in part for part in cmdline):
            continue
        if process.info.get("name") in _DAEMON_NAMES:
            continue
        found.add(process.pid)
    return frozenset(found)


def _running_containers(engine: SandboxEngine) -> set[str]:
    """Ids (full and short) and layer directories of the running containers."""
    found: set[str] = set()
    try:
        client = engine.api_client()
    except docker.errors.DockerException:
        return found
    try:
        for container in client.containers.list():
            found.add(container.id)
            data = container.attrs.get("GraphDriver", {}).get("Data") or {}
            for key in ("MergedDir", "UpperDir", "WorkDir"):
                if data.get(key):
                    found.add(str(Path(data[key]).parent))
    except docker.errors.DockerException:
        pass
    finally:
        client.close()
    return found


def _belongs_to(pid: int, running: set[str]) -> bool:
    try:
        cmdline = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return True  # gone by now
    return any(key in cmdline for key in running)


def _describe(pid: int) -> str:
    try:
        process = psutil.Process(pid)
        return f"{pid} {process.name()}: {' '.join(process.cmdline())[:300]}"
    except psutil.Error:
        return f"{pid} (gone)"
