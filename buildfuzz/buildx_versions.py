"""buildx plugins beyond Debian's: released versions built with Go, cached.

A builder definition may name ``buildx = "vX.Y.Z"``; its builds then use
that plugin through a private docker configuration of its own. The plugin
is compiled from the Go module proxy like the BuildKit daemons.
"""

import time
from pathlib import Path

import structlog

from buildfuzz.go_build import compile_release, staged_directory
from buildfuzz.paths import cache_root

log = structlog.get_logger(__name__)

BUILDX_MODULE = "github.com/docker/buildx"


def buildx_plugin_path(version: str) -> Path:
    return cache_root() / "buildx" / version / "docker-buildx"


def ensure_buildx_plugin(version: str) -> Path:
    """Return the ``docker-buildx`` plugin of ``version``, compiling it once."""
    plugin = buildx_plugin_path(version)
    if plugin.is_file():
        return plugin

    started = time.monotonic()
    log.info("buildx build started", version=version)
    with staged_directory(plugin.parent) as staging:
        compile_release(
            BUILDX_MODULE,
            version,
            staging,
            ["buildx"],
            program=f"buildx {version}",
            fix="choose an older buildx in builders/builders.toml",
        )
        (staging / "buildx").rename(staging / "docker-buildx")
    log.info(
        "buildx built", version=version, seconds=round(time.monotonic() - started, 1)
    )
    return plugin
