"""Bad input on the command line: one clear line, exit 2, results untouched."""

import json
import os
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from buildfuzz.cli import app
from tests.conftest import REPO, buildfuzz
from tests.test_results import RECORD


def snapshot(directory: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(directory)): path.read_bytes()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    directory = tmp_path / "results"
    (directory / "abc123").mkdir(parents=True)
    # A readable finding: a run checks every finding.json before it starts.
    record = replace(RECORD, id="abc123")
    (directory / "abc123" / "finding.json").write_text(json.dumps(asdict(record)))
    (directory / ".buildfuzz-results").write_text("1\n")
    return directory


def assert_clean_error(completed, *, mentions: str) -> None:
    assert completed.returncode == 2, completed.stderr
    assert "Traceback" not in completed.stderr
    assert mentions in completed.stderr


@pytest.mark.parametrize("budget", ["1x", "-5m", "0", "", "90", "0s", "31d", "5m5h"])
def test_run_rejects_bad_budget(budget: str, results: Path) -> None:
    before = snapshot(results)

    completed = buildfuzz(
        "run", "--budget", budget, "--results", str(results), cwd=REPO
    )

    assert_clean_error(completed, mentions=f"{budget!r}")
    assert "--budget" in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1
    assert snapshot(results) == before


def test_run_rejects_unknown_option(results: Path) -> None:
    completed = buildfuzz("run", "--budgte", "1m", cwd=REPO)

    assert completed.returncode == 2
    assert "--budgte" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_run_rejects_unknown_profile(results: Path) -> None:
    before = snapshot(results)

    completed = buildfuzz(
        "run", "--budget", "1m", "--profile", "nosuch", "--results", str(results),
        cwd=REPO,
    )  # fmt: skip

    assert_clean_error(completed, mentions="profile 'nosuch' not found")
    assert "default" in completed.stderr
    assert snapshot(results) == before


def test_run_rejects_corrupt_profile(tmp_path: Path, results: Path) -> None:
    profile = tmp_path / "broken.toml"
    profile.write_text('[context]\nsizes = [1, "big"]\n')

    completed = buildfuzz(
        "run", "--budget", "1m", "--profile", str(profile), "--results", str(results),
        cwd=REPO,
    )  # fmt: skip

    assert_clean_error(completed, mentions=str(profile))
    assert "'big'" in completed.stderr


def test_run_rejects_results_file(tmp_path: Path) -> None:
    not_a_directory = tmp_path / "results"
    not_a_directory.write_text("x")

    completed = buildfuzz(
        "run", "--budget", "1m", "--results", str(not_a_directory), cwd=REPO
    )

    assert_clean_error(completed, mentions="is not a directory")
    assert not_a_directory.read_text() == "x"


def test_run_rejects_other_results_format(results: Path) -> None:
    (results / ".buildfuzz-results").write_text("99\n")
    before = snapshot(results)

    completed = buildfuzz("run", "--budget", "1m", "--results", str(results), cwd=REPO)

    assert_clean_error(completed, mentions="format '99'")
    assert snapshot(results) == before


def test_run_offline_without_packages(tmp_path: Path, results: Path) -> None:
    before = snapshot(results)
    environment = {**os.environ, "BUILDFUZZ_CACHE": str(tmp_path / "empty-cache")}

    completed = subprocess_run(
        ["run", "--budget", "1m", "--offline", "--results", str(results)], environment
    )

    assert_clean_error(completed, mentions="buildfuzz setup")
    assert snapshot(results) == before


def test_run_as_non_root_fails_cleanly(
    results: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The interpreter lives under /root here, so a real non-root process
    # could not start it; the check reads only the effective user id.
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    before = snapshot(results)

    outcome = CliRunner().invoke(
        app, ["run", "--budget", "1m", "--results", str(results)]
    )

    assert outcome.exit_code == 2
    assert "needs root" in outcome.stderr
    assert snapshot(results) == before


def test_replay_rejects_missing_case(tmp_path: Path) -> None:
    completed = buildfuzz("replay", str(tmp_path / "nothing"), cwd=REPO)

    assert_clean_error(completed, mentions="case file not found")


def test_replay_rejects_corrupt_case(tmp_path: Path) -> None:
    case = tmp_path / "case.json"
    case.write_text('{"schema": 1, "files": [')

    completed = buildfuzz("replay", str(case), cwd=REPO)

    assert_clean_error(completed, mentions="not valid JSON")
    assert str(case) in completed.stderr


def test_replay_rejects_newer_case(tmp_path: Path) -> None:
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"schema": 2}))

    completed = buildfuzz("replay", str(case), cwd=REPO)

    assert_clean_error(completed, mentions="schema 2 is not supported")


