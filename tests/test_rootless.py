"""Rootless engines: dockerd run by the user buildfuzz under RootlessKit."""

import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from buildfuzz import campaign, rootless
from buildfuzz.case import Case, ContextFile, FileKind
from buildfuzz.definitions import load_definitions
from buildfuzz.errors import DataFileError, EngineError, UsageError
from buildfuzz.replay import Replayer
from buildfuzz.rules import load_rules
from buildfuzz.session import Session
from buildfuzz.strategies import BUSYBOX_IMAGE
from buildfuzz.workdir import create_run_dir, remove_tree
from tests.conftest import client_tools
from tests.test_dind import write_engines
from tests.test_engine import mounts_under, processes_under

ENGINES = ("rootless-26.1", "rootless-20.10")


def test_subid_ranges_summed(tmp_path: Path) -> None:
    subuid = tmp_path / "subuid"
    subuid.write_text(
        "alice:100000:65536\nbuildfuzz:1000000:30000\n999:2000000:40000\nbad line\n"
    )
    assert rootless.subid_count(subuid, "buildfuzz", 999) == 70000
    assert rootless.subid_count(subuid, "bob", 1234) == 0
    assert rootless.subid_count(tmp_path / "missing", "buildfuzz", 999) == 0


def test_missing_user_reported() -> None:
    problem = rootless.rootless_problem("no-such-user-bf")
    assert problem is not None
    assert problem.startswith("user no-such-user-bf does not exist")
    assert "./dev.sh" in problem


def test_closed_ancestor_named() -> None:
    account = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(dir="/tmp"))  # /tmp lets everyone pass
    try:
        closed = top / "closed"
        inner = closed / "open" / "engine"
        inner.mkdir(parents=True)
        top.chmod(0o755)
        closed.chmod(0o700)
        assert rootless.closed_ancestor(inner, account) == closed
        closed.chmod(0o711)
        assert rootless.closed_ancestor(inner, account) is None
    finally:
        remove_tree(top)


@pytest.mark.parametrize(
    "text",
    [
        '[engines.x]\nsource = "dind"\nhost = "26.1"\nrelease = "trixie"\n'
        "rootless = true\n",
        '[engines.x]\npackages = [{ suite = "trixie", names = ["docker.io"] }]\n'
        'rootless = "yes"\n',
    ],
)
def test_bad_rootless_definitions(tmp_path: Path, text: str) -> None:
    write_engines(tmp_path / "b", text)
    with pytest.raises(DataFileError, match="rootless must be true or false"):
        load_definitions(tmp_path / "b")


def test_rootless_builders_limited() -> None:
    definitions = load_definitions()
    for name in ENGINES:
        assert definitions.engines[name].rootless
        assert not campaign._fits_engine(definitions, name, "container-v0-34")
        assert campaign._fits_engine(definitions, name, "classic")
        assert campaign._fits_engine(definitions, name, "buildx-docker")
        assert not campaign._reaches_loopback(definitions.engines[name])


def test_workdir_mode_kept(tmp_path: Path) -> None:
    """A --workdir that exists, such as /var/tmp, is never made private."""
    tmp_path.chmod(0o1777)
    run_dir = create_run_dir(tmp_path)
    try:
        assert tmp_path.stat().st_mode & 0o7777 == 0o1777
        assert run_dir.stat().st_mode & 0o777 == 0o700
    finally:
        remove_tree(run_dir)
    fresh = tmp_path / "new" / "base"
    remove_tree(create_run_dir(fresh))
    assert fresh.stat().st_mode & 0o777 == 0o711


@pytest.fixture
def open_workdir() -> Iterator[Path]:
    """A work directory that the user buildfuzz may pass through."""
    base = Path(tempfile.mkdtemp(prefix="bfr-", dir="/var/tmp"))
    base.chmod(0o711)
    yield base
    remove_tree(base)


def _session(run_dir: Path) -> Session:
    rules = load_rules("expected")
    return Session(
        load_definitions(),
        client_tools(run_dir),
        run_dir,
        rules=rules,
        build_timeout=300,
    )


