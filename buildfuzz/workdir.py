"""Per-run working directories, and the clean-up of runs that died.

Each run gets ``<base>/run-<pid>-<time>/`` holding its sandbox engines,
build contexts and private docker configuration. ``owner.pid`` in it names
the buildfuzz process; a later run removes directories whose owner is gone.
"""

import os
import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import structlog

from buildfuzz.errors import SetupError

log = structlog.get_logger(__name__)

DEFAULT_BASE = Path("/var/tmp/buildfuzz")
OWNER_FILE = "owner.pid"


def check_workdir(base: Path) -> None:
    """Raise SetupError when ``base`` or one of its ancestors is not a directory."""
    for path in (base, *base.parents):
        if path.exists() and not path.is_dir():
            raise SetupError(
                f"work directory {base} is not a directory ({path} is a file); "
                "give a directory path with --workdir"
            )


def create_run_dir(base: Path = DEFAULT_BASE) -> Path:
    """Create a private directory for this run, after removing dead runs' ones."""
    base = base.absolute()  # daemons run in other directories
    check_workdir(base)
    try:
        if not base.exists():
            # Others may pass through it (rootless engines' user must) but
            # not list it; each run directory is private.
            base.mkdir(parents=True)
            os.chmod(base, 0o711)
        elif base == DEFAULT_BASE and base.stat().st_mode & 0o777 == 0o700:
            os.chmod(base, 0o711)  # made private by an earlier version
    except OSError as error:
        raise SetupError(
            f"cannot create work directory {base}: {error.strerror}; "
            "give a directory path with --workdir"
        ) from None
    reap_dead_runs(base)

    # Made under a staging name and renamed once its owner file exists, so a
    # process reaping dead runs never finds it without that file.
    name = f"run-{os.getpid()}-{os.urandom(4).hex()}"
    staging = base / f".{name}"
    staging.mkdir(mode=0o700)
    (staging / OWNER_FILE).write_text(f"{os.getpid()} {_start_time(os.getpid())}\n")
    run_dir = base / name
    staging.rename(run_dir)

    return run_dir


def reap_dead_runs(base: Path) -> list[Path]:
    """Stop the processes and mounts of runs whose buildfuzz process is gone."""
    reaped = []
    for run_dir in sorted(base.glob("run-*")):
        if _owner_alive(run_dir):
            continue
        log.warning("removing leftovers of a dead run", run_dir=str(run_dir))
        remove_tree(run_dir)
        reaped.append(run_dir)
    return reaped


def _start_time(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return 0.0


def _owner_alive(run_dir: Path) -> bool:
    try:
        pid_text, started = (run_dir / OWNER_FILE).read_text().split()
        pid = int(pid_text)
    except (OSError, ValueError):
        return False
    # A reused pid has another start time.
    return psutil.pid_exists(pid) and abs(_start_time(pid) - float(started)) < 1.0


def kill_processes_under(directory: Path) -> None:
    """Kill every process that runs in, or names a path under, ``directory``."""
    prefix = str(directory)
    victims = []
    for process in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if process.pid == os.getpid():
            continue
        cmdline = process.info.get("cmdline") or []
        cwd = process.info.get("cwd") or ""
        if cwd.startswith(prefix) or any(prefix in part for part in cmdline):
            victims.append(process)
    for process in victims:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(victims, timeout=10)


def unmount_under(directory: Path) -> None:
    """Unmount every mount point below ``directory``, deepest first."""
    prefix = str(directory) + "/"
    mounts = []
    with open("/proc/self/mountinfo", encoding="utf-8") as stream:
        for line in stream:
            point = line.split()[4].encode().decode("unicode_escape")
            if point.startswith(prefix):
                mounts.append(point)
    for point in sorted(mounts, key=len, reverse=True):
        done = subprocess.run(["umount", point], capture_output=True, check=False)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def remove_tree(directory: Path) -> None:
    """Kill processes, unmount and delete everything under ``directory``."""
    kill_processes_under(directory)
    unmount_under(directory)
    shutil.rmtree(directory, ignore_errors=True)
    if directory.exists():
        log.warning("could not remove directory completely", path=str(directory))


def stop_process(
    process: "subprocess.Popen[bytes] | None", timeout: float, name: str
) -> None:
    """Stop ``process`` with SIGTERM, and SIGKILL it if it outlives ``timeout``."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("process did not stop in time; killing it", process=name)
        process.kill()
        process.wait()


def log_tail(path: Path, lines: int, missing: str) -> str:
    """Return the last ``lines`` lines of a log as one line, or ``missing``."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return missing
    return " | ".join(text.strip().splitlines()[-lines:])
