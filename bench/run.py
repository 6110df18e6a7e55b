"""Measure buildfuzz's overhead, throughput and costs against plain tools.

Run as root from the repository after the README set-up:

    .venv/bin/python bench/run.py            # everything, about 12 minutes
    .venv/bin/python bench/run.py --quick    # shorter runs, about 4 minutes

It prints a table of every figure with its goal and writes
bench/results.json. Each ratio compares buildfuzz with the plain tool on
the same machine in the same run; nothing here is a pass/fail test.
"""

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from buildfuzz.build import BuildResult, CaseRunner  # noqa: E402
from buildfuzz.case import Case, ContextFile, FileKind, Output  # noqa: E402
from buildfuzz.client import ClientTools  # noqa: E402
from buildfuzz.context import materialize  # noqa: E402
from buildfuzz.definitions import load_definitions  # noqa: E402
from buildfuzz.engine import SandboxEngine  # noqa: E402
from buildfuzz.fuzzer import Fuzzer  # noqa: E402
from buildfuzz.install import (  # noqa: E402
    CLIENT_TREE,
    engine_tree_name,
    ensure_installed,
)
from buildfuzz.minimize import default_case  # noqa: E402
from buildfuzz.oracle_suite import OracleSettings, OracleSuite  # noqa: E402
from buildfuzz.packages import tree_path  # noqa: E402
from buildfuzz.profile import load_profile  # noqa: E402
from buildfuzz.session import CaseRecord  # noqa: E402
from buildfuzz.signature import Phase, Signature  # noqa: E402
from buildfuzz.strategies import Target, cases  # noqa: E402
from buildfuzz.verdict import Evaluation, Oracle, Verdict  # noqa: E402
from buildfuzz.workdir import create_run_dir, remove_tree  # noqa: E402

ENGINE = "26.1"
BENCH_CASE = Case(
    files=tuple(ContextFile(f"f{i}", size=4096, seed=i) for i in range(20)),
    dockerfile=("FROM scratch", "COPY . /ctx/"),
    builder="buildx-docker",
    output=Output.LOAD,
)


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


# Rounds of the overhead figure: each side runs builds / OVERHEAD_ROUNDS
# builds per round, and the side that goes first changes from round to
# round, so that a change of the machine's load hits every side alike.
OVERHEAD_ROUNDS = 4


