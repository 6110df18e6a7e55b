"""Privileged containers and the capability bounding set of buildfuzz."""

from dataclasses import replace
from pathlib import Path

import docker
import pytest

from buildfuzz import campaign
from buildfuzz.baseimage import import_busybox
from buildfuzz.capabilities import (
    missing_from_bounding_set,
    name_of,
    privileged_problem,
)
from buildfuzz.definitions import load_definitions
from buildfuzz.install import busybox_binary
from tests.conftest import REPO, buildfuzz, client_tools, start_engine

FULL = "CapBnd:\t000001ffffffffff\n"
NO_SYS_RESOURCE = "Name:\tx\nCapBnd:\t000001fffeffffff\nCapAmb:\t0\n"


def test_missing_capabilities_from_bounding_set() -> None:
    assert missing_from_bounding_set(FULL, 40) == []
    assert missing_from_bounding_set(NO_SYS_RESOURCE, 40) == [24]
    # A kernel that defines fewer capabilities than the mask contains.
    assert missing_from_bounding_set("CapBnd:\t0000003fffffffff\n", 37) == []


def test_only_kernel_caps_engines_affected() -> None:
    engines = load_definitions().engines
    assert engines["20.10"].privileged_caps == "kernel"
    assert engines["26.1"].privileged_caps == "own"
    problem = privileged_problem(engines["20.10"], [24])
    assert problem is not None
    assert "CAP_SYS_RESOURCE" in problem
    assert privileged_problem(engines["20.10"], []) is None
    assert privileged_problem(engines["26.1"], [24]) is None


def test_container_builders_left_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    definitions = load_definitions()
    monkeypatch.setattr(
        campaign, "privileged_problem", lambda e: privileged_problem(e, [24])
    )
    assert not campaign._fits_engine(definitions, "20.10", "container-v0-34")
    assert campaign._fits_engine(definitions, "20.10", "classic")
    assert campaign._fits_engine(definitions, "20.10", "remote-v0-34")
    assert campaign._fits_engine(definitions, "26.1", "container-v0-34")
    monkeypatch.setattr(
        campaign, "privileged_problem", lambda e: privileged_problem(e, [])
    )
    assert campaign._fits_engine(definitions, "20.10", "container-v0-34")
    external = replace(definitions.engines["26.1"], source="external", host="x")
    definitions.engines["26.1"] = external
    assert campaign._fits_engine(definitions, "26.1", "container-v0-34")


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("name", ["20.10", "26.1"])
def test_problem_matches_privileged_container(name: str, run_dir: Path) -> None:
    """privileged_problem returns a reason exactly when a privileged container fails."""
    engine = start_engine(name, run_dir)
    try:
        cli = client_tools(run_dir).docker(engine.host)
        import_busybox(cli, Path(busybox_binary()), run_dir)
        client = engine.api_client()
        error = ""
        try:
            client.containers.run(
                "localhost/buildfuzz/busybox:1",
                ["true"],
                privileged=True,
                network_mode="none",
                remove=True,
            )
        except docker.errors.APIError as failure:
            error = str(failure)
        finally:
            client.close()
    finally:
        engine.stop()
    problem = privileged_problem(engine.definition)
    if problem is None:
        assert error == ""
    else:
        assert "unable to apply caps" in error


@pytest.mark.usefixtures("installed")
def test_builders_list_names_missing_capability() -> None:
    completed = buildfuzz("builders", "list", cwd=REPO)
    row = next(
        line
        for line in completed.stdout.splitlines()
        if "20.10 privileged containers" in line
    )
    missing = missing_from_bounding_set()

    if missing:
        assert "│ no" in row
        # The table wraps its cells, so only the name's start is searched.
        assert name_of(missing[0])[:12] in completed.stdout
    else:
        assert "│ yes" in row
