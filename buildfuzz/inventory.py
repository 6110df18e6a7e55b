"""``buildfuzz builders list``: every defined engine and builder, and whether
it can run on this machine."""

from dataclasses import dataclass
from pathlib import Path

from buildfuzz.buildkit_images import buildkit_binaries_dir
from buildfuzz.capabilities import privileged_problem
from buildfuzz.definitions import BuilderDefinition, Definitions, EngineDefinition
from buildfuzz.dind import dind_problem, rootfs_ready
from buildfuzz.doctor import overlay_supported, version_of
from buildfuzz.external import daemon_status
from buildfuzz.install import (
    CLIENT_TREE,
    builder_problem,
    engine_tree_name,
    missing_trees,
)
from buildfuzz.packages import tree_path
from buildfuzz.rootless import rootless_problem


@dataclass(frozen=True)
class Entry:
    kind: str  # "engine", "engine option" or "builder"
    name: str
    version: str
    usable: bool
    reason: str = ""


def engine_entries(definitions: Definitions) -> list[Entry]:
    entries = []
    for engine in definitions.engines.values():
        if engine.source == "dind":
            entries += _dind_entries(definitions, engine)
            continue
        if engine.source == "external":
            version, problem = daemon_status(engine)
            entries.append(
                Entry("engine", engine.name, version, problem is None, problem or "")
            )
            continue
        missing = missing_trees(definitions, [engine.name])
        dockerd = tree_path(engine_tree_name(engine.name)) / "usr/sbin/dockerd"
        printed = version_of([str(dockerd), "--version"]) if not missing else None
        runs = printed is not None
        reason = "" if runs else "not downloaded: run `buildfuzz setup`"
        problem = rootless_problem() if runs and engine.rootless else None
        if problem is not None:
            runs, reason = False, problem
        # "Docker version 26.1.5+dfsg1, build 411e817"
        version = printed.split(" ")[2].rstrip(",") if printed else "?"
        entries.append(Entry("engine", engine.name, version, runs, reason))
        entries += _option_entries(engine, runs)
    return entries


def _dind_entries(definitions: Definitions, engine: EngineDefinition) -> list[Entry]:
    host = engine.host_engine
    assert host is not None, "dind definitions are linked to their host on loading"
    version = f"docker.io of Debian {engine.release}"
    reason = ""
    if missing_trees(definitions, [engine.name]):
        reason = f"host engine {host.name} not downloaded: run `buildfuzz setup`"
    reason = reason or dind_problem(engine) or ""
    usable = not reason
    if usable and not rootfs_ready(engine.release):
        reason = "its image is made with mmdebstrap on first use"
    entries = [Entry("engine", engine.name, version, usable, reason)]
    for driver in engine.storage_drivers:
        entries.append(
            Entry(
                "engine option",
                f"{engine.name} storage {driver}",
                "",
                usable,
                "" if usable else "engine not usable",
            )
        )
    return entries


def _option_entries(engine: EngineDefinition, engine_runs: bool) -> list[Entry]:
    entries = []
    tree = tree_path(engine_tree_name(engine.name))
    for driver in engine.storage_drivers:
        usable, reason = engine_runs, "" if engine_runs else "engine not usable"
        if usable and driver == "overlay2" and not overlay_supported():
            usable, reason = False, "the kernel has no overlay file system"
        if usable and driver == "fuse-overlayfs":
            if not Path("/dev/fuse").exists():
                usable, reason = False, "/dev/fuse is missing (modprobe fuse)"
            elif not (tree / "usr/bin/fuse-overlayfs").exists():
                usable, reason = False, "fuse-overlayfs is not in the engine's packages"
        entries.append(
            Entry(
                "engine option", f"{engine.name} storage {driver}", "", usable, reason
            )
        )
    problem = privileged_problem(engine) if engine_runs else "engine not usable"
    if engine.rootless:
        problem = (
            "left out: builder containers on a rootless engine cannot reach "
            "the loopback registry"
        )
    entries.append(
        Entry(
            "engine option",
            f"{engine.name} privileged containers (docker-container driver)",
            "",
            problem is None,
            problem or "",
        )
    )
    if engine.containerd_store:
        entries.append(
            Entry(
                "engine option",
                f"{engine.name} containerd image store",
                "",
                engine_runs,
                "" if engine_runs else "engine not usable",
            )
        )
    return entries


def builder_entries(definitions: Definitions) -> list[Entry]:
    buildx = tree_path(CLIENT_TREE) / "usr/libexec/docker/cli-plugins/docker-buildx"
    buildx_version = version_of([str(buildx), "version"]) if buildx.exists() else None
    return [
        _builder_entry(definitions, b, buildx_version)
        for b in definitions.builders.values()
    ]


def _builder_entry(
    definitions: Definitions, builder: BuilderDefinition, buildx_version: str | None
) -> Entry:
    if builder.classic:
        return Entry("builder", builder.name, "engine's own", True)
    if buildx_version is None:
        return Entry("builder", builder.name, "?", False, "buildx not downloaded")
    buildx = builder.buildx or buildx_version.split(" ")[1]
    version = f"buildx {buildx} ({builder.driver})"
    if builder.buildkit:
        version += f", BuildKit {builder.buildkit}"
    problem = builder_problem(definitions, builder.name)
    if problem is not None:
        return Entry("builder", builder.name, version, False, problem)
    built = buildkit_binaries_dir(builder.buildkit) / "buildkitd"
    if builder.buildkit and not built.exists():
        return Entry(
            "builder", builder.name, version, True, "BuildKit is built on first use"
        )
    return Entry("builder", builder.name, version, True)


def all_entries(definitions: Definitions) -> list[Entry]:
    return engine_entries(definitions) + builder_entries(definitions)
