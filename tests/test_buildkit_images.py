"""BuildKit from source: binaries, the image, docker-container and remote builders.

Only the newest release of builders/buildkit.toml is compiled here. The
first build takes about four minutes on two cores, and later runs reuse it.
"""

import stat
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from python_on_whales import DockerClient

from buildfuzz.baseimage import busybox_rootfs_tar
from buildfuzz.buildkit_images import (
    BINARIES,
    HostBuildkitd,
    buildkit_rootfs_tar,
    container_driver_options,
    ensure_buildkit_binaries,
    load_buildkit_releases,
    newest_release,
    publish_buildkit_image,
)
from buildfuzz.errors import DataFileError, SetupError
from buildfuzz.go_build import check_go_version, go_toolchain
from buildfuzz.install import busybox_binary
from buildfuzz.registry import LoopbackRegistry
from tests.conftest import client_tools, start_engine
from tests.test_engine import mounts_under, processes_under

VERSION = newest_release()


@pytest.fixture(scope="module")
def binaries() -> Path:
    return ensure_buildkit_binaries(VERSION)


def test_releases_sorted_oldest_first() -> None:
    releases = load_buildkit_releases()

    assert list(releases)[0] == "v0.12.5"
    assert "v0.15.2" in releases
    assert list(releases)[-1] == VERSION
    assert all(r.go_module == "github.com/moby/buildkit" for r in releases.values())
    assert all(r.description for r in releases.values())


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "at least one"),
        ('[[releases]]\nversion = "0.1"\ngo_module = "m"\ndescription = "d"\n', "vX"),
        ('[[releases]]\nversion = "v0.1.0"\ngo_module = "m"\n', "description"),
        ('[[releases]]\nversion = "v0.1.0"\nrepo = "m"\n', "unknown keys"),
    ],
)
def test_invalid_releases_file_rejected(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "buildkit.toml"
    path.write_text(text)

    with pytest.raises(DataFileError, match=problem):
        load_buildkit_releases(path)


def test_unlisted_version_rejected() -> None:
    with pytest.raises(SetupError, match="not listed in .*buildkit.toml"):
        ensure_buildkit_binaries("v0.0.1")


@pytest.mark.engine
def test_release_needing_newer_go_rejected(tmp_path: Path) -> None:
    go_mod = tmp_path / "go.mod"
    go_mod.write_text("module example.com/m\n\ngo 9.1.0\n")
    with pytest.raises(SetupError, match="v9.0.0 needs Go 9.1.0 or newer"):
        check_go_version(go_toolchain(), "BuildKit v9.0.0", go_mod, "pick another")


@pytest.mark.engine
def test_binaries_built_once_and_reused(binaries: Path) -> None:
    before = {name: (binaries / name).stat().st_mtime_ns for name in BINARIES}
    started = time.monotonic()
    again = ensure_buildkit_binaries(VERSION)
    seconds = time.monotonic() - started
    after = {name: (again / name).stat().st_mtime_ns for name in BINARIES}
    printed = {
        name: subprocess.run(
            [str(binaries / name), "--version"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for name in BINARIES
    }

    assert again == binaries
    assert after == before
    assert seconds < 2
    for name in BINARIES:
        assert f"{name} github.com/moby/buildkit {VERSION}" in printed[name]


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_rootfs_tar_contents(binaries: Path, tmp_path: Path) -> None:
    tar_path = buildkit_rootfs_tar(VERSION, tmp_path / "rootfs.tar")
    with tarfile.open(tar_path) as archive:
        members = {member.name: member for member in archive.getmembers()}

    for name in ("usr/bin/buildkitd", "usr/bin/buildctl", "usr/bin/runc"):
        assert members[name].isfile()
        assert members[name].mode == 0o755
    assert members["bin/sh"].issym()
    assert members["bin/sh"].linkname == "busybox"
    assert any("libseccomp.so" in name for name in members)
    assert any("ld-linux" in name for name in members)
    for name in ("etc/buildkit", "var/lib/buildkit"):
        assert members[name].isdir()
    assert stat.S_IMODE(members["tmp"].mode) == 0o1777
    assert {member.uid for member in members.values()} == {0}


def push_busybox_image(docker: DockerClient, reference: str, work_dir: Path) -> None:
    """Push a busybox base image to a loopback registry as ``reference``."""
    tar_path = busybox_rootfs_tar(Path(busybox_binary()), work_dir / "busybox.tar")
    docker.image.import_(tar_path, reference, changes=["ENV PATH=/bin"])
    docker.image.push(reference, quiet=True)
    tar_path.unlink()


def build_copy_case(
    docker: DockerClient, builder: str, directory: Path, base: str = "scratch"
) -> Path:
    """Build FROM ``base`` + COPY with ``builder`` and return the exported files.

    A busybox ``base`` also gets a RUN step, which runc runs in the builder.
    """
    steps = [f"FROM {base}", "COPY a /ctx/a"]
    if base != "scratch":
        steps.append("RUN cat /ctx/a /ctx/a > /ctx/twice")
    context = directory / "context"
    context.mkdir(parents=True)
    (context / "Dockerfile").write_text("\n".join(steps) + "\n")
    (context / "a").write_text("from the context\n")
    destination = directory / "out"
    docker.buildx.build(
        context,
        builder=builder,
        network="none",
        output={"type": "local", "dest": str(destination)},
        progress=False,
    )
    return destination


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_docker_container_builder_builds(binaries: Path, run_dir: Path) -> None:
    engine = start_engine("26.1", run_dir)
    registry = LoopbackRegistry(run_dir)
    builder = "bf-container"
    try:
        registry.start()
        docker = client_tools(run_dir).docker(engine.host)
        image = publish_buildkit_image(docker, registry, VERSION)
        base = registry.image("base", "1")
        push_busybox_image(docker, base, run_dir)
        catalog = registry.catalog()
        docker.buildx.create(
            driver="docker-container",
            driver_options=container_driver_options(image),
            name=builder,
            bootstrap=True,
        )
        try:
            nodes = docker.buildx.inspect(builder).nodes or []
            output = build_copy_case(docker, builder, run_dir / "case")
            # The builder does not see the engine's images, so FROM pulls
            # the base image from the loopback registry.
            pulled = build_copy_case(docker, builder, run_dir / "pull", base)
        finally:
            docker.buildx.remove(builder)
        containers = docker.container.list(all=True)
    finally:
        registry.stop()
        engine.stop()

    assert image == f"{registry.host}/buildfuzz/buildkit:{VERSION}"
    assert catalog == ["base", "buildfuzz/buildkit"]
    assert [node.version for node in nodes] == [VERSION]
    assert (output / "ctx" / "a").read_text() == "from the context\n"
    assert (pulled / "bin" / "busybox").is_file()
    assert (pulled / "ctx" / "twice").read_text() == "from the context\n" * 2
    assert containers == []
    assert mounts_under(run_dir) == []
    assert processes_under(run_dir) == []


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_remote_builder_builds(binaries: Path, run_dir: Path) -> None:
    engine = start_engine("26.1", run_dir)
    registry = LoopbackRegistry(run_dir)
    daemon = HostBuildkitd(VERSION, run_dir)
    builder = "bf-remote"
    try:
        registry.start()
        daemon.start()
        docker = client_tools(run_dir).docker(engine.host)
        base = registry.image("base", "1")
        push_busybox_image(docker, base, run_dir)
        docker.buildx.create(
            daemon.address, driver="remote", name=builder, bootstrap=True
        )
        try:
            nodes = docker.buildx.inspect(builder).nodes or []
            output = build_copy_case(docker, builder, run_dir / "case")
            pulled = build_copy_case(docker, builder, run_dir / "pull", base)
        finally:
            docker.buildx.remove(builder)
    finally:
        daemon.stop()
        registry.stop()
        engine.stop()

    assert [node.version for node in nodes] == [VERSION]
    assert (output / "ctx" / "a").read_text() == "from the context\n"
    assert (pulled / "bin" / "busybox").is_file()
    assert (pulled / "ctx" / "twice").read_text() == "from the context\n" * 2
    assert not daemon.directory.exists()
    assert mounts_under(run_dir) == []
    assert processes_under(run_dir) == []
