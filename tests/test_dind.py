"""dind engines: dockerd in a privileged container on a sandbox engine."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import docker
import psutil
import pytest

from buildfuzz import campaign
from buildfuzz.case import Case, ContextFile
from buildfuzz.definitions import load_definitions
from buildfuzz.dind import RUN_LABEL, DindEngine, dind_problem, remove_leftovers
from buildfuzz.errors import DataFileError
from buildfuzz.session import Session
from buildfuzz.strategies import BUSYBOX_IMAGE
from buildfuzz.workdir import reap_dead_runs
from tests.conftest import REPO, client_tools, start_engine
from tests.test_engine import mounts_under, processes_under

ENGINE = "dind-26.1"


def write_engines(directory: Path, text: str) -> None:
    directory.mkdir()
    real = Path(__file__).resolve().parent.parent / "builders"
    (directory / "builders.toml").write_text((real / "builders.toml").read_text())
    (directory / "engines.toml").write_text(
        (real / "engines.toml").read_text() + "\n" + text
    )


def test_dind_definition_links_host() -> None:
    engines = load_definitions().engines
    dind = engines[ENGINE]
    assert dind.source == "dind"
    assert dind.sandboxed
    assert dind.host_engine == engines["26.1"]
    assert dind.release == "trixie"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[engines.x]\nsource = "dind"\nrelease = "trixie"\n', "needs host = ENGINE"),
        ('[engines.x]\nsource = "dind"\nhost = "26.1"\n', "release = one of"),
        (
            '[engines.x]\nsource = "dind"\nhost = "nope"\nrelease = "trixie"\n',
            "host 'nope' is not an engine defined here",
        ),
        (
            '[engines.x]\nsource = "dind"\nhost = "dind-26.1"\nrelease = "trixie"\n',
            "not itself dind",
        ),
    ],
)
def test_bad_dind_definitions_rejected(tmp_path: Path, text: str, message: str) -> None:
    write_engines(tmp_path / "b", text)
    with pytest.raises(DataFileError, match=message):
        load_definitions(tmp_path / "b")


def test_dind_problems(monkeypatch: pytest.MonkeyPatch) -> None:
    engines = load_definitions().engines
    dind = engines[ENGINE]
    monkeypatch.setattr("buildfuzz.dind.rootfs_ready", lambda release: False)
    monkeypatch.setattr("buildfuzz.dind.shutil.which", lambda name: None)
    assert "mmdebstrap not found" in str(dind_problem(dind))
    monkeypatch.setattr("buildfuzz.dind.rootfs_ready", lambda release: True)
    remote = replace(engines["26.1"], source="external", host="tcp://10.0.0.1:2375")
    problem = dind_problem(replace(dind, host_engine=remote))
    assert problem is not None and "needs a local daemon" in problem
    on_old = replace(dind, host_engine=engines["20.10"])
    monkeypatch.setattr(
        "buildfuzz.capabilities.missing_from_bounding_set", lambda: [24]
    )
    assert "CAP_SYS_RESOURCE" in str(dind_problem(on_old))


def test_container_builders_left_off_dind() -> None:
    definitions = load_definitions()
    assert not campaign._fits_engine(definitions, ENGINE, "container-v0-34")
    assert campaign._fits_engine(definitions, ENGINE, "classic")
    assert campaign._fits_engine(definitions, ENGINE, "buildx-docker")


CASE = Case(
    engine=ENGINE,
    files=(ContextFile("a", size=513),),
    dockerfile=(f"FROM {BUSYBOX_IMAGE}", "COPY a /a", "RUN wc -c /a"),
)


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("name", [ENGINE, "dind-20.10"])
def test_dind_engine_runs_cases_cleanly(name: str, run_dir: Path) -> None:
    """A session starts a dind engine on a sandbox 26.1 engine and builds on it."""
    definitions = load_definitions()
    session = Session(
        definitions, client_tools(run_dir), run_dir, rules=(), build_timeout=300
    )
    case = CASE.with_changes(engine=name)
    try:
        records = [
            session.execute(case.with_changes(builder=builder))
            for builder in ("buildx-docker", "classic")
        ]
        engine = session.engine(case)
        assert isinstance(engine, DindEngine)
        host = engine.host_engine
        assert host is not None
        client = docker.DockerClient(base_url=host.host)
        try:
            container = client.containers.get(engine.container_name)
            attributes = container.attrs
            volumes = [v.name for v in client.volumes.list()]
        finally:
            client.close()
        server = engine.info
    finally:
        session.close()

    for record in records:
        assert record.evaluation.verdict == "pass", record.result.log[-1500:]
    assert server is not None
    assert server.version.startswith(name.removeprefix("dind-"))
    assert "(containerized)" in server.operating_system
    assert attributes["HostConfig"]["Privileged"] is True
    assert attributes["HostConfig"]["NetworkMode"] == "none"
    assert attributes["Config"]["Labels"][RUN_LABEL] == str(run_dir)
    command = " ".join(attributes["Args"])
    for flag in ("--bridge=none", "--iptables=false", "--ip-forward=false"):
        assert flag in command
    assert engine.volume_name in volumes
    assert not engine.directory.exists()
    assert mounts_under(run_dir) == []
    assert processes_under(run_dir) == []


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_dead_run_leftovers_removed(run_dir: Path, tmp_path: Path) -> None:
    """Containers and volumes labelled with a gone run directory are removed."""
    host = start_engine("26.1", run_dir)
    client = docker.DockerClient(base_url=host.host)
    try:
        client.api.import_image_from_data(
            b"\0" * 1024, repository="localhost/buildfuzz/empty", tag="1"
        )
        dead = {RUN_LABEL: str(tmp_path / "gone")}
        alive = {RUN_LABEL: str(run_dir)}
        for name, labels in (("dead", dead), ("alive", alive)):
            client.volumes.create(f"v-{name}", labels=labels)
            client.containers.create(
                "localhost/buildfuzz/empty:1", ["x"], name=f"c-{name}", labels=labels
            )
        removed = remove_leftovers(client)
        containers = [c.name for c in client.containers.list(all=True)]
        volumes = [v.name for v in client.volumes.list()]
    finally:
        client.close()
        host.stop()
    assert sorted(removed) == ["c-dead", "v-dead"]
    assert containers == ["c-alive"]
    assert volumes == ["v-alive"]


HOLDER = """
import sys, time
from pathlib import Path
from buildfuzz.definitions import load_definitions
from buildfuzz.dind import sandbox_engine
from buildfuzz.install import engine_tree
from buildfuzz.workdir import create_run_dir

