"""Context files that change while the client sends the build context."""

import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildfuzz import churn
from buildfuzz.case import Case, ContextFile, FileKind
from buildfuzz.definitions import load_definitions
from buildfuzz.oracle_model import context_sources
from buildfuzz.repro import render_repro
from buildfuzz.rules import load_rules
from buildfuzz.session import Session
from buildfuzz.signature import Phase, Signature
from buildfuzz.workdir import create_run_dir, remove_tree
from tests.conftest import client_tools

FILES = (
    ContextFile("dir", kind=FileKind.DIR),
    ContextFile("z.log", size=100),
    ContextFile("b.log", size=200),
    ContextFile("link", kind=FileKind.HARDLINK, target="b.log"),
)


def test_target_is_first_regular_file() -> None:
    assert churn.churn_target(FILES) == "b.log"
    assert churn.churn_target(FILES[:1]) is None


def test_model_leaves_churned_content_open() -> None:
    sources = context_sources(Case(files=FILES, churn="append"))
    for path in ("b.log", "link"):
        assert sources[path].size is None
        assert sources[path].digest is None
    assert sources["z.log"].size == 100
    assert context_sources(Case(files=FILES))["b.log"].size == 200


def _churn(case: Case, directory: Path, seconds: float) -> churn.ContextChurn:
    with churn.ContextChurn(case, directory) as running:
        subprocess.run(["sleep", str(seconds)], check=True)
    return running


def test_append_grows_the_file(tmp_path: Path) -> None:
    (tmp_path / "b.log").write_bytes(b"x" * 200)
    running = _churn(Case(files=FILES, churn="append"), tmp_path, 0.2)
    assert running.changes > 0
    assert running.error is None
    size = (tmp_path / "b.log").stat().st_size
    assert size == 200 + running.changes * len(churn.BLOCK)


def test_rewrite_never_grows_the_file(tmp_path: Path) -> None:
    (tmp_path / "b.log").write_bytes(b"x" * 100_000)
    running = _churn(Case(files=FILES, churn="rewrite"), tmp_path, 0.2)
    assert running.changes > 0
    assert (tmp_path / "b.log").stat().st_size <= 100_000


def test_unwritable_target_is_noted(tmp_path: Path) -> None:
    (tmp_path / "b.log").mkdir()  # a directory where the file should be
    running = _churn(Case(files=FILES, churn="append"), tmp_path, 0.05)
    assert isinstance(running.error, IsADirectoryError)


@pytest.mark.parametrize("mode", ["append", "rewrite"])
def test_repro_changes_the_file(mode: str, tmp_path: Path) -> None:
    case = Case(files=FILES, churn=mode, builder="classic")
    script = render_repro(case, Signature(Phase.CONTEXT, "x"), timeout=60)
    assert "churn=$!" in script
    assert 'kill "$churn"' in script
    (tmp_path / "repro.sh").write_text(script)
    checked = subprocess.run(
        ["bash", "-n", str(tmp_path / "repro.sh")], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


@pytest.fixture
def run_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="bfc-", dir="/var/tmp"))
    directory = create_run_dir(base)
    yield directory
    remove_tree(base)


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_churned_builds_pass_or_fail_clearly(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each build passes or fails with the rule's message; the file changed."""
    changes: list[int] = []
    finish = churn.ContextChurn.__exit__

    def counted(self: churn.ContextChurn, *details: object) -> None:
        finish(self, *details)  # type: ignore[arg-type]
        changes.append(self.changes)

    monkeypatch.setattr(churn.ContextChurn, "__exit__", counted)
    session = Session(
        load_definitions(),
        client_tools(run_dir),
        run_dir,
        rules=load_rules("expected"),
        build_timeout=300,
    )
    files = (ContextFile("a.log", size=4 << 20), ContextFile("b", size=3))
    verdicts = []
    try:
        for builder in ("buildx-docker", "classic"):
            for mode in ("append", "rewrite"):
                case = Case(
                    builder=builder,
                    churn=mode,
                    files=files,
                    dockerfile=("FROM scratch", "COPY . /"),
                )
                record = session.execute(case)
                verdicts.append(
                    (builder, mode, record.evaluation.verdict, record.evaluation.rule)
                )
                assert record.evaluation.verdict in ("pass", "expected"), (
                    record.result.log[-1500:]
                )
    finally:
        session.close()
    assert all(count > 0 for count in changes), changes
    for builder, _mode, verdict, rule in verdicts:
        if verdict == "expected":
            assert (builder, rule) == ("classic", "context-changed-while-sent")
