"""Where buildfuzz finds its data files and keeps its cache."""

import os
from pathlib import Path


def project_root() -> Path:
    """Return the directory that holds ``strategies/`` and ``builders/``.

    ``BUILDFUZZ_HOME`` overrides it; by default it is the source tree that
    this package was installed from in editable mode.
    """
    override = os.environ.get("BUILDFUZZ_HOME")
    if override:
        return Path(override)
    return Path(__file__).resolve().parent.parent


def cache_root() -> Path:
    """Return the download and build cache, ``~/.cache/buildfuzz`` by default."""
    override = os.environ.get("BUILDFUZZ_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "buildfuzz"


def strategies_dir() -> Path:
    return project_root() / "strategies"


def builders_dir() -> Path:
    return project_root() / "builders"