def measure_overhead(run_dir: Path, builds: int) -> dict[str, float]:
    """N identical builds through buildfuzz versus a plain shell loop."""
    definitions = load_definitions()
    engine = SandboxEngine(
        definitions.engines[ENGINE], tree_path(engine_tree_name(ENGINE)), run_dir
    )
    started = time.perf_counter()
    engine.start()
    ready = time.perf_counter() - started
    try:
        tools = ClientTools.prepare(tree_path(CLIENT_TREE), run_dir)
        docker = tools.docker(engine.host)
        runner = CaseRunner(docker, definitions.builders, run_dir / "c", timeout=300)
        results: list[BuildResult] = []

        # The same builds judged by the tree oracle, which reads each built
        # image back and makes the runner forget BuildKit's copy of the
        # context after each build.
        suite = OracleSuite(
            definitions, OracleSettings(tree=True, secret=False, health=False)
        )
        oracle_runner = CaseRunner(
            docker,
            definitions.builders,
            run_dir / "t",
            timeout=300,
            forget_contexts=suite.compares_content,
        )
        reports: list[object] = []
        unread: list[BuildResult] = []

        def judged() -> None:
            checks = suite.start(BENCH_CASE, engine, docker)
            result = oracle_runner.run(BENCH_CASE, checks.inspect)
            reports.extend(checks.finish(result))
            if checks.tree is None:
                unread.append(result)

        per_round = max(1, builds // OVERHEAD_ROUNDS)
        context = materialize(BENCH_CASE, run_dir / "plain")
        script = (
            f'for i in $(seq {per_round}); do "{tools.cli}" buildx build '
            f"--progress plain --network none --load -t buildfuzz-case:latest "
            f"{context} > /dev/null 2>&1 || exit 1; done"
        )
        environment = {**os.environ, "DOCKER_HOST": engine.host,
                       "DOCKER_CONFIG": str(tools.config_dir)}  # fmt: skip

        def fuzzed() -> None:
            results.extend(runner.run(BENCH_CASE) for _ in range(per_round))

        def with_tree() -> None:
            for _ in range(per_round):
                judged()

        def plain() -> None:
            subprocess.run(["bash", "-c", script], env=environment, check=True)

        runner.run(BENCH_CASE)  # warm the builder's cache for every side
        judged()  # and this runner's first build
        reports.clear()
        unread.clear()
        sides = [("buildfuzz", fuzzed), ("tree", with_tree), ("plain", plain)]
        seconds = dict.fromkeys(("buildfuzz", "tree", "plain"), 0.0)
        for round_number in range(OVERHEAD_ROUNDS):
            shift = round_number % len(sides)
            for name, side in sides[shift:] + sides[:shift]:
                seconds[name] += timed(side)
    finally:
        engine.stop()
    failed = sum(not r.succeeded for r in results)
    plain_seconds = seconds["plain"]
    return {
        "builds": per_round * OVERHEAD_ROUNDS,
        "rounds": OVERHEAD_ROUNDS,
        "buildfuzz_seconds": round(seconds["buildfuzz"], 2),
        "plain_seconds": round(plain_seconds, 2),
        "overhead_ratio": round(seconds["buildfuzz"] / plain_seconds, 3),
        "tree_oracle_seconds": round(seconds["tree"], 2),
        "tree_oracle_ratio": round(seconds["tree"] / plain_seconds, 3),
        "tree_oracle_reports": len(reports),
        "tree_oracle_unread": len(unread),
        "failed_builds": failed,
        "engine_ready_seconds": round(ready, 2),
    }


def measure_throughput(seconds: int, jobs: int, workdir: Path) -> dict[str, float]:
    """Builds per minute of the default profile with ``jobs`` workers."""
    results = Path(tempfile.mkdtemp(prefix="bench-results-"))
    command = [
        sys.executable, "-m", "buildfuzz", "run", "--budget", f"{seconds}s",
        "--seed", "1", "--jobs", str(jobs), "--results", str(results),
        "--workdir", str(workdir), "--log-format", "json",
    ]  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    summary = next(iter(sorted(results.glob("runs/*.json"))), None)
    data = json.loads(summary.read_text()) if summary else {}
    shutil.rmtree(results, ignore_errors=True)
    return {
        "jobs": jobs,
        "exit_code": completed.returncode,
        "builds_per_minute": data.get("builds_per_minute", 0.0),
        "cases": data.get("cases", 0),
    }


def measure_materialisation(base: Path, files: int) -> dict[str, object]:
    """Time writing many small files and a few large ones, against cp -a."""
    small = Case(
        files=tuple(
            ContextFile(f"d{i // 1000}/f{i}", size=100, seed=i) for i in range(files)
        )
    )
    large = Case(
        files=tuple(ContextFile(f"big{i}", size=64 * 2**20, seed=i) for i in range(8))
    )
    figures: dict[str, object] = {}
    for name, case in (("many_small", small), ("large", large)):
        figures.update(_time_against_copy(base, name, case))

    sparse = base / "sparse"
    sparse.mkdir()
    with (sparse / "huge").open("wb") as stream:
        stream.truncate(8 * 2**30)
    figures["sparse_8gib_blocks_bytes"] = os.stat(sparse / "huge").st_blocks * 512
    shutil.rmtree(sparse)
    return figures


def _load() -> float:
    return round(os.getloadavg()[0], 2)


# Runs of each side; the medians count, because the machine is shared.
MATERIALISE_REPEATS = 5


def _time_against_copy(base: Path, name: str, case: Case) -> dict[str, object]:
    """Time materialize() and cp -a of the same tree under the same conditions.

    Each run gets a fresh ext4 file system (see ``_scratch_filesystem``)
    with an untimed copy of the tree as cp's source. Then both sides write
    a new tree, in turn, the side that goes first alternating from run to
    run. Before each timed side, os.sync() writes back all dirty pages, so
    no side pays for the writeback of the one before it. Neither side
    flushes its own writes. Nothing is deleted on the file system during a
    run: on ext4 without a journal, each new inode skips every inode freed
    in the last minute or more, so deleting a tree would slow whichever
    side came next.
    """
    times: list[float] = []
    copy_times: list[float] = []
    filesystems: set[str] = set()
    # Run -1 is not counted. In the first run, whichever side went first
    # was up to seven times slower, its time spent copying data into new
    # page-cache pages: most likely guest memory that the virtual machine
    # had not touched before.
    for run in range(-1, MATERIALISE_REPEATS):
        with _scratch_filesystem(base / f"{name}.fs", case) as (directory, kind):
            filesystems.add(kind)
            written, copied = _time_sides(case, directory, write_first=run % 2 == 0)
        if run >= 0:
            times.append(written)
            copy_times.append(copied)
    seconds = statistics.median(times)
    copy_seconds = statistics.median(copy_times)
    total = sum(entry.size for entry in case.files)
    return {
        f"{name}_files": len(case.files),
        f"{name}_filesystem": ", ".join(sorted(filesystems)),
        f"{name}_files_per_second": round(len(case.files) / seconds),
        f"{name}_bytes_per_second": round(total / seconds),
        f"{name}_seconds": round(seconds, 2),
        f"{name}_cp_a_seconds": round(copy_seconds, 2),
        f"{name}_ratio_to_cp_a": round(seconds / copy_seconds, 3),
        f"{name}_seconds_each_run": [round(t, 2) for t in times],
        f"{name}_cp_a_seconds_each_run": [round(t, 2) for t in copy_times],
        f"{name}_ratios_each_run": [
            round(mine / theirs, 3)
            for mine, theirs in zip(times, copy_times, strict=True)
        ],
    }


def _mount_new_ext4(image: Path, mount_point: Path, inodes: int) -> bool:
    """Make an ext4 file system with mke2fs defaults in ``image`` and mount it."""
    # The image's holes read as zeros, so the inode tables need no zeroing,
    # and without noinit_itable the kernel would zero them in the background.
    made = subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-N", str(inodes),
         "-E", "lazy_itable_init=1,lazy_journal_init=1,nodiscard", str(image)],
        capture_output=True,
    )  # fmt: skip
    if made.returncode != 0:
        return False
    mount = ["mount", "-o", "loop,noinit_itable", str(image), str(mount_point)]
    return subprocess.run(mount, capture_output=True).returncode == 0


