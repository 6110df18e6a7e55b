"""An existing daemon: buildfuzz runs cases on it and leaves its state as it was."""

from pathlib import Path

import docker
import pytest

from buildfuzz.baseimage import import_busybox
from buildfuzz.install import busybox_binary
from tests.conftest import PROFILES, REPO, buildfuzz, client_tools, start_engine

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("installed")]


def snapshot(host: str) -> dict[str, list[str]]:
    """Everything of the daemon's own that a run must not change."""
    client = docker.DockerClient(base_url=host)
    try:
        usage = client.df()
        return {
            "images": sorted(
                f"{image.id} {sorted(image.tags)}"
                for image in client.images.list(all=True)
            ),
            "containers": sorted(c.name for c in client.containers.list(all=True)),
            "volumes": sorted(v.name for v in client.volumes.list()),
            "build cache": sorted(
                entry["ID"] for entry in usage.get("BuildCache") or []
            ),
        }
    finally:
        client.close()


def test_existing_daemon_left_as_it_was(run_dir: Path, tmp_path: Path) -> None:
    owner = start_engine("26.1", run_dir)  # stands in for the user's daemon
    try:
        cli = client_tools(run_dir).docker(owner.host)
        import_busybox(cli, Path(busybox_binary()), run_dir)
        cli.image.tag("localhost/buildfuzz/busybox:1", "user/app:1")
        cli.image.remove("localhost/buildfuzz/busybox:1")
        context = tmp_path / "ctx"
        context.mkdir()
        (context / "Dockerfile").write_text("FROM user/app:1\nRUN echo mine > /f\n")
        cli.buildx.build(context, tags=["user/built:1"], load=True, network="none")
        cli.container.create("user/app:1", ["sh"], name="user-container")
        cli.volume.create("user-volume")
        before = snapshot(owner.host)
        profile = tmp_path / "container.toml"
        profile.write_text(
            (PROFILES / "quiet.toml")
            .read_text()
            .replace(
                'builders = ["buildx-docker", "classic"]',
                'builders = ["container-v0-34", "classic"]',
            )
        )

        completed = buildfuzz(
            "run", "--budget", "30s", "--engine-host", owner.host,
            "--profile", str(profile), "--results", str(tmp_path / "results"),
            "--workdir", str(run_dir.parent),
            cwd=REPO,
        )  # fmt: skip
        after = snapshot(owner.host)
    finally:
        owner.stop()

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "cases on host/container-v0-34" in completed.stdout
    assert "host/classic" not in completed.stdout  # it would use the daemon's cache
    assert "builder left out on an existing daemon" in completed.stderr
    assert after == before
