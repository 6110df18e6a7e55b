"""Cases whose docker client runs as the unprivileged user buildfuzz."""

import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from buildfuzz import client_user
from buildfuzz.case import Case, ContextFile, FileKind, Output
from buildfuzz.definitions import load_definitions
from buildfuzz.errors import DataFileError
from buildfuzz.profile import load_profile
from buildfuzz.repro import render_repro
from buildfuzz.rules import load_rules, matching_rule, option_listing
from buildfuzz.session import Session
from buildfuzz.signature import Phase, Signature
from buildfuzz.strategies import BUSYBOX_IMAGE
from buildfuzz.verdict import Verdict
from buildfuzz.workdir import create_run_dir, remove_tree
from tests.conftest import client_tools, start_engine

USER = client_user.USER


def test_client_user_in_rule_options() -> None:
    assert "--client-user=buildfuzz" in option_listing(Case(client_user=USER))
    assert "--client-user" not in option_listing(Case())


def test_unknown_client_user_rejected(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('[build]\nclient_users = ["", "alice"]\n')
    with pytest.raises(DataFileError, match="alice"):
        load_profile(str(profile))


def test_repro_runs_client_as_user() -> None:
    case = Case(client_user=USER, builder="classic")
    script = render_repro(case, Signature(Phase.CONTEXT, "x"), timeout=60)
    assert f"setpriv --reuid={USER} --regid={USER} --init-groups" in script
    assert f'chown {USER} "$work" "$work/home"' in script


def test_closed_workdir_leaves_user_clients_out() -> None:
    base = Path(tempfile.mkdtemp(prefix="bfu-", dir="/var/tmp"))
    try:
        problem = client_user.user_client_problem(base / "work")
        assert problem is not None
        assert f"cannot enter {base}" in problem
        base.chmod(0o711)
        assert client_user.user_client_problem(base / "work") is None
    finally:
        remove_tree(base)


@pytest.fixture
def run_dir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="bfu-", dir="/var/tmp"))
    base.chmod(0o711)  # the user passes through the work directory
    directory = create_run_dir(base)
    yield directory
    remove_tree(base)


