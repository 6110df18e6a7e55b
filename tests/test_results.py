"""Tests of the results directory: findings, atomic writes and the lock."""

import json
import os
import stat
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from buildfuzz.errors import ResultsError
from buildfuzz.results import (
    FORMAT_FILE,
    LOCK_FILE,
    RESULTS_FORMAT,
    FindingRecord,
    ResultsStore,
    write_atomic,
)
from tests.conftest import REPO, buildfuzz

RECORD = FindingRecord(
    id="0123456789ab",
    phase="context",
    message='failed to read "<q>": not found',
    oracle="build-failed",
    builder="buildx-docker",
    engine="26.1",
    count=1,
    first_seen="2024-01-02T03:04:05+00:00",
    last_seen="2024-01-02T03:04:05+00:00",
    shrunk=True,
    shrink_complete=False,
    shrink_builds=17,
    reproduced=3,
    attempts=3,
    seed=42,
    profile="default",
)


@pytest.fixture
def store(tmp_path: Path):
    opened = ResultsStore(tmp_path / "results").open()
    yield opened
    opened.close()


def test_record_round_trips(store: ResultsStore) -> None:
    store.write(RECORD, {})

    assert store.load(RECORD.id) == RECORD


def test_write_creates_finding_files(store: ResultsStore) -> None:
    files = {"case.json": "{}\n", "build.log": b"\xff\x00raw", "repro.sh": "#!\n"}

    directory = store.write(RECORD, files)

    assert directory == store.root / RECORD.id
    assert (directory / "case.json").read_text() == "{}\n"
    assert (directory / "build.log").read_bytes() == b"\xff\x00raw"
    assert json.loads((directory / "finding.json").read_text()) == asdict(RECORD)


def test_repro_script_is_executable(store: ResultsStore) -> None:
    directory = store.write(RECORD, {"repro.sh": "#!/bin/sh\n", "case.json": "{}"})

    assert stat.S_IMODE((directory / "repro.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((directory / "case.json").stat().st_mode) == 0o644


def test_write_leaves_no_temporary_files(store: ResultsStore) -> None:
    store.write(RECORD, {"case.json": "{}", "build.log": "log"})
    store.seen_again(RECORD.id)

    assert sorted(os.listdir(store.root)) == sorted([FORMAT_FILE, LOCK_FILE, RECORD.id])
    assert sorted(os.listdir(store.root / RECORD.id)) == [
        "build.log",
        "case.json",
        "finding.json",
    ]


def test_atomic_write_replaces_file(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")
    inode = path.stat().st_ino

    write_atomic(path, "new \udcff", mode=0o600)

    assert path.read_bytes() == b"new \xff"
    assert path.stat().st_ino != inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(tmp_path) == ["f.txt"]


def test_failed_atomic_write_keeps_old(tmp_path: Path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("old")

    with pytest.raises(TypeError):
        write_atomic(path, 12345)  # type: ignore[arg-type]

    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f.txt"]


def test_open_writes_format_marker(store: ResultsStore) -> None:
    marker = store.root / FORMAT_FILE

    assert marker.read_text() == f"{RESULTS_FORMAT}\n"


def test_second_open_is_locked_out(store: ResultsStore) -> None:
    second = ResultsStore(store.root)

    with pytest.raises(ResultsError) as raised:
        second.open()

    assert str(store.root) in str(raised.value)
    assert "in use by another buildfuzz run" in str(raised.value)


def test_lock_is_released_on_close(tmp_path: Path) -> None:
    first = ResultsStore(tmp_path).open()
    first.close()

    second = ResultsStore(tmp_path).open()

    with pytest.raises(ResultsError):
        ResultsStore(tmp_path).open()
    second.close()


def test_other_format_is_rejected(tmp_path: Path) -> None:
    (tmp_path / FORMAT_FILE).write_text("99\n")
    before = sorted(os.listdir(tmp_path))

    with pytest.raises(ResultsError) as raised:
        ResultsStore(tmp_path).open()

    assert "format '99'" in str(raised.value)
    assert "use another --results directory" in str(raised.value)
    assert sorted(os.listdir(tmp_path)) == before
    assert (tmp_path / FORMAT_FILE).read_text() == "99\n"


def test_file_path_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "results"
    path.write_text("not a directory")

    with pytest.raises(ResultsError) as raised:
        ResultsStore(path).open()

    assert "is not a directory" in str(raised.value)
    assert path.read_text() == "not a directory"


def test_missing_parents_are_created(tmp_path: Path) -> None:
    root = tmp_path / "a" / "b" / "results"

    store = ResultsStore(root).open()
    store.close()

    assert (root / FORMAT_FILE).exists()


def test_seen_again_counts_sighting(store: ResultsStore) -> None:
    store.write(RECORD, {})

    updated = store.seen_again(RECORD.id)

    assert updated is not None
    assert updated.count == 2
    assert updated.last_seen != RECORD.last_seen
    assert updated.first_seen == RECORD.first_seen
    assert store.load(RECORD.id) == updated


def test_seen_again_ignores_unknown(store: ResultsStore) -> None:
    assert store.seen_again("nosuch") is None


def test_load_unknown_gives_none(store: ResultsStore) -> None:
    assert store.load("nosuch") is None


def test_findings_lists_records(store: ResultsStore) -> None:
    second = replace(RECORD, id="ba9876543210", phase="solve")
    store.write(second, {})
    store.write(RECORD, {})
    (store.root / "not-a-finding").mkdir()

    assert store.findings() == [RECORD, second]


def test_corrupt_finding_is_reported(store: ResultsStore) -> None:
    directory = store.write(RECORD, {})
    (directory / "finding.json").write_text("{not json")

    with pytest.raises(ResultsError) as raised:
        store.load(RECORD.id)

    assert "cannot read finding" in str(raised.value)


@pytest.mark.parametrize("text", ['{"id": "x", "colour": "red"}', "[]"])
def test_malformed_finding_is_reported(store: ResultsStore, text: str) -> None:
    directory = store.write(RECORD, {})
    (directory / "finding.json").write_text(text)

    with pytest.raises(ResultsError) as raised:
        store.load(RECORD.id)

    assert str(directory / "finding.json") in str(raised.value)
    assert store.findings() == []  # listed without it, with a warning


def test_run_stops_on_damaged_finding_before_writing(tmp_path: Path) -> None:
    store = ResultsStore(tmp_path / "results").open()
    directory = store.write(RECORD, {})
    store.close()
    (directory / "finding.json").write_text('{"id": "22a4')
    before = sorted(path.name for path in store.root.rglob("*"))

    completed = buildfuzz(
        "run", "--budget", "1m", "--results", str(store.root), cwd=REPO, timeout=120
    )

    assert completed.returncode == 2, completed.stderr[-2000:]
    assert f"{directory / 'finding.json'}: cannot read finding" in completed.stderr
    assert "engine started" not in completed.stderr
    assert sorted(path.name for path in store.root.rglob("*")) == before
