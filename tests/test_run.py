"""End to end: a real run finds, shrinks, writes and replays a finding."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from buildfuzz.case import load_case
from buildfuzz.workdir import remove_tree
from tests.conftest import PROFILES, REPO, buildfuzz, client_tools, start_engine

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("installed")]


@pytest.fixture(scope="module")
def finding_run(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """One short run of the finding profile, shared by the tests below."""
    results = tmp_path_factory.mktemp("results")
    workdir = Path(tempfile_dir())
    completed = buildfuzz(
        "run", "--budget", "40s", "--seed", "7",
        "--profile", str(PROFILES / "finding.toml"),
        "--results", str(results), "--workdir", str(workdir),
        "--log-format", "json",
        cwd=REPO,
    )  # fmt: skip
    return completed, results


# The work and results directories that tempfile_dir made in this module.
MADE: list[Path] = []


@pytest.fixture(scope="module", autouse=True)
def remove_tempfile_dirs() -> Iterator[None]:
    yield
    while MADE:
        remove_tree(MADE.pop())


def tempfile_dir() -> str:
    """Return a new short directory under /var/tmp, removed after the module."""
    import tempfile

    path = tempfile.mkdtemp(prefix="bft-", dir="/var/tmp")
    MADE.append(Path(path))
    return path


def finding_dirs(results: Path) -> list[Path]:
    return sorted(path.parent for path in results.glob("*/finding.json"))


def test_run_reports_findings_and_summary(finding_run) -> None:
    completed, results = finding_run

    assert completed.returncode == 1, completed.stderr[-2000:]
    assert "buildfuzz run summary" in completed.stdout
    assert "findings           2 distinct" in completed.stdout
    assert "builds per minute" in completed.stdout
    assert len(finding_dirs(results)) == 2


def test_run_logs_one_json_event_per_case(finding_run) -> None:
    completed, _ = finding_run
    events = [json.loads(line) for line in completed.stderr.splitlines() if line]
    cases = [event for event in events if event["event"] == "case"]

    assert cases
    for event in cases:
        assert {"case_id", "builder", "verdict", "signature", "seconds"} <= set(event)


def test_findings_are_shrunk_to_minimum(finding_run) -> None:
    _, results = finding_run

    for directory in finding_dirs(results):
        case = load_case(directory / "case.json")
        record = json.loads((directory / "finding.json").read_text())
        assert case.dockerfile == (
            "FROM scratch",
            "COPY --chown=nobody:nogroup . /owned/",
        )
        assert case.files == ()
        assert record["shrunk"] is True
        assert record["attempts"] == 3  # one re-run before shrinking, two after
        assert record["reproduced"] == 3
        assert record["flaky"] is False


def test_finding_directory_has_every_file(finding_run) -> None:
    _, results = finding_run

    for directory in finding_dirs(results):
        names = {path.name for path in directory.iterdir()}
        environment = json.loads((directory / "environment.json").read_text())
        assert {"case.json", "original.json", "build.log", "repro.sh"} <= names
        assert {"README.md", "environment.json", "finding.json"} <= names
        assert "daemon.log" in names
        assert "API listen on" in (directory / "daemon.log").read_text()
        assert environment["engine"]["version"].startswith("26.1")
        assert environment["engine"]["storage_driver"] == "overlay2"
        assert environment["seed"] == 7
        assert environment["buildx"]
        assert os.access(directory / "repro.sh", os.X_OK)


def test_replay_reproduces_finding(finding_run) -> None:
    _, results = finding_run
    directory = finding_dirs(results)[0]

    completed = buildfuzz(
        "replay", str(directory), "--runs", "2", "--workdir", tempfile_dir(), cwd=REPO
    )

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "reproduced: 2/2" in completed.stdout


def test_replay_all_reports_still_failing(finding_run) -> None:
    _, results = finding_run

    completed = buildfuzz(
        "replay", "--all", "--results", str(results), "--runs", "1",
        "--workdir", tempfile_dir(),
        cwd=REPO,
    )  # fmt: skip

    assert completed.returncode == 1, completed.stderr[-2000:]
    assert completed.stdout.count("still failing") == 2
    assert "2 findings: 2 not fixed" in completed.stdout


def test_replay_all_in_parallel_keeps_order(finding_run) -> None:
    _, results = finding_run
    sequential = buildfuzz(
        "replay", "--all", "--results", str(results), "--runs", "1",
        "--workdir", tempfile_dir(),
        cwd=REPO,
    )  # fmt: skip

    parallel = buildfuzz(
        "replay", "--all", "--results", str(results), "--runs", "1", "--jobs", "2",
        "--workdir", tempfile_dir(), "--log-format", "json",
        cwd=REPO,
    )  # fmt: skip

    assert parallel.returncode == 1, parallel.stderr[-2000:]
    assert parallel.stdout.count("still failing") == 2
    assert "2 findings: 2 not fixed" in parallel.stdout
    assert parallel.stdout == sequential.stdout
    workers = worker_events(parallel.stderr)
    assert len({event["pid"] for event in workers}) == 2
    replayed = sorted(name for event in workers for name in event["findings"])
    assert replayed == sorted(path.name for path in finding_dirs(results))


def worker_events(stderr: str) -> list[dict]:
    """The JSON log events of started replay workers."""
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [event for event in events if event["event"] == "replay worker started"]


def test_results_lists_and_shows_findings(finding_run) -> None:
    _, results = finding_run
    finding_id = finding_dirs(results)[0].name

    listing = buildfuzz("results", "--results", str(results), cwd=REPO)
    page = buildfuzz("results", "show", finding_id, "--results", str(results), cwd=REPO)

    assert listing.returncode == 0
    assert len(listing.stdout.strip().splitlines()) == 2
    assert finding_id in listing.stdout
    assert page.returncode == 0
    assert f"# Finding {finding_id}" in page.stdout
    assert "What the failure needs" in page.stdout
    assert "COPY --chown=nobody:nogroup" in page.stdout


def test_replay_of_passing_case_fails(tmp_path: Path) -> None:
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"schema": 1, "dockerfile": ["FROM scratch"]}))

    completed = buildfuzz(
        "replay", str(case), "--runs", "1", "--workdir", tempfile_dir(), cwd=REPO
    )

    assert completed.returncode == 1
    assert "reproduced: 0/1" in completed.stdout


def test_repro_script_runs_without_buildfuzz(finding_run, run_dir: Path) -> None:
    _, results = finding_run
    engine = start_engine("26.1", run_dir)
    tools = client_tools(run_dir)
    try:
        outcomes = []
        for directory in finding_dirs(results):
            script = run_dir / f"{directory.name}.sh"
            script.write_bytes((directory / "repro.sh").read_bytes())
            # Only the docker CLI and the system's tools: no Python, no venv.
            environment = {
                "PATH": f"{tools.cli.parent}:/usr/bin:/bin",
                "DOCKER_HOST": engine.host,
                "DOCKER_CONFIG": str(tools.config_dir),
                "HOME": str(run_dir),
            }
            outcomes.append(
                subprocess.run(
                    ["bash", str(script)],
                    cwd=run_dir,
                    env=environment,
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=False,
                )
            )
    finally:
        engine.stop()

    for completed in outcomes:
        assert completed.returncode == 0, completed.stdout[-2000:]
        assert "buildfuzz repro: REPRODUCED" in completed.stdout


def test_same_seed_gives_same_cases() -> None:
    """Two runs with one seed start with the same case sequence."""
    runs = []
    for _ in range(2):
        completed = buildfuzz(
            "run", "--budget", "15s", "--seed", "11", "--no-tree-oracle",
            "--profile", str(PROFILES / "quiet.toml"),
            "--results", tempfile_dir(), "--workdir", tempfile_dir(),
            "--log-format", "json",
            cwd=REPO,
        )  # fmt: skip
        events = [json.loads(line) for line in completed.stderr.splitlines() if line]
        runs.append([e["case_id"] for e in events if e["event"] == "case"])

    length = min(len(runs[0]), len(runs[1]))
    assert length >= 10
    assert runs[0][:length] == runs[1][:length]


def test_interrupt_stops_engines_and_cleans_up() -> None:
    workdir = Path(tempfile_dir())
    process = subprocess.Popen(
        [sys.executable, "-m", "buildfuzz", "run", "--budget", "5m",
         "--profile", str(PROFILES / "quiet.toml"),
         "--results", tempfile_dir(), "--workdir", str(workdir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(workdir.glob("run-*/e-*")):
        time.sleep(0.2)
    time.sleep(3)  # some builds run

    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=120)

    assert process.returncode == 130
    assert "(interrupted)" in stdout
    assert list(workdir.glob("run-*")) == []
    assert not any(
        str(workdir) in " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
    )
    with open("/proc/self/mountinfo") as stream:
        assert str(workdir) not in stream.read()


def test_ci_mode_reports_known_findings(tmp_path: Path) -> None:
    results = tmp_path / "results"
    arguments = [
        "run", "--ci", "--budget", "25s", "--seed", "7",
        "--profile", str(PROFILES / "finding.toml"),
        "--results", str(results),
    ]  # fmt: skip

    first = buildfuzz(*arguments, "--workdir", tempfile_dir(), cwd=REPO)
    second = buildfuzz(
        *arguments, "--workdir", tempfile_dir(),
        "--junit", str(tmp_path / "junit.xml"),
        "--markdown", str(tmp_path / "summary.md"),
        cwd=REPO,
    )  # fmt: skip

    assert first.returncode == 1, first.stderr[-2000:]
    assert "(2 new, 0 known)" in first.stdout
    assert second.returncode == 3, second.stderr[-2000:]
    assert second.stdout.count(": still failing") == 2
    assert "earlier findings   2 replayed: 2 still failing" in second.stdout
    assert "(0 new, 2 known)" in second.stdout
    assert (tmp_path / "junit.xml").exists()
    assert "still failing" in (tmp_path / "summary.md").read_text()


def start_run(workdir: Path) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "buildfuzz", "run", "--budget", "5m",
         "--profile", str(PROFILES / "quiet.toml"),
         "--results", tempfile_dir(), "--workdir", str(workdir)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not list(
        workdir.glob("run-*/e-*/docker.sock")
    ):
        time.sleep(0.2)
    time.sleep(2)  # some builds run
    return process


def leftovers(directory: Path) -> list[str]:
    found = [
        " ".join(p.info["cmdline"] or [])
        for p in psutil.process_iter(["cmdline"])
        if str(directory) in " ".join(p.info["cmdline"] or [])
    ]
    with open("/proc/self/mountinfo") as stream:
        found += [line for line in stream if str(directory) in line]
    return found


def test_sigterm_stops_engines_and_cleans_up() -> None:
    workdir = Path(tempfile_dir())
    process = start_run(workdir)

    process.send_signal(signal.SIGTERM)
    stdout, _ = process.communicate(timeout=120)

    assert process.returncode == 130
    assert "(interrupted)" in stdout
    assert list(workdir.glob("run-*")) == []
    assert leftovers(workdir) == []


def test_next_run_reaps_killed_run() -> None:
    workdir = Path(tempfile_dir())
    process = start_run(workdir)
    process.kill()
    process.wait(timeout=30)
    dead_runs = list(workdir.glob("run-*"))
    left_behind = leftovers(workdir)

    completed = buildfuzz(
        "run", "--budget", "3s", "--profile", str(PROFILES / "quiet.toml"),
        "--results", tempfile_dir(), "--workdir", str(workdir),
        cwd=REPO,
    )  # fmt: skip

    assert len(dead_runs) == 1
    assert left_behind  # the killed run's daemon and mounts were still there
    assert "removing leftovers of a dead run" in completed.stderr
    assert list(workdir.glob("run-*")) == []
    assert leftovers(workdir) == []


@pytest.fixture
def small_workdir() -> Iterator[Path]:
    """A 512 MiB file system of its own, mounted for the run's work directory."""
    base = Path(tempfile_dir())
    image, mount_point = base / "fs.img", base / "w"
    mount_point.mkdir()
    with image.open("wb") as stream:
        stream.truncate(512 * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(mount_point)], check=True)
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)
    shutil.rmtree(base, ignore_errors=True)