READABLE = (ContextFile("a", size=10, mode=0o644),)
UNREADABLE = (
    ContextFile("a", size=10, mode=0o644),
    ContextFile("private", kind=FileKind.DIR, mode=0o700),
    ContextFile("private/key", size=5, mode=0o600),
)


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("builder", ["buildx-docker", "classic"])
def test_user_client_builds_as_user(builder: str, run_dir: Path) -> None:
    """The user's client builds readable contexts and fails on unreadable ones."""
    assert client_user.user_exists(), "run ./dev.sh to create the user"
    session = Session(
        load_definitions(),
        client_tools(run_dir),
        run_dir,
        rules=load_rules("expected"),
        build_timeout=300,
    )
    owners: list[int] = []
    # The classic builder only loads; the tar shows who wrote the output.
    output = Output.LOAD if builder == "classic" else Output.TAR
    base = Case(
        builder=builder,
        output=output,
        dockerfile=(f"FROM {BUSYBOX_IMAGE}", "COPY . /ctx/", "RUN ls -lan /ctx"),
    )
    try:
        readable = session.execute(base.with_changes(files=READABLE, client_user=USER))
        if output is Output.TAR:
            runner = session._runners[session.engine(base).label]
            runner.run(
                base.with_changes(files=READABLE, client_user=USER),
                lambda result, case_dir: owners.append(
                    (case_dir / "rootfs.tar").stat().st_uid
                ),
            )
        unreadable = session.execute(
            base.with_changes(files=UNREADABLE, client_user=USER)
        )
        as_root = session.execute(base.with_changes(files=UNREADABLE))
    finally:
        session.close()

    assert readable.evaluation.verdict == "pass", readable.result.log[-1500:]
    if output is Output.TAR:
        assert owners == [pwd.getpwnam(USER).pw_uid]
    assert unreadable.evaluation.verdict == "expected", unreadable.result.log[-1500:]
    assert unreadable.evaluation.rule == "client-unreadable-context"
    assert as_root.evaluation.verdict == "pass", as_root.result.log[-1500:]


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_user_client_repro_reproduces(run_dir: Path) -> None:
    """repro.sh runs the client as the user and reproduces the failure."""
    session = Session(
        load_definitions(),
        client_tools(run_dir),
        run_dir,
        rules=(),
        build_timeout=300,
    )
    case = Case(
        builder="classic",
        client_user=USER,
        files=UNREADABLE,
        dockerfile=("FROM scratch", "COPY . /"),
    )
    try:
        record = session.execute(case)
        signature = record.evaluation.signature
        assert signature is not None, record.result.log[-1500:]
        engine = session.engine(case)
        # The user runs docker from PATH: a copy in a directory it can enter.
        open_dir = Path(tempfile.mkdtemp(dir="/tmp"))
        open_dir.chmod(0o755)
        cli = client_tools(run_dir).cli
        os.link(cli, open_dir / "docker")
        (open_dir / "repro.sh").write_text(render_repro(case, signature, timeout=120))
        result = subprocess.run(
            ["bash", str(open_dir / "repro.sh")],
            env={
                **os.environ,
                "PATH": f"{open_dir}:{os.environ['PATH']}",
                "DOCKER_HOST": engine.host,
                "TMPDIR": str(open_dir),
            },
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    finally:
        session.close()
    remove_tree(open_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "buildfuzz repro: REPRODUCED" in result.stdout


def run_repro(
    case: Case, phase: Phase, host: str, cli: Path, config: Path
) -> subprocess.CompletedProcess[str]:
    """Run the repro.sh of ``case`` with the exports of a sandbox shell.

    The test session sets BUILDX_CONFIG to its own client's directory, which
    the user cannot enter, so the script's environment leaves it out.
    """
    directory = Path(tempfile.mkdtemp(dir="/tmp"))
    directory.chmod(0o755)  # the user enters the context in it
    script = directory / "repro.sh"
    script.write_text(render_repro(case, Signature(phase, "x"), timeout=120))
    environment = {k: v for k, v in os.environ.items() if k != "BUILDX_CONFIG"}
    try:
        return subprocess.run(
            ["bash", str(script)],
            env={
                **environment,
                "PATH": f"{cli.parent}:{os.environ['PATH']}",
                "DOCKER_HOST": host,
                "DOCKER_CONFIG": str(config),
                "TMPDIR": str(directory),
            },
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
    finally:
        remove_tree(directory)


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    ("phase", "returncode", "printed"),
    [
        (Phase.RESULT, 2, "cannot tell: the build passed"),
        (Phase.CONTEXT, 1, "did not reproduce"),
    ],
)
def test_repro_on_shared_sandbox_client(
    run_dir: Path, phase: Phase, returncode: int, printed: str
) -> None:
    # What `buildfuzz sandbox` exports: the user's links to the CLI and its
    # buildx plugin, and the socket opened to the user. The buildx client
    # then runs as the user, and the build passes (buildx sends the file
    # that the user cannot read as an empty one).
    tools = client_tools(run_dir)
    engine = start_engine("26.1", run_dir)
    case = Case(
        builder="buildx-docker",
        client_user=USER,
        files=(ContextFile("only-root.txt", size=5, mode=0o600),),
        dockerfile=("FROM scratch", "COPY . /"),
    )
    try:
        shared = client_user.UserClient(run_dir).share(
            tools.cli, tools.config_dir, engine.host
        )
        assert shared is not None
        result = run_repro(case, phase, engine.host, *shared)
    finally:
        engine.stop()

    assert result.returncode == returncode, result.stdout + result.stderr
    assert printed in result.stdout + result.stderr
    assert "cannot run docker here" not in result.stderr


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_repro_says_when_user_cannot_run_docker(run_dir: Path) -> None:
    # Without the sandbox's links, the user cannot reach the root-only
    # config directory and socket: a set-up problem, not a verdict.
    tools = client_tools(run_dir)
    engine = start_engine("26.1", run_dir)
    case = Case(builder="buildx-docker", client_user=USER, files=UNREADABLE)
    try:
        result = run_repro(
            case, Phase.CONTEXT, engine.host, tools.cli, tools.config_dir
        )
    finally:
        engine.stop()

    assert result.returncode == 2, result.stdout + result.stderr
    assert "user buildfuzz cannot run docker here" in result.stderr


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("builder", ["buildx-docker", "container-v0-34"])
def test_user_client_local_export_of_readonly_dir(
    session: Session, builder: str
) -> None:
    # The user's client finds the docker-container builder that root made,
    # and cannot write into a directory of mode 0555 of the image.
    case = Case(
        builder=builder,
        client_user=USER,
        output=Output.LOCAL,
        files=(
            ContextFile("d", kind=FileKind.DIR, mode=0o555),
            ContextFile("d/f", size=3),
        ),
        dockerfile=("FROM scratch", "COPY . /"),
    )

    record = session.execute(case)

    assert "no builder" not in record.result.log
    assert record.evaluation.verdict is Verdict.EXPECTED, record.result.log[-1500:]
    assert record.evaluation.rule == "client-user-readonly-dir-export"


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_user_client_builds_on_container_builder(session: Session) -> None:
    case = Case(
        builder="container-v0-34",
        client_user=USER,
        output=Output.TAR,
        files=(ContextFile("a", size=10),),
        dockerfile=("FROM scratch", "COPY . /"),
    )

    record = session.execute(case)

    assert record.evaluation.verdict is Verdict.PASS, record.result.log[-1500:]


def test_classic_permission_message_explained() -> None:
    case = Case(builder="classic", client_user=USER, files=UNREADABLE)
    log = "error checking context: no permission to read from '/x/context/private/key'"
    rule = matching_rule(load_rules("expected"), case, log)
    assert rule is not None
    assert rule.id == "client-unreadable-context"


def test_profile_of_user_clients_needs_open_workdir() -> None:
    """A profile whose every client is the user stops when the user is locked out."""
    from dataclasses import replace

    from buildfuzz.campaign import _user_clients_allowed
    from buildfuzz.errors import UsageError

    default = load_profile("default")
    only_user = replace(default, build=replace(default.build, client_users=(USER,)))
    base = Path(tempfile.mkdtemp(prefix="bfu-", dir="/var/tmp"))
    try:
        with pytest.raises(UsageError, match=f"cannot enter {base}"):
            _user_clients_allowed(only_user, base / "work")
        assert not _user_clients_allowed(default, base / "work")
        base.chmod(0o711)
        assert _user_clients_allowed(only_user, base / "work")
    finally:
        remove_tree(base)


@pytest.mark.parametrize(
    ("log", "rule"),
    [
        (
            "ERROR: failed to solve: error from receiver: failed to create device "
            "/w/case-59/rootfs/ctx/a: operation not permitted",
            "client-user-device-export",
        ),
        (
            "#20 ERROR: error from receiver: open /w/rootfs/d/f: permission denied",
            "client-user-readonly-dir-export",
        ),
    ],
)
def test_user_client_local_export_failures_explained(log: str, rule: str) -> None:
    case = Case(builder="container-v0-34", client_user=USER, output=Output.LOCAL)

    matched = matching_rule(load_rules("expected"), case, log)

    assert matched is not None
    assert matched.id == rule
    as_root = matching_rule(
        load_rules("expected"), case.with_changes(client_user=""), log
    )
    assert as_root is None
