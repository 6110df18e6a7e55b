"""Fetch everything a run needs into the cache: engines, client, base parts."""

import fcntl
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from buildfuzz.definitions import Definitions, EngineDefinition, PackageSet
from buildfuzz.errors import SetupError
from buildfuzz.packages import ensure_tree, tree_is_ready, tree_path
from buildfuzz.paths import cache_root

log = structlog.get_logger(__name__)

CLIENT_TREE = "client"
BUSYBOX_TREE = "busybox"
BUSYBOX_PACKAGES = (PackageSet(suite="bookworm", names=("busybox-static",)),)


def engine_tree_name(engine: str) -> str:
    return f"engine-{engine}"


def ensure_installed(
    definitions: Definitions,
    engines: list[str],
    builders: list[str] | None = None,
    bases: Iterable[str] = (),
    attestations: Iterable[str] = (),
) -> None:
    """Download and unpack the client, ``engines`` and the busybox base.

    The BuildKit versions of ``builders`` are compiled too (minutes each on
    the first call, then cached), what publishing the registry ``bases``
    needs, and the SBOM scanner when ``attestations`` (values of
    case.ATTESTATIONS) ask for SBOMs.
    """
    if os.geteuid() != 0:
        raise SetupError("buildfuzz setup needs root: run it with sudo or as root")
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise SetupError("apt-get and dpkg-deb not found; buildfuzz needs Debian's apt")
    with cache_lock():
        _install(definitions, engines, builders or [], list(bases), attestations)


def _install(
    definitions: Definitions,
    engines: list[str],
    builders: list[str],
    bases: list[str],
    attestations: Iterable[str],
) -> None:
    ensure_tree(CLIENT_TREE, definitions.client.packages)
    ensure_tree(BUSYBOX_TREE, BUSYBOX_PACKAGES)
    for name in engines:
        definition = definitions.engines[name]
        if definition.source == "dind":
            _ensure_dind(definition)
        elif definition.source == "debian":
            ensure_tree(engine_tree_name(name), definition.packages)
    # buildkit_images imports this module for the tree names.
    from buildfuzz.base_formats import FORMATS_BY_NAME
    from buildfuzz.buildkit_images import RUNC_ENGINE, ensure_buildkit_binaries
    from buildfuzz.registry import registry_binary

    # runc for BuildKit images and host daemons (the registry bases are built
    # by one) comes from this engine's tree.
    if any(definitions.builders[b].buildkit for b in builders) or any(
        name in FORMATS_BY_NAME for name in bases
    ):
        ensure_tree(
            engine_tree_name(RUNC_ENGINE), definitions.engines[RUNC_ENGINE].packages
        )
        registry_binary()
    from buildfuzz.buildx_versions import ensure_buildx_plugin

    for plugin in sorted({definitions.builders[b].buildx for b in builders} - {""}):
        ensure_buildx_plugin(plugin)
    for version in sorted({definitions.builders[b].buildkit for b in builders} - {""}):
        log.info("building BuildKit if not cached", version=version)
        ensure_buildkit_binaries(version)
    # The registry bases: their BuildKit, runc, registry and foreign busybox.
    from buildfuzz.base_publisher import ensure_base_parts

    ensure_base_parts(bases)
    from buildfuzz.sbom_scanner import ensure_scanner_binary, needs_scanner

    if any(needs_scanner(value) for value in attestations):
        log.info("building the sbom scanner if not cached")
        try:
            ensure_scanner_binary()
        except SetupError as error:
            # Runs then skip the SBOM cases and log the reason once.
            log.warning(
                "sbom scanner not built; sbom cases will be skipped", error=str(error)
            )


@contextmanager
def cache_lock() -> Iterator[None]:
    """Hold the cache's set-up lock: one buildfuzz at a time fills the cache.

    Two set-ups on one machine (a run and the tests, say) would otherwise
    unpack and compile into the same directories at once.
    """
    path = cache_root() / "setup.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another buildfuzz set-up to finish", lock=str(path))
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def builder_problem(definitions: Definitions, name: str) -> str | None:
    """Return why builder ``name`` cannot run here, or None when it can."""
    from buildfuzz.buildkit_images import buildkit_binaries_dir
    from buildfuzz.go_build import go_toolchain

    builder = definitions.builders[name]
    if builder.driver == "kubernetes" and not kubeconfig_present():
        return "no Kubernetes cluster: set KUBECONFIG or create ~/.kube/config"
    if builder.buildx:
        from buildfuzz.buildx_versions import buildx_plugin_path

        try:
            go_toolchain()
        except SetupError as error:
            if not buildx_plugin_path(builder.buildx).exists():
                return str(error)
    if builder.buildkit:
        try:
            go_toolchain()
        except SetupError as error:
            if (
                not buildkit_binaries_dir(builder.buildkit)
                .joinpath("buildkitd")
                .exists()
            ):
                return str(error)
    return None


def kubeconfig_present() -> bool:
    configured = os.environ.get("KUBECONFIG")
    if configured:
        return any(Path(part).is_file() for part in configured.split(":"))
    return (Path.home() / ".kube" / "config").is_file()


def _ensure_dind(definition: EngineDefinition) -> None:
    """Fetch a dind engine's host engine and make its image's root file system.

    Without mmdebstrap the engine is left out with a warning, so that the
    other engines can still be set up. `buildfuzz builders list` gives the reason.
    """
    from buildfuzz.dind import dind_problem, ensure_rootfs

    host = definition.host_engine
    assert host is not None, "dind definitions are linked to their host on loading"
    if host.source == "debian":
        ensure_tree(engine_tree_name(host.name), host.packages)
    problem = dind_problem(definition)
    if problem is not None:
        log.warning("dind engine left out", engine=definition.name, reason=problem)
        return
    ensure_rootfs(definition.release)


def missing_trees(definitions: Definitions, engines: list[str]) -> list[str]:
    """Return the names of the package trees that ``ensure_installed`` would fetch."""
    wanted = [(CLIENT_TREE, definitions.client.packages)]
    wanted.append((BUSYBOX_TREE, BUSYBOX_PACKAGES))
    for name in engines:
        definition = definitions.engines[name]
        # A dind engine needs the tree of the engine its container runs on.
        if definition.source == "dind" and definition.host_engine is not None:
            definition = definition.host_engine
        if definition.source == "debian":
            wanted.append((engine_tree_name(definition.name), definition.packages))
    return [name for name, packages in wanted if not tree_is_ready(name, packages)]


def engine_tree(definitions: Definitions, name: str) -> Path:
    """Return the directory an engine's binaries run from."""
    return definition_tree(definitions.engines[name])


def definition_tree(definition: EngineDefinition) -> Path:
    """Return the directory the binaries of ``definition`` run from.

    A dind engine's binaries are in its image; its tree is not used.
    """
    if definition.source == "binaries":
        return Path(definition.path)
    return tree_path(engine_tree_name(definition.name))


def busybox_binary() -> str:
    return str(tree_path(BUSYBOX_TREE) / "bin" / "busybox")
