"""``buildfuzz doctor`` and ``buildfuzz builders list`` on this machine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, buildfuzz


def run_with_cache(cache: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "buildfuzz", *arguments],
        cwd=REPO,
        env={**os.environ, "BUILDFUZZ_CACHE": str(cache)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.usefixtures("installed")
def test_doctor_passes_after_setup() -> None:
    completed = buildfuzz("doctor", cwd=REPO)

    assert completed.returncode == 0, completed.stdout
    assert "profile default: ready" in completed.stdout
    assert "engine 26.1" in completed.stdout


def test_doctor_names_fix_when_empty(tmp_path: Path) -> None:
    completed = run_with_cache(tmp_path / "empty", "doctor")

    assert completed.returncode == 1
    assert "NOT ready" in completed.stdout
    assert "buildfuzz setup" in completed.stdout
    # Optional: only SBOM cases need syft, and it is built on the first one.
    assert "syft (SBOM generator)" in completed.stdout
    assert "compiles it from the Go module proxy" in completed.stdout


@pytest.mark.usefixtures("installed")
def test_builders_list_shows_usable_matrix() -> None:
    completed = buildfuzz("builders", "list", cwd=REPO)
    rows = {
        " ".join(cell.strip() for cell in line.split("│")[1:3]): line
        for line in completed.stdout.splitlines()
        if "│" in line
    }

    assert completed.returncode == 0
    for name in (
        "engine 26.1",
        "engine 20.10",
        "engine option 26.1 storage overlay2",
        "engine option 26.1 storage vfs",
        "engine option 20.10 storage vfs",
        "engine option 26.1 containerd image store",
        "builder classic",
        "builder buildx-docker",
    ):
        assert name in rows, name
        assert "│ yes" in rows[name], rows[name]


def test_builders_list_says_why_not(tmp_path: Path) -> None:
    completed = run_with_cache(tmp_path / "empty", "builders", "list")

    assert completed.returncode == 0
    assert "not downloaded" in completed.stdout


@pytest.mark.usefixtures("installed")
def test_builders_list_shows_two_buildx_versions() -> None:
    completed = buildfuzz("builders", "list", cwd=REPO)

    assert "buildx 0.13.1" in completed.stdout
    assert "buildx v0.38.2" in completed.stdout
