"""Fetch everything a run needs into the cache: engines, client, base parts."""

import os
import shutil

import structlog

from buildfuzz.definitions import Definitions, PackageSet
from buildfuzz.errors import SetupError
from buildfuzz.packages import ensure_tree, tree_is_ready, tree_path

log = structlog.get_logger(__name__)

CLIENT_TREE = "client"
BUSYBOX_TREE = "busybox"
BUSYBOX_PACKAGES = (PackageSet(suite="bookworm", names=("busybox-static",)),)


def engine_tree_name(engine: str) -> str:
    return f"engine-{engine}"


def ensure_installed(definitions: Definitions, engines: list[str]) -> None:
    """Download and unpack the client, ``engines`` and the busybox base."""
    if os.geteuid() != 0:
        raise SetupError("buildfuzz setup needs root: run it with sudo or as root")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SetupError("apt-get and dpkg-deb not found; buildfuzz needs Debian's apt")

    ensure_tree(CLIENT_TREE, definitions.client.packages)
    ensure_tree(BUSYBOX_TREE, BUSYBOX_PACKAGES)
    for name in engines:
        ensure_tree(engine_tree_name(name), definitions.engines[name].packages)


def missing_trees(definitions: Definitions, engines: list[str]) -> list[str]:
    """Return the names of the package trees that ``ensure_installed`` would fetch."""
    wanted = [(CLIENT_TREE, definitions.client.packages)]
    wanted.append((BUSYBOX_TREE, BUSYBOX_PACKAGES))
    wanted += [
        (engine_tree_name(name), definitions.engines[name].packages) for name in engines
    ]
    return [name for name, packages in wanted if not tree_is_ready(name, packages)]


def busybox_binary() -> str:
    return str(tree_path(BUSYBOX_TREE) / "bin" / "busybox")
