"""An existing daemon: buildfuzz runs cases on it and leaves its state as it was."""

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import docker
import pytest

from buildfuzz.baseimage import import_busybox
from buildfuzz.docker_context import ContextError, context_host
from buildfuzz.install import busybox_binary
from tests.conftest import (
    BUILDFUZZ,
    PROFILES,
    REPO,
    buildfuzz,
    client_tools,
    start_engine,
)

engine = pytest.mark.usefixtures("installed")


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


@pytest.mark.engine
@engine
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


def write_context(config: Path, name: str, host: str) -> None:
    """Store a context the way `docker context create` does."""
    digest = hashlib.sha256(name.encode()).hexdigest()
    meta = config / "contexts" / "meta" / digest
    meta.mkdir(parents=True)
    (meta / "meta.json").write_text(
        json.dumps(
            {
                "Name": name,
                "Metadata": {},
                "Endpoints": {"docker": {"Host": host, "SkipTLSVerify": False}},
            }
        )
    )


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("ssh://me@example", "reaches only unix:// and tcp:// endpoints"),
        ("", "has no docker endpoint"),
    ],
)
def test_unusable_contexts_rejected(tmp_path: Path, host: str, message: str) -> None:
    write_context(tmp_path, "odd", host)
    with pytest.raises(ContextError, match=message):
        context_host("odd", tmp_path)


def test_context_endpoint_is_read(tmp_path: Path) -> None:
    write_context(tmp_path, "mine", "unix:///run/x.sock")
    assert context_host("mine", tmp_path) == "unix:///run/x.sock"
    with pytest.raises(ContextError, match="'other' not found in"):
        context_host("other", tmp_path)
    tls = tmp_path / "contexts" / "tls" / hashlib.sha256(b"mine").hexdigest()
    (tls / "docker").mkdir(parents=True)
    (tls / "docker" / "ca.pem").write_text("x")
    with pytest.raises(ContextError, match="uses TLS files"):
        context_host("mine", tmp_path)


def files_of(directory: Path) -> dict[str, tuple[int, float, bytes]]:
    """Every file under ``directory`` with its mode, modification time and bytes."""
    return {
        str(path.relative_to(directory)): (
            path.lstat().st_mode,
            path.lstat().st_mtime,
            path.read_bytes() if path.is_file() else b"",
        )
        for path in sorted(directory.rglob("*"))
    }


@pytest.mark.engine
@engine
def test_engine_from_docker_context(run_dir: Path, tmp_path: Path) -> None:
    """An external engine named by a context of the user's store. The store
    and the daemon's own state stay as they were."""
    owner = start_engine("26.1", run_dir)  # in place of the user's daemon
    user_config = tmp_path / "user-docker"
    user_config.mkdir()
    (user_config / "config.json").write_text('{"currentContext": "default"}\n')
    environment = {**os.environ, "DOCKER_CONFIG": str(user_config)}
    tools = client_tools(run_dir)
    try:
        subprocess.run(
            [
                str(tools.cli), "context", "create", "bf-owner",
                "--docker", f"host={owner.host}",
            ],
            env=environment, check=True, capture_output=True,
        )  # fmt: skip
        # A copy of the project whose engines.toml has the context engine.
        home = tmp_path / "home"
        (home / "builders").mkdir(parents=True)
        for name in ("builders.toml", "buildkit.toml"):
            shutil.copy(REPO / "builders" / name, home / "builders" / name)
        (home / "builders" / "engines.toml").write_text(
            (REPO / "builders" / "engines.toml").read_text()
            + '\n[engines.ctx]\nsource = "external"\ncontext = "bf-owner"\n'
        )
        (home / "strategies").symlink_to(REPO / "strategies")
        profile = tmp_path / "context.toml"
        profile.write_text(
            (PROFILES / "quiet.toml")
            .read_text()
            .replace('engines = ["26.1"]', 'engines = ["ctx"]')
            .replace(
                'builders = ["buildx-docker", "classic"]',
                'builders = ["remote-v0-34"]',
            )
        )
        before = files_of(user_config)
        daemon_before = snapshot(owner.host)
        completed = subprocess.run(
            [
                *BUILDFUZZ, "run", "--budget", "20s", "--profile", str(profile),
                "--results", str(tmp_path / "results"),
                "--workdir", str(run_dir.parent),
            ],
            cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
            env={**environment, "BUILDFUZZ_HOME": str(home)},
        )  # fmt: skip
        after = files_of(user_config)
        daemon_after = snapshot(owner.host)
    finally:
        owner.stop()

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "cases on ctx/remote-v0-34" in completed.stdout
    assert after == before
    assert daemon_after == daemon_before