def test_run_stops_when_disk_runs_low(small_workdir: Path, tmp_path: Path) -> None:
    free = shutil.disk_usage(small_workdir).free
    # A sandbox engine writes tens of MiB of state, so this limit is crossed
    # soon after the first cases.
    min_free = f"{(free - 40 * 2**20) // 2**20}M"

    completed = buildfuzz(
        "run", "--budget", "2m", "--min-free", min_free,
        "--profile", str(PROFILES / "quiet.toml"),
        "--results", str(tmp_path / "results"), "--workdir", str(small_workdir),
        cwd=REPO,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "free disk space below --min-free" in completed.stderr
    assert "stopped early: disk space below --min-free" in completed.stdout
    assert list(small_workdir.glob("run-*")) == []


def test_continue_goes_on_where_last_run_stopped(tmp_path: Path) -> None:
    results = tmp_path / "results"
    runs = []
    for _ in range(2):
        completed = buildfuzz(
            "run", "--continue", "--budget", "8s",
            "--profile", str(PROFILES / "quiet.toml"),
            "--results", str(results), "--workdir", tempfile_dir(),
            "--log-format", "json",
            cwd=REPO,
        )  # fmt: skip
        events = [json.loads(line) for line in completed.stderr.splitlines() if line]
        seeds = [e["seed"] for e in events if e["event"] == "run started"]
        cases = [
            e["case_id"]
            for e in events
            if e["event"] == "case" and e["phase"] == "fuzz"
        ]
        runs.append((seeds[0], cases))
    state = json.loads((results / "state.json").read_text())

    assert runs[0][0] == runs[1][0]  # the second run kept the first run's seed
    assert runs[0][1] and runs[1][1]
    # With the same seed from the start, both would begin with the same cases.
    assert runs[1][1][:5] != runs[0][1][:5]
    assert state["quiet 1/1"]["seed"] == runs[0][0]
    assert state["quiet 1/1"]["next_index"] >= len(runs[0][1]) + len(runs[1][1]), (
        runs,
        state,
    )
