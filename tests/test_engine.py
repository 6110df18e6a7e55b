"""Sandbox engines: start, build for real on every builder, stop clean."""

import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
from python_on_whales import DockerClient

from buildfuzz import build
from buildfuzz.baseimage import import_busybox
from buildfuzz.build import IMAGE_NAME as IMAGE
from buildfuzz.build import CaseRunner
from buildfuzz.case import Case, ContextFile, FileKind, Output
from buildfuzz.definitions import load_definitions
from buildfuzz.engine import EngineOptions, SandboxEngine
from buildfuzz.install import busybox_binary, engine_tree_name
from buildfuzz.packages import tree_path
from buildfuzz.session import Session
from buildfuzz.signature import Phase
from buildfuzz.strategies import BUSYBOX_IMAGE
from tests.conftest import client_tools, start_engine

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("installed")]

ENGINES = ["26.1", "20.10"]


def mounts_under(directory: Path) -> list[str]:
    with open("/proc/self/mountinfo") as stream:
        points = [line.split()[4] for line in stream]
    return [point for point in points if point.startswith(str(directory))]


def processes_under(directory: Path) -> list[int]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(str(directory) in part for part in process.info["cmdline"] or []):
            found.append(process.pid)
    return found


@pytest.mark.parametrize("name", ENGINES)
def test_engine_starts_isolated_and_stops_clean(name: str, run_dir: Path) -> None:
    engine = start_engine(name, run_dir)
    command = psutil.Process(engine._process.pid).cmdline()  # type: ignore[union-attr]
    healthy = engine.is_healthy()
    engine.stop()

    assert engine.info is not None
    assert engine.info.version.startswith(name)
    assert healthy
    assert f"--host=unix://{run_dir}" in " ".join(command)
    assert "--bridge=none" in command
    assert "--iptables=false" in command
    assert "--ip-forward=false" in command
    assert not engine.directory.exists()
    assert mounts_under(run_dir) == []
    assert processes_under(run_dir) == []


CASES = [
    Case(
        files=(
            ContextFile("a", size=513, mode=0o4755, uid=1000, gid=1000),
            ContextFile("d", kind=FileKind.DIR, mode=0o700),
            ContextFile("d/link", kind=FileKind.SYMLINK, target="../a"),
        ),
        dockerfile=(f"FROM {BUSYBOX_IMAGE}", "COPY . /ctx/", "RUN ls -lan /ctx"),
        builder=builder,
        output=output,
        tags=(f"{IMAGE}:second",),
    )
    for builder, output in [
        ("classic", Output.LOAD),
        ("buildx-docker", Output.LOAD),
        ("buildx-docker", Output.TAR),
        ("buildx-docker", Output.LOCAL),
    ]
]


@pytest.mark.parametrize("name", ENGINES)
def test_builds_pass_on_every_builder(name: str, run_dir: Path) -> None:
    engine = start_engine(name, run_dir)
    try:
        docker = client_tools(run_dir).docker(engine.host)
        import_busybox(docker, Path(busybox_binary()), run_dir)
        runner = CaseRunner(
            docker, load_definitions().builders, run_dir / "cases", timeout=120
        )
        results = [runner.run(case.with_changes(engine=name)) for case in CASES]
        runner.close()
        left = image_tags(docker)
    finally:
        engine.stop()

    for case, result in zip(CASES, results, strict=True):
        assert result.succeeded, f"{case.builder}/{case.output}: {result.log[-800:]}"
        assert result.duration > 0
    assert left == [BUSYBOX_IMAGE]  # each case's image was removed after it
    # The RUN step's listing shows the context arrived with its mode and size
    # (COPY without --chown gives every file to root, so no 1000 here).
    assert "-rwsr-xr-x" in results[1].log
    assert " 513 " in results[1].log


def image_tags(docker: DockerClient) -> list[str]:
    return sorted(tag for image in docker.image.list() for tag in image.repo_tags)