CASE = Case(
    files=(ContextFile("a", size=513, uid=1000, gid=1000),),
    dockerfile=(
        f"FROM {BUSYBOX_IMAGE}",
        "COPY a /a",
        "RUN test $(id -u) = 0 && wc -c /a && stat -c %u /a",
    ),
)


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("name", ENGINES)
def test_rootless_engine_builds_cleanly(name: str, open_workdir: Path) -> None:
    """Both builders build on the rootless daemon; nothing is left afterwards."""
    assert rootless.rootless_problem() is None, "run ./dev.sh to set up the user"
    run_dir = create_run_dir(open_workdir)
    session = _session(run_dir)
    case = CASE.with_changes(engine=name)
    try:
        records = [
            session.execute(case.with_changes(builder=builder))
            for builder in ("buildx-docker", "classic")
        ]
        engine = session.engine(case)
        assert isinstance(engine, rootless.RootlessEngine)
        info = subprocess.run(
            [
                "docker", "--host", engine.host, "info", "--format",
                "{{json .SecurityOptions}}",
            ],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        daemons = [psutil.Process(pid) for pid in processes_under(run_dir)]
        owners = {
            p.uids().real for p in daemons if p.name() in ("dockerd", "rootlesskit")
        }
    finally:
        session.close()

    for record in records:
        assert record.evaluation.verdict == "pass", record.result.log[-1500:]
    assert "rootless" in info
    assert owners == {pwd.getpwnam(rootless.USER).pw_uid}
    assert processes_under(run_dir) == []
    assert mounts_under(run_dir) == []
    assert not engine.directory.exists()
    remove_tree(run_dir)


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_rootless_device_rules(open_workdir: Path) -> None:
    """Check that two rules explain device nodes, which rootless daemons cannot make."""
    run_dir = create_run_dir(open_workdir)
    session = _session(run_dir)
    case = Case(
        engine="rootless-26.1",
        files=(ContextFile("dev", kind=FileKind.CHAR_DEVICE, major=1, minor=3),),
        dockerfile=("FROM scratch", "COPY . /"),
    )
    try:
        records = [
            session.execute(case.with_changes(builder=builder))
            for builder in ("buildx-docker", "classic")
        ]
    finally:
        session.close()
        remove_tree(run_dir)
    rules = ["rootless-device-node", "rootless-classic-device-lchown"]
    for record, rule in zip(records, rules, strict=True):
        evaluation = record.evaluation
        assert evaluation.verdict == "expected", record.result.log[-1500:]
        assert evaluation.rule == rule


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_closed_workdir_named() -> None:
    """A work directory the user cannot enter stops the engine with the fix."""
    base = Path(tempfile.mkdtemp(prefix="bfc-", dir="/var/tmp"))
    run_dir = create_run_dir(base / "w")
    base.chmod(0o700)
    definitions = load_definitions()
    from buildfuzz.dind import sandbox_engine
    from buildfuzz.install import engine_tree

    engine = sandbox_engine(
        definitions.engines["rootless-26.1"],
        engine_tree(definitions, "rootless-26.1"),
        run_dir,
    )
    try:
        with pytest.raises(EngineError, match=f"cannot enter {base} \\(mode 0700\\)"):
            engine.start()
    finally:
        engine.stop()
        remove_tree(base)
    assert not base.exists()


def test_replay_names_missing_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay stops before building when the machine lacks what the case needs."""
    replayer = Replayer(build_timeout=60)
    monkeypatch.setattr("buildfuzz.replay.rootless_problem", lambda: "no user")
    with pytest.raises(UsageError, match="needs a rootless engine: no user"):
        replayer.check(CASE.with_changes(engine="rootless-26.1"))
    replayer.check(CASE.with_changes(engine="26.1"))

    monkeypatch.setattr(
        "buildfuzz.replay.missing_emulation", lambda platform: f"{platform} no qemu"
    )
    with pytest.raises(UsageError, match="linux/s390x no qemu"):
        replayer.check(CASE.with_changes(platform="linux/s390x"))
    replayer.check(Case(platform="linux/s390x"))  # no RUN step, no emulation
