"""The environment record written with every finding."""

import platform
from importlib.metadata import version
from typing import Any

from python_on_whales import DockerClient, DockerException

from buildfuzz import __version__
from buildfuzz.engine import EngineInfo


def describe(
    docker: DockerClient,
    engine: EngineInfo | None,
    *,
    seed: int,
    profile: str,
    embedded_buildkit: str = "",
) -> dict[str, Any]:
    """Return versions and settings that could decide a build's outcome."""
    record: dict[str, Any] = {
        "buildfuzz": __version__,
        "seed": seed,
        "profile": profile,
        "python": platform.python_version(),
        "hypothesis": version("hypothesis"),
        "python_on_whales": version("python-on-whales"),
        "kernel": platform.release(),
        "machine": platform.machine(),
    }
    if engine is not None:
        record["engine"] = {
            "version": engine.version,
            "api_version": engine.api_version,
            "storage_driver": engine.storage_driver,
            "containerd": engine.containerd_version,
            "operating_system": engine.operating_system,
        }
    try:
        record["docker_cli"] = docker.version().client.version  # type: ignore[union-attr]
        record["buildx"] = docker.buildx.version()
        nodes = docker.buildx.inspect().nodes
        reported = nodes[0].version if nodes else None
        if embedded_buildkit and reported in (None, "v0.0.0+unknown"):
            # Debian's dockerd leaves the embedded BuildKit's version unset.
            reported = f"{embedded_buildkit} (embedded in the engine)"
        record["buildkit"] = reported
    except (DockerException, AttributeError, IndexError) as error:
        record["client_error"] = str(error)
    return record
