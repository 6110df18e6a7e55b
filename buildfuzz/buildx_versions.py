"""buildx plugins beyond Debian's: released versions built with Go, cached.

A builder definition may name ``buildx = "vX.Y.Z"``; its builds then use
that plugin through a private docker configuration of its own. The plugin
is compiled from the Go module proxy like the BuildKit daemons.
"""

import os
import shutil
import time
from pathlib import Path

import structlog

from buildfuzz.buildkit_images import (
    BuildkitRelease,
    _check_go_version,
    _download_module,
    _go,
    go_toolchain,
)
from buildfuzz.paths import cache_root
from buildfuzz.workdir import remove_tree

log = structlog.get_logger(__name__)

BUILDX_MODULE = "github.com/docker/buildx"


def buildx_plugin_path(version: str) -> Path:
    return cache_root() / "buildx" / version / "docker-buildx"


def ensure_buildx_plugin(version: str) -> Path:
    """Return the ``docker-buildx`` plugin of ``version``, compiling it once."""
    plugin = buildx_plugin_path(version)
    if plugin.is_file():
        return plugin

    release = BuildkitRelease(version, BUILDX_MODULE, f"buildx {version}")
    go = go_toolchain()
    started = time.monotonic()
    log.info("buildx build started", version=version)
    staging = plugin.parent.with_name(f"{version}.partial-{os.getpid()}")
    remove_tree(staging)
    staging.mkdir(parents=True)
    try:
        module = _download_module(go, release)
        _check_go_version(go, release, Path(module["Dir"]) / "go.mod")
        source = staging / "source"
        shutil.copytree(module["Dir"], source, symlinks=True)
        for path in (source, *source.rglob("*")):
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
        package = f"{BUILDX_MODULE}/version"
        ldflags = [
            f"-X {package}.Version={version}",
            f"-X {package}.Package={BUILDX_MODULE}",
        ]
        _go(
            go,
            ["build", "-mod=mod", "-trimpath", "-ldflags", " ".join(ldflags),
             "-o", str(staging / "docker-buildx"), "./cmd/buildx"],
            f"compile buildx {version}",
            cwd=source,
        )  # fmt: skip
        shutil.rmtree(source)
        remove_tree(plugin.parent)
        staging.rename(plugin.parent)
    finally:
        remove_tree(staging)
    log.info(
        "buildx built", version=version, seconds=round(time.monotonic() - started, 1)
    )
    return plugin
