"""Secret values are redacted from logs and files, and read from the environment."""

import json
from pathlib import Path

import pytest

from buildfuzz import secrets
from buildfuzz.errors import UsageError
from buildfuzz.results import write_atomic
from tests.conftest import REPO, buildfuzz

SECRET = "hunter2-very-secret-value"


@pytest.fixture(autouse=True)
def clean_registry() -> None:
    secrets._values.clear()


def test_redact_replaces_every_occurrence() -> None:
    secrets.register([SECRET])

    text = secrets.redact(f"a {SECRET} b {SECRET}")

    assert SECRET not in text
    assert text == "a *** b ***"


def test_redact_prefers_longer_secret() -> None:
    secrets.register(["abcdef", "abcdefghij"])

    assert secrets.redact("xabcdefghijx") == "x***x"


def test_short_values_are_not_registered() -> None:
    secrets.register(["ab"])

    assert secrets.redact("abc") == "abc"


def test_resolve_reads_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BF_TEST_SECRET", SECRET)

    value = secrets.resolve("env:BF_TEST_SECRET")

    assert value == SECRET
    assert secrets.redact(value) == "***"
    assert secrets.resolve("plain") == "plain"


def test_missing_secret_variable_is_usage_error() -> None:
    with pytest.raises(UsageError, match="BF_NOT_SET_ANYWHERE"):
        secrets.register_environment(["BF_NOT_SET_ANYWHERE"])


def test_files_are_written_redacted(tmp_path: Path) -> None:
    secrets.register([SECRET])

    write_atomic(tmp_path / "a.txt", f"log: {SECRET}\n")
    write_atomic(tmp_path / "b.bin", f"bytes {SECRET}".encode())

    assert SECRET not in (tmp_path / "a.txt").read_text()
    assert SECRET.encode() not in (tmp_path / "b.bin").read_bytes()


def test_cli_rejects_unset_secret_env(tmp_path: Path) -> None:
    completed = buildfuzz(
        "run", "--budget", "1m", "--secret-env", "BF_NOT_SET_ANYWHERE",
        "--results", str(tmp_path / "r"),
        cwd=REPO,
    )  # fmt: skip

    assert completed.returncode == 2
    assert "BF_NOT_SET_ANYWHERE" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "r").exists()


def test_log_events_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    from buildfuzz import logs

    logs.configure("json")
    secrets.register([SECRET])
    import structlog

    structlog.get_logger("test").info("event", detail=f"value {SECRET}")
    line = capsys.readouterr().err.strip().splitlines()[-1]

    assert SECRET not in line
    assert json.loads(line)["detail"] == "value ***"


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_secret_absent_from_every_output(tmp_path: Path, workdir: Path) -> None:
    """A file name that is a secret value ends up in logs, cases and scripts;
    the run writes *** in its place in every file and log line."""
    import os
    import subprocess
    import sys

    from tests.conftest import PROFILES

    secret = "s3cretValue-7f3a9"
    profile = tmp_path / "secret.toml"
    profile.write_text(
        (PROFILES / "finding.toml")
        .read_text()
        .replace('names = ["a", "b", "c d"]', f'names = ["{secret}", "b"]')
    )
    results = tmp_path / "results"
    completed = subprocess.run(
        [sys.executable, "-m", "buildfuzz", "run", "--budget", "25s", "--seed", "3",
         "--profile", str(profile), "--results", str(results),
         "--secret-env", "BF_TEST_SECRET", "--log-format", "json",
         "--workdir", str(workdir)],
        cwd=REPO, env={**os.environ, "BF_TEST_SECRET": secret},
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    written = [path for path in results.rglob("*") if path.is_file()]

    assert completed.returncode == 1, completed.stderr[-2000:]
    assert secret not in completed.stdout
    assert secret not in completed.stderr
    assert len(written) > 5
    assert any(b"***" in path.read_bytes() for path in written)  # it was there
    for path in written:
        assert secret.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("name", ["PATH", "DOCKER_CONFIG", "BUILDX_BUILDER", "A-B"])
def test_secret_argument_names_the_client_needs_are_refused(
    tmp_path: Path, name: str
) -> None:
    from buildfuzz.case import load_case
    from buildfuzz.errors import DataFileError

    case_file = tmp_path / "case.json"
    data = {"schema": 1, "build_args": {name: "env:MY_TOKEN"}}
    case_file.write_text(json.dumps(data))

    with pytest.raises(DataFileError, match=f"'{name}'.*rename the argument"):
        load_case(case_file)
    secrets.check_argument(name, "plain value")  # only secrets are passed so


def test_secret_argument_named_home_rejected(tmp_path: Path) -> None:
    profile = tmp_path / "bad.toml"
    profile.write_text('[build]\nbuild_args = [["HOME", "env:MY_TOKEN"]]\n')

    completed = buildfuzz("strategies", "--profile", str(profile), cwd=tmp_path)

    assert completed.returncode == 2
    assert "'HOME'" in completed.stderr
    assert "rename" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_secret_argument_whose_variable_is_unset_is_refused(tmp_path: Path) -> None:
    profile = tmp_path / "unset.toml"
    profile.write_text('[build]\nbuild_args = [["TOKEN", "env:BF_SURELY_UNSET"]]\n')
    results = tmp_path / "results"

    completed = buildfuzz(
        "run", "--budget", "10s", "--profile", str(profile),
        "--results", str(results), cwd=tmp_path,
    )  # fmt: skip

    assert completed.returncode == 2
    assert "variable BF_SURELY_UNSET, which is not set" in completed.stderr
    assert not results.exists()