def test_images_removed_when_engine_api_refused(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An engine that refuses buildfuzz's Engine API version (newer engines
    # drop old versions) still has each case's images removed.
    monkeypatch.setattr(build, "ENGINE_API_VERSION", "1.99")
    engine = start_engine("26.1", run_dir)
    try:
        docker = client_tools(run_dir).docker(engine.host)
        runner = CaseRunner(
            docker, load_definitions().builders, run_dir / "cases", timeout=120
        )
        case = Case(dockerfile=("FROM scratch", "COPY . /"), tags=(f"{IMAGE}:second",))
        result = runner.run(case)
        runner.close()
        left = image_tags(docker)
    finally:
        engine.stop()

    assert result.succeeded, result.log[-800:]
    assert left == []


def test_failed_build_keeps_complete_log(run_dir: Path) -> None:
    engine = start_engine("26.1", run_dir)
    try:
        docker = client_tools(run_dir).docker(engine.host)
        runner = CaseRunner(
            docker, load_definitions().builders, run_dir / "cases", timeout=120
        )
        case = Case(dockerfile=("FROM scratch", "COPY missing /x"))
        result = runner.run(case)
    finally:
        engine.stop()

    assert result.exit_status != 0
    assert "#1 [internal] load build definition" in result.log
    assert "ERROR:" in result.log
    assert "missing" in result.log


def test_watchdog_kills_hanging_build(run_dir: Path) -> None:
    engine = start_engine("26.1", run_dir)
    try:
        docker = client_tools(run_dir).docker(engine.host)
        runner = CaseRunner(
            docker, load_definitions().builders, run_dir / "cases", timeout=5
        )
        # The classic builder copies a FIFO by reading it: COPY of one waits
        # for a writer that never comes.
        case = Case(
            files=(ContextFile("pipe", kind=FileKind.FIFO),),
            dockerfile=("FROM scratch", "COPY pipe /ctx/"),
            builder="classic",
        )
        result = runner.run(case)
    finally:
        engine.stop()

    assert result.timed_out
    assert result.duration < 30


@pytest.mark.parametrize("builder", ["container-v0-34", "remote-v0-34"])
def test_session_builds_on_buildkit_builders(builder: str, run_dir: Path) -> None:
    """docker-container and remote builders pull the busybox base through the
    loopback registry mirror and build every output."""
    definitions = load_definitions()
    session = Session(
        definitions, client_tools(run_dir), run_dir, rules=(), build_timeout=300
    )
    try:
        records = [
            session.execute(CASES[1].with_changes(builder=builder, output=output))
            for output in (Output.LOAD, Output.TAR, Output.DOCKER_TAR)
        ]
        created = [
            b.name
            for b in session.tools.docker(session.engine(CASES[1]).host).buildx.list()
        ]
    finally:
        session.close()

    for record in records:
        assert record.evaluation.verdict == "pass", record.result.log[-1500:]
    assert any(name.startswith("bf-") for name in created)
    assert processes_under(run_dir) == []
    assert mounts_under(run_dir) == []


def test_engine_from_binaries_directory(run_dir: Path, tmp_path: Path) -> None:
    """A flat directory of engine binaries, as in Docker's static release tarballs."""
    tree = tree_path(engine_tree_name("26.1"))
    flat = tmp_path / "docker"
    flat.mkdir()
    for binary in ("dockerd", "containerd", "containerd-shim-runc-v2", "runc",
                   "docker-init", "ctr"):  # fmt: skip
        found = next(p for p in (tree / "usr/sbin" / binary, tree / "usr/bin" / binary)
                     if p.exists())  # fmt: skip
        shutil.copy2(found, flat / binary)
    definition = replace(
        load_definitions().engines["26.1"], source="binaries", path=str(flat)
    )
    engine = SandboxEngine(definition, flat, run_dir)
    try:
        engine.start()
        docker = client_tools(run_dir).docker(engine.host)
        runner = CaseRunner(
            docker, load_definitions().builders, run_dir / "c", timeout=120
        )
        result = runner.run(
            CASES[0].with_changes(dockerfile=("FROM scratch", "COPY . /ctx/"))
        )
    finally:
        engine.stop()

    assert engine.info is not None
    assert engine.info.version.startswith("26.1")
    assert result.succeeded, result.log[-1000:]


def test_session_builds_with_newer_buildx(run_dir: Path) -> None:
    """A builder may use a buildx release built by buildfuzz instead of Debian's."""
    definitions = load_definitions()
    session = Session(
        definitions, client_tools(run_dir), run_dir, rules=(), build_timeout=300
    )
    try:
        record = session.execute(CASES[1].with_changes(builder="buildx-docker-v0-38"))
        plugin = session.tools_for(definitions.builders["buildx-docker-v0-38"])
        version = plugin.docker(session.engine(CASES[1]).host).buildx.version()
    finally:
        session.close()

    assert record.evaluation.verdict == "pass", record.result.log[-1500:]
    assert "v0.38.2" in str(version)


@pytest.mark.parametrize(
    ("options", "driver"),
    [
        (EngineOptions(storage_driver="vfs"), "vfs"),
        (EngineOptions(storage_driver="fuse-overlayfs"), "fuse-overlayfs"),
        (EngineOptions(containerd_store=True), "overlayfs"),
        (EngineOptions(data_root_mib=256, memory_mib=512), "overlay2"),
    ],
)
def test_engine_options_build(
    options: EngineOptions, driver: str, run_dir: Path
) -> None:
    definitions = load_definitions()
    engine = SandboxEngine(
        definitions.engines["26.1"],
        tree_path(engine_tree_name("26.1")),
        run_dir,
        options,
    )
    try:
        engine.start()
        docker = client_tools(run_dir).docker(engine.host)
        runner = CaseRunner(docker, definitions.builders, run_dir / "c", timeout=120)
        results = [
            runner.run(
                CASES[0].with_changes(
                    dockerfile=("FROM scratch", "COPY . /ctx/"), builder=b
                )
            )
            for b in ("buildx-docker", "classic")
        ]
        with open("/proc/self/mountinfo") as stream:
            # dockerd bind-mounts its data-root onto itself; a limited one is
            # an ext4 file system of its own from a loop device.
            data_root_mounted = any(
                f" {engine.directory}/root " in line and " - ext4 /dev/loop" in line
                for line in stream
            )
    finally:
        engine.stop()

    assert engine.info is not None
    assert engine.info.storage_driver == driver
    assert all(result.succeeded for result in results), results[0].log[-800:]
    assert data_root_mounted == bool(options.data_root_mib)
    assert not engine.directory.exists()


def test_repro_sets_up_container_builder(run_dir: Path) -> None:
    """repro.sh of a docker-container case creates its builder and removes it."""
    from buildfuzz.buildkit_images import publish_buildkit_image
    from buildfuzz.registry import LoopbackRegistry
    from buildfuzz.repro import render_repro
    from buildfuzz.signature import Phase, Signature

    case = Case(
        dockerfile=("FROM scratch", "COPY --chown=nobody:nogroup . /owned/"),
        builder="container-v0-34",
    )
    script = run_dir / "repro.sh"
    script.write_text(
        render_repro(
            case,
            Signature(Phase.SOLVE, "failed to load cache key: invalid user index -<n>"),
            timeout=120,
        )
    )
    engine = start_engine("26.1", run_dir)
    tools = client_tools(run_dir)
    registry = LoopbackRegistry(run_dir)
    try:
        registry.start()
        docker = tools.docker(engine.host)
        image = publish_buildkit_image(docker, registry, "v0.34.2")
        completed = subprocess.run(
            ["bash", str(script)],
            env={
                "PATH": f"{tools.cli.parent}:/usr/bin:/bin",
                "DOCKER_HOST": engine.host,
                "DOCKER_CONFIG": str(tools.config_dir),
                "BUILDKIT_IMAGE": image,
                "HOME": str(run_dir),
            },
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        builders = [b.name for b in docker.buildx.list()]
    finally:
        registry.stop()
        engine.stop()

    assert completed.returncode == 0, (
        completed.stdout[-2000:] + completed.stderr[-2000:]
    )
    assert "buildfuzz repro: REPRODUCED" in completed.stdout
    assert not any(name.startswith("buildfuzz-repro") for name in builders)


def test_session_resets_the_engine_after_a_hang(run_dir: Path) -> None:
    definitions = load_definitions()
    session = Session(
        definitions, client_tools(run_dir), run_dir, rules=(), build_timeout=5
    )
    hang = Case(
        files=(ContextFile("pipe", kind=FileKind.FIFO),),
        dockerfile=("FROM scratch", "COPY pipe /ctx/"),
        builder="classic",
    )
    plain = Case(
        files=(ContextFile("a"),),
        dockerfile=("FROM scratch", "COPY a /ctx/"),
        builder="classic",
    )
    try:
        first = session.execute(plain)
        pid_file = session.engine(hang).directory / "dockerd.pid"
        daemon = pid_file.read_text()
        hung = session.execute(hang)
        after = pid_file.read_text()
        next_case = session.execute(plain)
    finally:
        session.close()

    assert first.result.succeeded
    assert hung.result.timed_out
    assert hung.evaluation.signature.phase is Phase.HANG  # type: ignore[union-attr]
    assert after != daemon  # a new daemon process
    assert next_case.result.succeeded
