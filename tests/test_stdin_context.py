"""Contexts from stdin: a tar on stdin (docker build -) or the Dockerfile on
stdin (--file -); the case field, profile key, repro.sh and real builds."""

import json
import subprocess
from pathlib import Path

import pytest

from buildfuzz.build import tar_command
from buildfuzz.case import (
    Case,
    ContextFile,
    FileKind,
    Output,
    case_from_dict,
    load_case,
)
from buildfuzz.context import materialize
from buildfuzz.errors import DataFileError
from buildfuzz.minimize import simplifications
from buildfuzz.oracle_model import Unmodelled, expected_tree
from buildfuzz.profile import load_profile
from buildfuzz.repro import build_command, render_repro
from buildfuzz.session import Session
from buildfuzz.signature import Phase, Signature
from buildfuzz.strategies import Target
from buildfuzz.verdict import Verdict
from tests.conftest import buildfuzz, client_tools, start_engine

T = 1_700_000_000_123_456_789
FILES = (
    ContextFile("a", size=513, mode=0o755, mtime_ns=T, seed=1),
    ContextFile("d", FileKind.DIR, mode=0o750, mtime_ns=T),
    ContextFile("d/f", size=3, mtime_ns=T, seed=2, xattrs=(("user.a", "1"),)),
    ContextFile("s", FileKind.SYMLINK, target="a", mtime_ns=T),
)


def test_case_round_trips_context_from() -> None:
    case = Case(context_from="stdin-tar")

    assert case_from_dict(json.loads(case.to_json())) == case
    assert "context_from" not in Case().to_dict()


def test_case_rejects_unknown_source(tmp_path: Path) -> None:
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"schema": 1, "context_from": "stdin"}))

    with pytest.raises(DataFileError, match="context_from must be one of .*'stdin'"):
        load_case(path)


def test_tar_context_names_dockerfile_inside() -> None:
    case = Case(context_from="stdin-tar", dockerfile_name="docker/Dockerfile")

    words = build_command(case, classic=True)

    assert words[-3:] == ["--file", "docker/Dockerfile", "-"]


def test_stdin_dockerfile_reads_file_dash() -> None:
    case = Case(context_from="stdin-dockerfile", dockerfile_name="docker/Dockerfile")

    assert case.option_arguments("/c") == ["--file", "-"]
    assert case.context_argument("/c") == "/c"


def test_profile_rejects_unknown_source(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[build]\ncontext_from = ["", "pipe"]\n')

    completed = buildfuzz("strategies", "--profile", str(path), cwd=tmp_path)

    assert completed.returncode == 2
    assert "build.context_from: unknown value 'pipe'" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("name", ["default", "nightly"])
def test_profiles_draw_stdin_contexts(name: str) -> None:
    pool = load_profile(name).build.context_from

    assert set(pool) == {"", "stdin-tar", "stdin-dockerfile"}
    assert pool[0] == ""


def test_model_skips_stdin_contexts() -> None:
    case = Case(files=FILES, dockerfile=("FROM scratch", "COPY . /ctx/"))

    expected_tree(case)
    with pytest.raises(Unmodelled, match="context from stdin"):
        expected_tree(case.with_changes(context_from="stdin-tar"))


def test_minimizer_resets_context_from() -> None:
    case = Case(context_from="stdin-dockerfile")
    targets = (Target("26.1", "buildx-docker"),)

    steps = dict(simplifications(case, Case(), load_profile("default"), targets))

    assert steps["reset context_from"].context_from == ""


def test_tar_starts_with_plain_header(tmp_path: Path) -> None:
    """The docker CLI reads the first 512 bytes as a tar header to tell a tar
    from a Dockerfile, so the first member must need no pax header."""
    case = Case(files=FILES)
    context = materialize(case, tmp_path / "context")

    data = subprocess.run(tar_command(context), capture_output=True, check=True).stdout

    assert data[156:157] != b"x"  # no pax extended header first
    assert data[257:262] == b"ustar"
    assert b"user.a" in data  # xattrs still go in pax headers


@pytest.mark.parametrize("source", ["stdin-tar", "stdin-dockerfile"])
def test_repro_feeds_stdin(tmp_path: Path, source: str) -> None:
    case = Case(context_from=source, builder="classic")

    script = render_repro(case, Signature(Phase.SOLVE, "x"), timeout=60)

    build = next(line for line in script.splitlines() if "timeout 60" in line)
    if source == "stdin-tar":
        assert build.startswith("tar --create --file=- ")
        assert '--directory "$ctx" . 2> "$work/tar.log" | DOCKER_BUILDKIT=0' in build
    else:
        assert '--file - "$ctx" < "$ctx"/$\'Dockerfile\' >' in build
    path = tmp_path / "repro.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0


# --- on real engines -----------------------------------------------------------


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("builder", ["buildx-docker", "classic", "container-v0-34"])
def test_stdin_contexts_build(session: Session, builder: str) -> None:
    """Each source builds on each kind of builder; a 64 MiB file goes
    through the tar pipe; the tree oracle notes that it does not compare."""
    files = (*FILES, ContextFile("big", size=64 << 20, mtime_ns=T, seed=3))
    records = {}
    for source in ("stdin-tar", "stdin-dockerfile"):
        case = Case(
            files=files,
            dockerfile=("FROM scratch", "COPY . /ctx/", "COPY d/f /picked/"),
            dockerfile_name="docker/Dockerfile",
            builder=builder,
            context_from=source,
            output=Output.LOAD if builder == "classic" else Output.TAR,
        )
        records[source] = session.execute(case)

    for source, record in records.items():
        result = record.result
        assert record.evaluation.verdict is Verdict.PASS, (source, result.log[-1500:])
        assert any("context from stdin" in note for note in result.notes), source


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_repro_reproduces_stdin_cases(run_dir: Path) -> None:
    """A missing source fails the same way through repro.sh's pipe and
    redirect, on the docker driver and the classic builder."""
    signatures = {
        "buildx-docker": Signature(Phase.SOLVE, '"/missing-file": not found'),
        "classic": Signature(Phase.SOLVE, "COPY failed: file not found in build"),
    }
    scripts = []
    for builder, signature in signatures.items():
        for source in ("stdin-tar", "stdin-dockerfile"):
            case = Case(
                files=FILES,
                dockerfile=("FROM scratch", "COPY a /a", "COPY missing-file /x"),
                builder=builder,
                context_from=source,
            )
            script = run_dir / f"{builder}-{source}.sh"
            script.write_text(render_repro(case, signature, timeout=120))
            scripts.append(script)
    engine = start_engine("26.1", run_dir)
    tools = client_tools(run_dir)
    try:
        runs = [
            subprocess.run(
                ["bash", str(script)],
                env={
                    "PATH": f"{tools.cli.parent}:/usr/bin:/bin",
                    "DOCKER_HOST": engine.host,
                    "DOCKER_CONFIG": str(tools.config_dir),
                    "HOME": str(run_dir),
                },
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            for script in scripts
        ]
    finally:
        engine.stop()

    for script, completed in zip(scripts, runs, strict=True):
        assert completed.returncode == 0, (script.name, completed.stdout[-1500:])
