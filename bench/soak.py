"""Run buildfuzz for a long time and watch that it stays within its bounds.

Run as root from the repository after the README set-up:

    .venv/bin/python bench/soak.py                       # 30 minutes, --jobs 2
    .venv/bin/python bench/soak.py --budget 5m --every 10

It starts `buildfuzz run --jobs 2 --profile nightly` and samples, every
`--every` seconds, the run's processes, their open files, the mounts and
loop devices under its work directory, and the disk space the work and
results directories use. It prints how each figure moved between the first
and the last quarter of the run, then checks that the run left nothing
behind and that every finding it wrote reads back. It writes
bench/soak.json. Exit status 0 when every check held, 1 otherwise.
"""

import argparse
import json
import os
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

# A figure of the last quarter may exceed the first quarter's by this much
# before it counts as growth: engines start and stop as cases need them.
GROWTH_ALLOWED = {"processes": 1.5, "open_files": 1.5, "mounts": 2.0, "loops": 2.0}
DISK_ALLOWED_MIB = 2048  # the work directory's bound, engines' data included


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


def sample(root: psutil.Process, work: Path, results: Path) -> dict[str, float]:
    processes = tree_of(root)
    return {
        "time": time.monotonic(),
        "processes": len(processes),
        "open_files": open_files(processes),
        "mounts": mounts_under(work),
        "loops": loops_under(work),
        "work_mib": disk_mib(work),
        "results_mib": disk_mib(results),
    }


def quarters(samples: list[dict[str, float]], key: str) -> tuple[float, float]:
    quarter = max(1, len(samples) // 4)
    first = statistics.median(s[key] for s in samples[:quarter])
    last = statistics.median(s[key] for s in samples[-quarter:])
    return first, last


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
        first, last = quarters(samples, key) if samples else (0.0, 0.0)
        figures[key] = {"first_quarter": first, "last_quarter": last}
        bound = max(first * allowed, first + 4)
        checks.append((f"{key} steady", last <= bound, f"{first:g} -> {last:g}"))
    peak = max((s["work_mib"] for s in samples), default=0.0)
    figures["work_mib_peak"] = round(peak, 1)
    checks.append(
        (f"work dir <= {DISK_ALLOWED_MIB} MiB", peak <= DISK_ALLOWED_MIB, f"{peak:.0f}")
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