def _time_sides(
    case: Case, directory: Path, *, write_first: bool
) -> tuple[float, float]:
    """Return the seconds of materialize() and of cp -a, each into a new tree."""
    source = materialize(case, directory / "source")
    command = ["cp", "-a", str(source), str(directory / "copied")]
    seconds: dict[str, float] = {}
    for side in ("write", "copy") if write_first else ("copy", "write"):
        os.sync()
        if side == "write":
            seconds[side] = timed(lambda: materialize(case, directory / "written"))
        else:
            seconds[side] = timed(lambda: subprocess.run(command, check=True))
    return seconds["write"], seconds["copy"]


@contextlib.contextmanager
def _scratch_filesystem(path: Path, case: Case) -> Iterator[tuple[Path, str]]:
    """Mount a new ext4 file system, sized for three trees of ``case``, at ``path``.

    Only this script writes to it, so files that other processes delete on
    the shared disk do not slow either side. The image file is sparse and
    is removed afterwards. Yields the mount point and the file system kind.
    Where mkfs.ext4 or the loop mount fails, it yields a plain directory
    under ``path``, and the kind names it.
    """
    inodes = 3 * (len(case.files) + 1000)
    needed = 3 * 4096 * sum(-(-max(entry.size, 1) // 4096) for entry in case.files)
    if shutil.disk_usage(path.parent).free < needed + 2 * 2**30:
        sys.exit(
            f"bench/run.py: materialisation needs {needed // 2**20} MiB more "
            f"than 2 GiB free under {path.parent}; free some space"
        )
    path.mkdir()
    image = path / "ext4.img"
    mount_point = path / "mnt"
    mount_point.mkdir()
    with image.open("wb") as stream:
        stream.truncate(needed + inodes * 256 + 2**30)
    mounted = _mount_new_ext4(image, mount_point, inodes)
    try:
        if mounted:
            yield mount_point, "new ext4 (loop device)"
        else:
            yield mount_point, "work directory (no loop mount)"
    finally:
        if mounted:
            subprocess.run(["umount", str(mount_point)], check=True)
        shutil.rmtree(path)


# Hypothesis' shrinker takes a different path for each seed, so take several.
SHRINK_SEEDS = (3, 4, 5, 6, 7)


def measure_shrinking() -> dict[str, float]:
    """Builds to shrink a planted finding that needs two axes, and 1-minimality."""
    runs = [_shrink_planted(seed) for seed in SHRINK_SEEDS]
    builds = [run["shrink_builds"] for run in runs]
    return {
        **runs[0],
        "seeds": len(runs),
        "shrink_builds_mean": round(sum(builds) / len(builds), 1),
        "shrink_builds_max": max(builds),
        "one_minimal_all": all(run["one_minimal"] for run in runs),
    }


def _shrink_planted(seed: int) -> dict[str, float]:
    profile = load_profile("default")
    targets = (
        Target(ENGINE, "buildx-docker", (Output.LOAD, Output.TAR, Output.LOCAL)),
        Target(ENGINE, "classic", (Output.LOAD,)),
    )
    planted = Signature(Phase.SOLVE, "planted")

    def fails(case: Case) -> bool:
        setuid = any(f.kind is FileKind.FILE and f.mode & 0o4000 for f in case.files)
        return case.output is Output.TAR and setuid

    def execute(case: Case) -> CaseRecord:
        result = BuildResult(exit_status=int(fails(case)), log="", duration=0.0)
        if not fails(case):
            return CaseRecord(case, result, Evaluation(Verdict.PASS))
        return CaseRecord(
            case, result, Evaluation(Verdict.FINDING, planted, Oracle.BUILD_ERROR)
        )

    events: list = []
    fuzzer = Fuzzer(
        cases(profile, targets),
        execute,
        profile=profile,
        targets=targets,
        seed=seed,
        known=lambda s: any(e.signature == s for e in events),
        on_finding=events.append,
        may_continue=lambda: not events,  # stop after the first finding
    )
    fuzzer.run(time.monotonic() + 20, 20)
    shrunk = next(e.shrunk for e in events if e.new)
    case = shrunk.case
    default = default_case(profile, targets)
    # 1-minimal: undoing the setuid bit or the tar output must make it pass.
    undo_mode = replace(case, files=tuple(replace(f, mode=0o644) for f in case.files))
    undo_output = replace(case, output=default.output)
    # The builds that then explain which axes matter are not shrinking.
    return {
        "shrink_builds": shrunk.builds - shrunk.explain_builds,
        "explain_builds": shrunk.explain_builds,
        "one_minimal": not fails(undo_mode) and not fails(undo_output),
        "files_left": len(case.files),
    }


def measure_setup() -> dict[str, float]:
    """A second set-up reuses everything: nothing downloaded or rebuilt."""
    definitions = load_definitions()
    cache = Path.home() / ".cache" / "buildfuzz"
    before = {p: p.stat().st_mtime for p in cache.glob("apt/*/debs/*.deb")}
    seconds = timed(lambda: ensure_installed(definitions, sorted(definitions.engines)))
    after = {p: p.stat().st_mtime for p in cache.glob("apt/*/debs/*.deb")}
    return {
        "second_setup_seconds": round(seconds, 2),
        "debs_changed": int(before != after),
    }


def measure_memory(workdir: Path, seconds: int) -> dict[str, float]:
    """Peak resident size of the buildfuzz process during a run."""
    results = Path(tempfile.mkdtemp(prefix="bench-mem-"))
    process = psutil.Popen(
        [sys.executable, "-m", "buildfuzz", "run", "--budget", f"{seconds}s",
         "--results", str(results), "--workdir", str(workdir)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.Error:
            break
        time.sleep(0.2)
    shutil.rmtree(results, ignore_errors=True)
    return {"peak_rss_mib": round(peak / 2**20, 1)}


FIGURES = ("setup", "overhead", "materialisation", "shrinking", "throughput", "memory")
RESULTS = REPO / "bench" / "results.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    parser.add_argument(
        "--only",
        action="append",
        choices=FIGURES,
        help="measure only this figure (repeat the option for more); the "
        "other figures in bench/results.json keep their recorded values",
    )
    arguments = parser.parse_args()
    quick = arguments.quick
    only = set(arguments.only or FIGURES)
    if os.geteuid() != 0:
        sys.exit("bench/run.py: run as root (it starts Docker daemons)")

    figures: dict[str, object] = {}
    if arguments.only and RESULTS.exists():
        figures = json.loads(RESULTS.read_text())
    if only == set(FIGURES):
        figures["machine"] = {
            "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
            "cpus": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(),
            "python": platform.python_version(),
        }

    base = Path(tempfile.mkdtemp(prefix="bfb-", dir="/var/tmp"))
    run_dir = create_run_dir(base)
    seconds = 60 if quick else 180
    builds = 20 if quick else 60
    measures: list[tuple[str, str, Callable[[], dict]]] = [
        ("setup", "setup", measure_setup),
        ("overhead", "overhead", lambda: measure_overhead(run_dir, builds)),
        ("materialisation", "materialisation",
         lambda: measure_materialisation(base, 20_000 if quick else 100_000)),
        ("shrinking", "shrinking", measure_shrinking),
        ("throughput", "throughput_jobs1",
         lambda: measure_throughput(seconds, 1, base / "t1")),
        ("throughput", "throughput_jobs2",
         lambda: measure_throughput(seconds, 2, base / "t2")),
        ("memory", "memory", lambda: measure_memory(base / "m", 30 if quick else 90)),
    ]  # fmt: skip
    try:
        for figure, key, measure in measures:
            if figure in only:
                figures[key] = _with_conditions(measure, quick)
    finally:
        remove_tree(run_dir)
        remove_tree(base)

    if "throughput" in only:
        one = figures["throughput_jobs1"]["builds_per_minute"] or 1  # type: ignore[index]
        two = figures["throughput_jobs2"]["builds_per_minute"]  # type: ignore[index]
        figures["jobs2_speedup"] = round(two / one, 2)
    if only == set(FIGURES):
        machine = figures["machine"]
        machine["load_average_at_end"] = [round(n, 2) for n in os.getloadavg()]  # type: ignore[index]
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    print_table(figures)


def _with_conditions(measure: Callable[[], dict], quick: bool) -> dict:
    """Run ``measure`` and add when it ran and the 1-minute load around it."""
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_at_start = _load()
    figures = measure()
    figures["measured_at"] = started
    figures["quick"] = quick
    figures["load_average_1min"] = [load_at_start, _load()]
    return figures


def print_table(figures: dict) -> None:
    rows = [
        ("overhead ratio (buildfuzz / plain loop)",
         ("overhead", "overhead_ratio"), "<= 1.10"),
        ("the same with the tree oracle on",
         ("overhead", "tree_oracle_ratio"), "<= 1.5"),
        ("builds per minute, --jobs 1",
         ("throughput_jobs1", "builds_per_minute"), ""),
        ("builds per minute, --jobs 2",
         ("throughput_jobs2", "builds_per_minute"), ""),
        ("--jobs 2 speed-up", ("jobs2_speedup",), ">= 1.6"),
        ("many small files: time / cp -a",
         ("materialisation", "many_small_ratio_to_cp_a"), "<= 1.0"),
        ("large files: time / cp -a",
         ("materialisation", "large_ratio_to_cp_a"), "<= 1.0"),
        ("8 GiB sparse file, bytes on disk",
         ("materialisation", "sparse_8gib_blocks_bytes"), "about 0"),
        ("builds to shrink a two-axis finding (seed 3)",
         ("shrinking", "shrink_builds"), "<= 60"),
        ("the same, mean of 5 seeds",
         ("shrinking", "shrink_builds_mean"), "<= 60"),
        ("the same, most of 5 seeds",
         ("shrinking", "shrink_builds_max"), "<= 60"),
        ("shrunk case is 1-minimal (every seed)",
         ("shrinking", "one_minimal_all"), "True"),
        ("engine ready (seconds)", ("overhead", "engine_ready_seconds"), ""),
        ("second set-up (seconds)", ("setup", "second_setup_seconds"), ""),
        ("second set-up downloads", ("setup", "debs_changed"), "0"),
        ("peak RSS of buildfuzz (MiB)", ("memory", "peak_rss_mib"), "<= 300"),
    ]  # fmt: skip
    width = max(len(name) for name, _, _ in rows)
    print(f"{'figure':<{width}}  {'value':>12}  goal")
    for name, keys, goal in rows:
        value: object = figures
        for key in keys:
            value = value.get(key, "not measured") if isinstance(value, dict) else value
        print(f"{name:<{width}}  {value!s:>12}  {goal}")


if __name__ == "__main__":
    main()