def test_missing_context_is_one_line(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "builders").mkdir(parents=True)
    for name in ("builders.toml", "buildkit.toml"):
        shutil.copy(REPO / "builders" / name, home / "builders" / name)
    (home / "builders" / "engines.toml").write_text(
        (REPO / "builders" / "engines.toml").read_text()
        + '\n[engines.ctx]\nsource = "external"\ncontext = "absent"\n'
    )
    completed = subprocess.run(
        [*BUILDFUZZ, "builders", "list"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={
            **os.environ,
            "BUILDFUZZ_HOME": str(home),
            "DOCKER_CONFIG": str(tmp_path / "none"),
        },
    )  # fmt: skip
    assert completed.returncode == 2
    assert "docker context 'absent' not found in" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_engine_context_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from buildfuzz import docker_context
    from buildfuzz.cli import _engine_host

    write_context(tmp_path, "mine", "unix:///run/x.sock")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    # As in a fresh buildfuzz process, which has not hidden the user's set-up.
    monkeypatch.setattr(docker_context, "_user_environment", {})

    assert _engine_host(None, "mine") == "unix:///run/x.sock"
    assert _engine_host("unix:///other.sock", None) == "unix:///other.sock"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--engine-context", "absent"], "--engine-context: docker context 'absent'"),
        (
            ["--engine-context", "mine", "--engine-host", "unix:///x.sock"],
            "both name a daemon; give one",
        ),
    ],
)
def test_engine_context_mistakes(
    tmp_path: Path, arguments: list[str], message: str
) -> None:
    write_context(tmp_path, "mine", "unix:///run/x.sock")
    results = tmp_path / "results"
    completed = subprocess.run(
        [*BUILDFUZZ, "run", "--budget", "10s", "--results", str(results), *arguments],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "DOCKER_CONFIG": str(tmp_path)},
    )  # fmt: skip

    assert completed.returncode == 2
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not results.exists()


@pytest.mark.engine
@engine
def test_disposable_daemon_runs_every_builder(run_dir: Path, tmp_path: Path) -> None:
    """A CI job's dind service: the classic builder and docker driver run too."""
    service = start_engine("26.1", run_dir)  # stands in for docker:26.1-dind
    try:
        completed = buildfuzz(
            "run", "--budget", "20s", "--engine-host", service.host,
            "--disposable-engine", "--profile", str(PROFILES / "quiet.toml"),
            "--results", str(tmp_path / "results"),
            "--workdir", str(run_dir.parent),
            cwd=REPO,
        )  # fmt: skip
    finally:
        service.stop()

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "cases on host/classic" in completed.stdout
    assert "cases on host/buildx-docker" in completed.stdout


def test_disposable_engine_needs_a_daemon(tmp_path: Path) -> None:
    results = tmp_path / "results"

    completed = buildfuzz(
        "run", "--disposable-engine", "--results", str(results), cwd=REPO
    )

    assert completed.returncode == 2
    assert "give --engine-host or --engine-context too" in completed.stderr
    assert not results.exists()


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("unix:///nonexistent.sock", "No such file or directory"),
        ("tcp://127.0.0.1:1", "Connection refused"),
        ("http://foo", ""),
    ],
)
def test_unreachable_daemon_is_one_line(tmp_path: Path, host: str, reason: str) -> None:
    results = tmp_path / "results"

    completed = buildfuzz(
        "run", "--budget", "10s", "--engine-host", host, "--disposable-engine",
        "--results", str(results), cwd=REPO,
    )  # fmt: skip

    assert completed.returncode == 2
    assert f"cannot reach the Docker daemon at '{host}': {reason}" in completed.stderr
    assert "Max retries" not in completed.stderr
    assert "Traceback" not in completed.stderr
    assert not results.exists()


def test_context_found_after_isolation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Definitions read again inside a run still see the user's contexts."""
    from buildfuzz import docker_context
    from buildfuzz.client import isolate_environment

    monkeypatch.setattr(os, "environ", dict(os.environ))
    monkeypatch.setattr(docker_context, "_user_environment", {})
    user = tmp_path / "user"
    write_context(user, "mine", "unix:///run/x.sock")
    os.environ["DOCKER_CONFIG"] = str(user)

    isolate_environment(tmp_path / "private")

    assert os.environ["DOCKER_CONFIG"] == str(tmp_path / "private")
    assert context_host("mine") == "unix:///run/x.sock"


def test_builders_list_reports_an_unreachable_existing_daemon(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "builders").mkdir(parents=True)
    for name in ("builders.toml", "buildkit.toml"):
        shutil.copy(REPO / "builders" / name, home / "builders" / name)
    (home / "builders" / "engines.toml").write_text(
        (REPO / "builders" / "engines.toml").read_text()
        + '\n[engines.gone]\nsource = "external"\nhost = "unix:///nonexistent.sock"\n'
    )

    completed = subprocess.run(
        [*BUILDFUZZ, "builders", "list"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "BUILDFUZZ_HOME": str(home)},
    )  # fmt: skip
    row = next(line for line in completed.stdout.splitlines() if " gone " in line)

    assert "cannot reach the Docker daemon" in row
    assert "not downloaded" not in row
