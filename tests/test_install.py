"""The set-up lock: one buildfuzz at a time fills the cache."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from buildfuzz.install import cache_lock


def test_second_setup_waits_for_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUILDFUZZ_CACHE", str(tmp_path / "cache"))
    released = tmp_path / "released"
    holder = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from buildfuzz.install import cache_lock
        with cache_lock():
            print("held", flush=True)
            time.sleep(1)
            Path({str(released)!r}).write_text("yes")
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == "held\n"
        with cache_lock():
            # The holder wrote this file before it let go of the lock.
            assert released.read_text() == "yes"
    finally:
        process.wait(timeout=60)
    assert process.returncode == 0
    assert (tmp_path / "cache" / "setup.lock").is_file()