def test_replay_rejects_unknown_engine(tmp_path: Path) -> None:
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"schema": 1, "engine": "1.0"}))

    completed = buildfuzz("replay", str(case), cwd=REPO)

    assert_clean_error(completed, mentions="engine '1.0'")


@pytest.mark.parametrize(
    ("arguments", "mentions"),
    [
        (["--all", "--jobs", "0"], "invalid --jobs 0"),
        (["--all", "--jobs", "65"], "invalid --jobs 65"),
        (["case.json", "--jobs", "2"], "--jobs 2 applies to --all only"),
    ],
)
def test_replay_rejects_bad_jobs(
    arguments: list[str], mentions: str, results: Path
) -> None:
    before = snapshot(results)

    completed = buildfuzz("replay", *arguments, "--results", str(results), cwd=REPO)

    assert_clean_error(completed, mentions=mentions)
    assert snapshot(results) == before


def test_log_format_is_checked(results: Path) -> None:
    completed = buildfuzz(
        "run", "--log-format", "xml", "--results", str(results), cwd=REPO
    )

    assert_clean_error(completed, mentions="'xml'")


def subprocess_run(arguments: list[str], environment: dict[str, str]):
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "buildfuzz", *arguments],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_run_rejects_foreign_directory(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "data.json").write_text("{}")

    completed = buildfuzz("run", "--budget", "1m", "--results", str(foreign), cwd=REPO)

    assert_clean_error(completed, mentions="holds other files")
    assert sorted(p.name for p in foreign.iterdir()) == ["data.json"]


def test_run_rejects_results_under_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")

    completed = buildfuzz(
        "run", "--budget", "1m", "--results", str(tmp_path / "afile" / "sub"), cwd=REPO
    )

    assert_clean_error(completed, mentions="under a file")


@pytest.mark.parametrize("content", [b"\xff\xfe\x00", None])
def test_run_rejects_unreadable_profile(tmp_path: Path, content: bytes | None) -> None:
    profile = tmp_path / "p.toml"
    if content is None:
        profile.mkdir()
    else:
        profile.write_bytes(content)

    completed = buildfuzz("run", "--budget", "1m", "--profile", str(profile), cwd=REPO)

    assert_clean_error(completed, mentions=str(profile))


def test_run_accepts_directory_with_readme(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "README.md").write_text("findings go here\n")

    environment = {**os.environ, "BUILDFUZZ_CACHE": str(tmp_path / "empty-cache")}

    # The results check comes before the check for the cache, which fails.
    completed = subprocess_run(
        ["run", "--budget", "1m", "--offline", "--results", str(results)], environment
    )

    assert "holds other files" not in completed.stderr
    assert "buildfuzz setup" in completed.stderr


def test_run_refuses_full_disk_before_writing(tmp_path: Path) -> None:
    results = tmp_path / "results"
    completed = buildfuzz(
        "run", "--budget", "10s", "--min-free", "999T", "--results", str(results),
        cwd=REPO,
    )  # fmt: skip

    assert completed.returncode == 2
    assert "below --min-free" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not results.exists()


@pytest.mark.parametrize("below", ["", "sub"])
def test_run_rejects_file_as_workdir(below: str, tmp_path: Path, results: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("not a directory")
    before = snapshot(results)

    completed = buildfuzz(
        "run", "--budget", "1m", "--workdir", str(path / below),
        "--results", str(results), cwd=REPO,
    )  # fmt: skip

    assert_clean_error(completed, mentions=f"({path} is a file)")
    assert "cannot enter" not in completed.stderr
    assert snapshot(results) == before
