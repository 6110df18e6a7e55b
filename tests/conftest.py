"""Shared fixtures. Tests marked ``engine`` start real sandbox Docker engines."""

import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildfuzz.client import ClientTools
from buildfuzz.definitions import load_definitions
from buildfuzz.engine import SandboxEngine
from buildfuzz.install import CLIENT_TREE, engine_tree_name, ensure_installed
from buildfuzz.oracle_suite import OracleSettings, OracleSuite
from buildfuzz.packages import tree_path
from buildfuzz.rules import load_rules
from buildfuzz.session import Session
from buildfuzz.workdir import create_run_dir, remove_tree

REPO = Path(__file__).resolve().parent.parent
PROFILES = REPO / "tests" / "profiles"
BUILDFUZZ = [sys.executable, "-m", "buildfuzz"]


@pytest.fixture(scope="session")
def installed() -> None:
    """Make sure the engines and client are in the cache (downloads once)."""
    if os.geteuid() != 0:
        pytest.fail("engine tests need root: they start Docker daemons")
    definitions = load_definitions()
    ensure_installed(definitions, sorted(definitions.engines))


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short work directory: a unix socket path may not exceed 107 bytes."""
    base = Path(tempfile.mkdtemp(prefix="bft-", dir="/var/tmp"))
    yield base
    remove_tree(base)


@pytest.fixture
def run_dir(workdir: Path) -> Iterator[Path]:
    directory = create_run_dir(workdir)
    yield directory
    remove_tree(directory)


@pytest.fixture
def session(run_dir: Path) -> Iterator[Session]:
    """A session with the expected-failure rules and the tree oracle on."""
    definitions = load_definitions()
    made = Session(
        definitions,
        client_tools(run_dir),
        run_dir,
        rules=load_rules("expected"),
        build_timeout=300,
        oracles=OracleSuite(definitions, OracleSettings(tree=True)),
    )
    yield made
    made.close()


def start_engine(name: str, run_dir: Path) -> SandboxEngine:
    definitions = load_definitions()
    engine = SandboxEngine(
        definitions.engines[name], tree_path(engine_tree_name(name)), run_dir
    )
    engine.start()
    return engine


def client_tools(run_dir: Path) -> ClientTools:
    return ClientTools.prepare(tree_path(CLIENT_TREE), run_dir)


def buildfuzz(
    *arguments: str, cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """Run the buildfuzz command line as a user would, capturing its output."""
    return subprocess.run(
        [*BUILDFUZZ, *arguments],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
