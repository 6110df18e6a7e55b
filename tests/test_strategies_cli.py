"""Tests of `buildfuzz strategies`: a profile's axes, pools and hit counts."""

import json
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from buildfuzz.case import BulkRecipe, Case, ContextFile, FileKind, Output
from buildfuzz.cli import app
from buildfuzz.profile import available_profiles, load_profile
from buildfuzz.runlog import RUNS_DIR, axis_values
from buildfuzz.strategies_cli import AXES, hit_counts, pool, render

RUNNER = CliRunner()


def section(lines: list[str], heading: str) -> list[str]:
    """Return the value lines under the heading that starts with ``heading``."""
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    values = []
    for line in lines[start + 1 :]:
        if not line.startswith("  "):
            break
        values.append(line.strip())
    return values


def write_run(results: Path, cases: list[Case], phase: str = "fuzz") -> None:
    runs = results / RUNS_DIR
    runs.mkdir(parents=True, exist_ok=True)
    with (runs / "20260101T000000Z-1.jsonl").open("a") as stream:
        for case in cases:
            line = {"time": 1.0, "phase": phase, "verdict": "pass"}
            line["axes"] = axis_values(case)
            stream.write(json.dumps(line) + "\n")


CASES = [
    Case(
        files=(
            ContextFile("a", FileKind.CHAR_DEVICE, major=0, minor=0),
            ContextFile("b.txt", size=512, xattrs=(("user.buildfuzz", "value"),)),
            ContextFile("s", FileKind.SYMLINK, target="../outside"),
            ContextFile("t", FileKind.SYMLINK, target="../a"),
        ),
        bulk=BulkRecipe(count=100, sizes=(4096, 65536), depth=4, seed=1),
        dockerfile=("FROM scratch AS stage0", "COPY . /ctx/"),
        target="stage0",
        no_cache=True,
        tags=("buildfuzz-case:second",),
    ),
    Case(dockerfile=("FROM scratch", "COPY . /ctx/"), output=Output.TAR),
]


@pytest.mark.parametrize("name", available_profiles())
def test_every_axis_is_listed(name: str) -> None:
    profile = load_profile(name)

    lines = render(profile, None)

    for axis in AXES:
        heading = f"{axis.section}.{axis.key}" if axis.section else axis.key
        assert any(line.startswith(heading + " ") for line in lines), heading


def test_pools_in_profile_order() -> None:
    lines = render(load_profile("default"), None)

    assert section(lines, "context.devices") == ["1:3", "0:0", "7:0"]
    assert section(lines, "build.targets") == ["(none)", "first"]
    assert section(lines, "context.bulk_files") == ["0", "100"]
    assert section(lines, "dockerfile.paths")[0] == "Dockerfile"
    assert section(lines, "context.names")[8:10] == ["non-\\xffutf8", '"trailing "']


def test_hit_counts_come_from_run_logs(tmp_path: Path) -> None:
    write_run(tmp_path, CASES)
    write_run(tmp_path, CASES, phase="shrink")

    completed = RUNNER.invoke(app, ["strategies", "--results", str(tmp_path)])

    assert completed.exit_code == 0, completed.output
    lines = completed.output.splitlines()
    assert section(lines, "context.devices") == ["1:3  0", "0:0  1", "7:0  0"]
    assert section(lines, "context.bulk_files") == ["0    1", "100  1"]
    assert section(lines, "build.targets") == ["(none)  1", "first   1"]
    assert section(lines, "build.no_cache") == ["false  1", "true   1"]
    assert section(lines, "build.outputs") == ["load   1", "tar    1", "local  0"]
    xattrs = section(lines, "context.xattrs")
    assert xattrs[1].split() == ["user.buildfuzz=value", "1"]


def test_generated_targets_count_as_empty() -> None:
    profile = load_profile("default")
    axis = next(a for a in AXES if a.key == "symlink_targets")
    counts = Counter({"../outside": 2, "../a": 3, "missing": 1})

    hits = hit_counts(profile, axis, counts)

    assert dict(zip(pool(profile, axis), hits, strict=True)) == {
        "": 3,
        "missing": 1,
        "/etc/passwd": 0,
        "../outside": 2,
        ".": 0,
    }


def test_profile_option_picks_profile() -> None:
    completed = RUNNER.invoke(app, ["strategies", "--profile", "context"])

    assert completed.exit_code == 0, completed.output
    assert completed.output.startswith("profile context: ")
    assert "copy-root" in completed.output


def test_unknown_profile_is_one_line_error() -> None:
    completed = RUNNER.invoke(app, ["strategies", "--profile", "nosuch"])

    assert completed.exit_code == 2
    assert "profile 'nosuch' not found" in completed.output


def test_missing_results_is_one_line_error(tmp_path: Path) -> None:
    completed = RUNNER.invoke(
        app, ["strategies", "--results", str(tmp_path / "nosuch")]
    )

    assert completed.exit_code == 2
    assert "not found" in completed.output


def test_raw_byte_names_are_printable() -> None:
    lines = render(load_profile("nightly"), None)

    names = section(lines, "context.names")
    assert "non-\\xffutf8" in names
    assert "new\\nline" in names


def test_sequence_settings_listed() -> None:
    from buildfuzz.strategies_cli import render

    assert render(load_profile("nightly"), None)[-1] == (
        "sequences: 0.2 of the budget, at most 8 steps each"
    )
    assert render(load_profile("default"), None)[-1] == "sequences: off"
