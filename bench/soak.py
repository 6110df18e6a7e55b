"""Run buildfuzz for a long time and watch that it stays within its bounds.

Run as root from the repository after the README set-up:

    .venv/bin/python bench/soak.py                       # 30 minutes, --jobs 2
    .venv/bin/python bench/soak.py --budget 5m --every 10

It starts `buildfuzz run --jobs 2 --profile nightly` and samples, every
`--every` seconds, the run's engines, processes, their open files, the
mounts and loop devices under its work directory, free disk space and the
space the work and results directories use. Engines start on demand up to
a bound, so processes, open files and mounts are compared per running
engine between the first and the last quarter of the run. Then it checks
that the run left nothing behind and that every finding it wrote reads
back. It writes bench/soak.json. Exit status 0 when every check held, 1
otherwise.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from buildfuzz.budget import parse_duration  # noqa: E402
from buildfuzz.case import load_case  # noqa: E402
from buildfuzz.errors import BuildfuzzError  # noqa: E402
from buildfuzz.results import ResultsStore  # noqa: E402
from buildfuzz.session import MAX_ENGINES  # noqa: E402

# Engines start as cases need them, up to MAX_ENGINES a worker, so the
# run's processes, open files and mounts are compared per running engine: a
# figure of the last quarter may exceed the first quarter's by this factor
# before it counts as growth.
GROWTH_ALLOWED = {"processes": 1.5, "open_files": 1.5, "mounts": 2.0}
MIN_FREE_MIB = 2048  # buildfuzz run's default --min-free


def tree_of(root: psutil.Process) -> list[psutil.Process]:
    try:
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def open_files(processes: list[psutil.Process]) -> int:
    total = 0
    for process in processes:
        try:
            total += process.num_fds()
        except psutil.Error:
            pass  # it ended while we counted
    return total


def mounts_under(directory: Path) -> int:
    text = Path("/proc/self/mountinfo").read_text()
    return sum(1 for line in text.splitlines() if f" {directory}/" in line)


def loops_under(directory: Path) -> int:
    listing = subprocess.run(
        ["losetup", "--list", "--noheadings", "--output", "BACK-FILE"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    return sum(1 for line in listing.splitlines() if str(directory) in line)


def disk_mib(directory: Path) -> float:
    # Allocated blocks, so sparse files count as what they take.
    used = subprocess.run(
        ["du", "-sxk", str(directory)], capture_output=True, text=True, check=False
    ).stdout.split()
    return int(used[0]) / 1024 if used else 0.0


def engines_of(processes: list[psutil.Process]) -> int:
    count = 0
    for process in processes:
        try:
            count += process.name() == "dockerd"
        except psutil.Error:
            pass
    return count


def sample(root: psutil.Process, work: Path, results: Path) -> dict[str, float]:
    processes = tree_of(root)
    return {
        "time": time.monotonic(),
        "engines": engines_of(processes),
        "free_mib": shutil.disk_usage(work).free / 2**20,
        "processes": len(processes),
        "open_files": open_files(processes),
        "mounts": mounts_under(work),
        "loops": loops_under(work),
        "work_mib": disk_mib(work),
        "results_mib": disk_mib(results),
    }


def quarters(samples: list[dict[str, float]], key: str) -> tuple[float, float]:
    """Return the median of ``key`` per running engine, first and last quarter."""
    running = [s for s in samples if s["engines"]]
    quarter = max(1, len(running) // 4)

    def per_engine(part: list[dict[str, float]]) -> float:
        return statistics.median(s[key] / s["engines"] for s in part) if part else 0.0

    return per_engine(running[:quarter]), per_engine(running[-quarter:])


def leftovers(work: Path) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if str(work) in " ".join(process.info["cmdline"] or []):
            found.append(f"process {process.pid}: {process.info['cmdline'][0]}")
    if mounts_under(work):
        found.append(f"{mounts_under(work)} mounts under {work}")
    if loops_under(work):
        found.append(f"{loops_under(work)} loop devices on files under {work}")
    remaining = [path.name for path in work.iterdir()] if work.exists() else []
    if remaining:
        found.append(f"left in {work}: {', '.join(remaining[:5])}")
    return found


def unreadable_findings(results: Path) -> list[str]:
    """Read every finding and its case back; list what does not read."""
    problems = []
    store = ResultsStore(results)
    for directory in sorted(path for path in results.iterdir() if path.is_dir()):
        if directory.name == "runs":
            continue
        try:
            if store.load(directory.name) is None:
                problems.append(f"{directory.name}: no finding.json")
            load_case(directory / "case.json")
        except BuildfuzzError as error:
            problems.append(f"{directory.name}: {error}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="30m", help="run length (default 30m)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--profile", default="nightly")
    parser.add_argument("--every", type=float, default=30.0, help="seconds a sample")
    arguments = parser.parse_args()
    budget = parse_duration(arguments.budget, option="--budget")

    base = Path(tempfile.mkdtemp(prefix="soak-", dir="/var/tmp"))
    work, results = base / "work", base / "results"
    work.mkdir()
    command = [
        sys.executable, "-m", "buildfuzz", "run",
        "--budget", arguments.budget, "--jobs", str(arguments.jobs),
        "--profile", arguments.profile, "--results", str(results),
        "--workdir", str(work), "--log-format", "json",
    ]  # fmt: skip
    log_path = base / "run.log"
    started = time.monotonic()
    with log_path.open("wb") as log:
        run = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=log)
        root = psutil.Process(run.pid)
        samples = []
        while run.poll() is None:
            samples.append(sample(root, work, results))
            time.sleep(arguments.every)
        returncode = run.wait()
    elapsed = time.monotonic() - started

    figures: dict[str, object] = {
        "budget_seconds": budget,
        "elapsed_seconds": round(elapsed, 1),
        "exit_status": returncode,
        "samples": len(samples),
    }
    checks: list[tuple[str, bool, str]] = []
    checks.append(("exit status 0 or 1", returncode in (0, 1), str(returncode)))
    checks.append(
        ("ended within budget + 5m", elapsed <= budget + 300, f"{elapsed:.0f} s")
    )
    for key, allowed in GROWTH_ALLOWED.items():
        first, last = quarters(samples, key)
        figures[f"{key}_per_engine"] = {"first_quarter": first, "last_quarter": last}
        checks.append(
            (
                f"{key} per engine steady",
                last <= max(first * allowed, first + 2),
                f"{first:.1f} -> {last:.1f}",
            )
        )
    most = max((s["engines"] for s in samples), default=0)
    bound = arguments.jobs * MAX_ENGINES
    figures["engines_peak"] = most
    checks.append((f"engines <= {bound}", most <= bound, f"{most:g}"))
    loops = max((s["loops"] for s in samples), default=0)
    checks.append(("loop devices <= engines", loops <= bound, f"{loops:g}"))
    peak = max((s["work_mib"] for s in samples), default=0.0)
    lowest = min((s["free_mib"] for s in samples), default=0.0)
    figures["work_mib_peak"] = round(peak, 1)
    figures["free_mib_lowest"] = round(lowest, 1)
    # The run stops starting cases below --min-free; a case already running
    # may still write, so allow it one more GiB.
    checks.append(
        (
            "free disk stayed above --min-free",
            lowest >= MIN_FREE_MIB - 1024,
            f"lowest {lowest:.0f} MiB free, work dir peak {peak:.0f} MiB",
        )
    )
    left = leftovers(work)
    checks.append(("nothing left behind", not left, "; ".join(left) or "none"))
    broken = unreadable_findings(results) if results.exists() else []
    findings = sum(1 for p in results.glob("*/case.json")) if results.exists() else 0
    figures["findings"] = findings
    checks.append(("findings read back", not broken, "; ".join(broken) or "all"))

    figures["checks"] = [
        {"check": name, "held": held, "value": value} for name, held, value in checks
    ]
    (REPO / "bench" / "soak.json").write_text(json.dumps(figures, indent=2) + "\n")
    width = max(len(name) for name, _, _ in checks)
    for name, held, value in checks:
        print(f"{name:<{width}}  {'ok' if held else 'FAILED'}  {value}")
    print(f"log: {log_path}")
    return 0 if all(held for _, held, _ in checks) else 1


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("bench/soak.py: run as root (buildfuzz starts Docker daemons)")
    sys.exit(main())
