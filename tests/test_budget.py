"""Tests of duration and size parsing, and of the disk guard."""

import multiprocessing
import shutil
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildfuzz.budget import MAX_SECONDS, format_duration, parse_duration, parse_size
from buildfuzz.errors import UsageError


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("1h30m", 5400),
        ("2d", 172800),
        (" 5m ", 300),
        ("1d2h3m4s", 93784),
        ("1H30M", 5400),
        ("30d", MAX_SECONDS),
    ],
)
def test_valid_duration_parses(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["1x", "-5m", "0", "", "90", "0s", "31d", "   ", "m", "1.5h", "30m1h", "1h1h"],
)
def test_invalid_duration_names_value(text: str) -> None:
    with pytest.raises(UsageError) as raised:
        parse_duration(text)

    assert repr(text) in str(raised.value)
    assert "--budget" in str(raised.value)


def test_bare_number_suggests_unit() -> None:
    with pytest.raises(UsageError) as raised:
        parse_duration("90")

    assert "use a number with a unit" in str(raised.value)


def test_zero_duration_says_zero() -> None:
    with pytest.raises(UsageError) as raised:
        parse_duration("0h0m")

    assert "is zero" in str(raised.value)


def test_long_duration_names_limit() -> None:
    with pytest.raises(UsageError) as raised:
        parse_duration("720h1s")

    assert "longer than 30 days" in str(raised.value)


def test_error_names_given_option() -> None:
    with pytest.raises(UsageError) as raised:
        parse_duration("soon", option="--timeout")

    assert "--timeout" in str(raised.value)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (42, "42s"),
        (60, "1m"),
        (59.6, "1m"),
        (3600, "1h"),
        (3661, "1h1m1s"),
        (5400, "1h30m"),
        (90000, "25h"),
    ],
)
def test_duration_formats_short(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1, max_value=MAX_SECONDS))
def test_formatted_duration_parses_back(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2G", 2 * 2**30),
        ("500M", 500 * 2**20),
        ("1.5GiB", int(1.5 * 2**30)),
        ("10", 10),
    ],
)
def test_parse_size_accepts(text: str, expected: int) -> None:
    assert parse_size(text, option="--min-free") == expected


@pytest.mark.parametrize("text", ["", "2X", "-1G", "G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(UsageError, match="--min-free"):
        parse_size(text, option="--min-free")


def test_disk_guard_skips_huge_case(tmp_path) -> None:
    from buildfuzz.case import Case, ContextFile, FileKind
    from buildfuzz.session import EngineUnavailable
    from buildfuzz.worker import _disk_guard

    built = []
    guarded = _disk_guard(built.append, tmp_path, min_free=2**30)  # type: ignore[arg-type]
    free = shutil.disk_usage(tmp_path).free
    small = Case(files=(ContextFile("a", size=10),))
    # Sparse on disk here, but builders write its holes as data.
    huge = Case(files=(ContextFile("s", FileKind.SPARSE, size=free),))

    guarded(small)
    with pytest.raises(EngineUnavailable, match="not enough free disk"):
        guarded(huge)

    assert built == [small]


def _make_run_dir(base: str) -> bool:
    from pathlib import Path

    from buildfuzz.workdir import create_run_dir

    run_dir = create_run_dir(Path(base))
    time.sleep(0.5)  # while the others reap dead runs
    return run_dir.is_dir()


def test_concurrent_runs_keep_each_others_directories(tmp_path) -> None:
    """Each new run reaps dead runs; none may take another's new directory."""
    with multiprocessing.get_context("fork").Pool(8) as pool:
        still_there = pool.map(_make_run_dir, [str(tmp_path)] * 32)

    assert all(still_there)
