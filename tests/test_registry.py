"""The loopback registry: serve, push and pull through buildx, authenticate."""

from pathlib import Path

import psutil
import pytest
from python_on_whales import DockerClient
from python_on_whales.exceptions import DockerException

from buildfuzz.errors import SetupError
from buildfuzz.registry import LoopbackRegistry, htpasswd_line
from tests.conftest import client_tools, start_engine
from tests.test_engine import mounts_under, processes_under

USER = "fuzz"
PASSWORD = "loopback-only"


def write_context(directory: Path, dockerfile: str, **files: str) -> Path:
    directory.mkdir(parents=True)
    (directory / "Dockerfile").write_text(dockerfile)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


def push_scratch_image(docker: DockerClient, context: Path, reference: str) -> None:
    write_context(context, "FROM scratch\nCOPY hello /hello\n", hello="hello\n")
    docker.buildx.build(
        context,
        output={"type": "image", "name": reference, "push": "true"},
        progress=False,
    )


def test_htpasswd_line_is_bcrypt() -> None:
    line = htpasswd_line(USER, PASSWORD)

    assert line.startswith(f"{USER}:$2b$")
    assert line.endswith("\n")
    with pytest.raises(SetupError, match="user name"):
        htpasswd_line("a:b", PASSWORD)


def test_credentials_need_both_parts(tmp_path: Path) -> None:
    with pytest.raises(SetupError, match="both a user name and a password"):
        LoopbackRegistry(tmp_path, username=USER)


@pytest.mark.engine
def test_registry_loopback_and_clean_stop(run_dir: Path) -> None:
    registry = LoopbackRegistry(run_dir)
    with registry:
        status = registry.probe()
        process = registry._process
        assert process is not None
        connections = psutil.Process(process.pid).net_connections(kind="tcp")
        catalog = registry.catalog()

    assert status == 200
    assert registry.address.startswith("127.0.0.1:")
    assert registry.host == f"localhost:{registry.port}"
    assert [c.laddr.ip for c in connections if c.status == "LISTEN"] == ["127.0.0.1"]
    assert catalog == []
    assert not registry.directory.exists()
    assert processes_under(run_dir) == []


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_pushed_image_pulled_back(run_dir: Path) -> None:
    engine = start_engine("26.1", run_dir)
    registry = LoopbackRegistry(run_dir)
    try:
        registry.start()
        docker = client_tools(run_dir).docker(engine.host)
        reference = registry.image("x", "1")
        push_scratch_image(docker, run_dir / "push", reference)
        catalog = registry.catalog()
        pushed = len(registry.log_path.read_text())
        # Only the registry has the image now, so FROM must pull it.
        docker.image.remove(reference)
        context = write_context(
            run_dir / "pull", f"FROM {reference}\nCOPY more /more\n", more="more\n"
        )
        destination = run_dir / "out"
        docker.buildx.build(
            context, output={"type": "local", "dest": str(destination)}, progress=False
        )
        pulled = registry.log_path.read_text()[pushed:]
    finally:
        registry.stop()
        engine.stop()

    assert catalog == ["x"]
    # BuildKit resolved the tag on the registry, then fetched the manifest.
    assert '"HEAD /v2/x/manifests/1 ' in pulled
    assert '"GET /v2/x/manifests/sha256:' in pulled
    assert (destination / "hello").read_text() == "hello\n"
    assert (destination / "more").read_text() == "more\n"
    assert mounts_under(run_dir) == []
    assert processes_under(run_dir) == []


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_auth_accepts_only_right_credentials(run_dir: Path) -> None:
    engine = start_engine("26.1", run_dir)
    registry = LoopbackRegistry(run_dir, username=USER, password=PASSWORD)
    try:
        registry.start()
        statuses = (
            registry.probe(),
            registry.probe(USER, "wrong"),
            registry.probe("someone", PASSWORD),
            registry.probe(USER, PASSWORD),
        )
        docker = client_tools(run_dir).docker(engine.host)
        reference = registry.image("private", "1")
        with pytest.raises(DockerException):
            docker.login(registry.host, USER, "wrong")
        with pytest.raises(DockerException):
            push_scratch_image(docker, run_dir / "anonymous", reference)
        assert registry.catalog() == []

        docker.login(registry.host, USER, PASSWORD)
        push_scratch_image(docker, run_dir / "logged-in", reference)
        catalog = registry.catalog()
    finally:
        registry.stop()
        engine.stop()

    assert statuses == (401, 401, 401, 200)
    assert catalog == ["private"]