run_dir = create_run_dir(Path(sys.argv[1]))
definitions = load_definitions()
engine = sandbox_engine(
    definitions.engines["dind-26.1"], engine_tree(definitions, "dind-26.1"), run_dir
)
engine.start()
print(run_dir, flush=True)
time.sleep(600)
"""


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_killed_run_leaves_no_inner_daemon(workdir: Path) -> None:
    """After buildfuzz is killed, the next run stops the dind container's
    dockerd too, though it runs in the container's namespaces."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(workdir)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        # The run directory follows the log lines of the start.
        run_dir = next(
            (line.strip() for line in holder.stdout if line.startswith("/")), ""
        )
        assert run_dir, "the dind engine did not start"
        inner = [
            process
            for process in psutil.process_iter(["cmdline"])
            if (process.info["cmdline"] or [""])[0] == "dockerd"
            and any(run_dir in part for part in process.info["cmdline"])
        ]
    finally:
        holder.kill()
        holder.wait()
    assert len(inner) == 1

    reaped = reap_dead_runs(workdir)

    assert [str(path) for path in reaped] == [run_dir]
    assert not inner[0].is_running()
    assert processes_under(Path(run_dir)) == []
    assert mounts_under(Path(run_dir)) == []


def builders_list(cache: Path | None = None) -> dict[str, str]:
    """Run `buildfuzz builders list` and return its rows by kind and name."""
    environment = dict(os.environ)
    if cache is not None:
        environment["BUILDFUZZ_CACHE"] = str(cache)
    completed = subprocess.run(
        [sys.executable, "-m", "buildfuzz", "builders", "list"],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=120,
        check=True,
    )  # fmt: skip
    return {
        " ".join(cell.strip() for cell in line.split("│")[1:3]): line
        for line in completed.stdout.splitlines()
        if "│" in line
    }


@pytest.mark.usefixtures("installed")
def test_builders_list_shows_dind_engine() -> None:
    rows = builders_list()

    assert "docker.io of Debian trixie" in rows[f"engine {ENGINE}"]
    assert "│ yes" in rows[f"engine {ENGINE}"]
    assert "│ yes" in rows[f"engine option {ENGINE} storage vfs"]


def test_builders_list_says_why_dind_not(tmp_path: Path) -> None:
    rows = builders_list(tmp_path / "empty")

    assert "│ no" in rows[f"engine {ENGINE}"]
    assert "host engine 26.1 not" in rows[f"engine {ENGINE}"]
