"""Hypothesis strategies that generate cases from a profile.

Every axis is drawn with ``sampled_from`` over the profile's pool, so that
shrinking moves each axis towards its first (default) value.
"""

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hypothesis import strategies as st

from buildfuzz.case import Case, ContextFile, FileKind, Output
from buildfuzz.profile import Profile

# Names that the build itself reads from the context root.
RESERVED_NAMES = frozenset({"Dockerfile", ".dockerignore"})
# A reference whose registry is "localhost": if the engine ever looks for it
# in a registry, it asks 127.0.0.1, never a public host.
BUSYBOX_IMAGE = "localhost/buildfuzz/busybox:1"
NATIVE_PLATFORMS = ("", "linux/amd64")
# Storage drivers that have a containerd snapshotter built into containerd.
CONTAINERD_DRIVERS = ("overlay2", "vfs")
BASE_IMAGES = {"scratch": "scratch", "busybox": BUSYBOX_IMAGE}
SHELL_INSTRUCTIONS = frozenset({"run"})


@dataclass(frozen=True)
class Target:
    """An engine and a builder that a case may run on."""

    engine: str
    builder: str
    outputs: tuple[Output, ...] = (Output.LOAD,)
    storage_drivers: tuple[str, ...] = ("overlay2",)
    containerd_store: bool = False
    limits: bool = True  # data-root and memory limits; not for existing daemons


def cases(profile: Profile, targets: Sequence[Target]) -> st.SearchStrategy[Case]:
    """Return a strategy for cases of ``profile`` on one of ``targets``."""
    if not targets:
        raise ValueError("at least one target is needed")
    return _case_strategy(profile, tuple(targets))


@st.composite
def _case_strategy(
    draw: st.DrawFn, profile: Profile, targets: tuple[Target, ...]
) -> Case:
    target = draw(st.sampled_from(targets))
    engine_options = draw(engine_settings(profile, target))
    files = draw(context_files(profile))
    dockerignore = draw(dockerignore_patterns(profile))
    dockerfile = draw(dockerfiles(profile, files))

    # Outputs the builder cannot produce are never drawn: such a build would
    # only ever fail with the builder's "not supported" message.
    outputs = [o for o in profile.build.outputs if o in target.outputs]
    output = draw(st.sampled_from(outputs)) if outputs else Output.LOAD
    platforms = profile.build.platforms
    if any(BUSYBOX_IMAGE in line for line in dockerfile):
        # The local busybox base exists for the machine's platform only; any
        # other platform would make the engine look for it in a registry.
        platforms = tuple(p for p in platforms if p in NATIVE_PLATFORMS) or ("",)
    platform = draw(st.sampled_from(platforms))
    build_args = draw(_subset(profile.build.build_args))

    return Case(
        files=files,
        dockerignore=dockerignore,
        dockerfile=dockerfile,
        engine=target.engine,
        **engine_options,
        builder=target.builder,
        platform=platform,
        build_args=build_args,
        output=output,
    )


@st.composite
def engine_settings(draw: st.DrawFn, profile: Profile, target: Target) -> dict:
    """Draw the daemon options; options the engine lacks are never drawn."""
    axes = profile.engine
    stores = [s for s in axes.containerd_store if not s or target.containerd_store]
    containerd_store = draw(st.sampled_from(stores or [False]))
    # "" is the engine's own default driver; other drivers need support, and
    # the containerd image store has snapshotters for overlay2 and vfs only.
    drivers = [
        d for d in axes.storage_drivers
        if not d or (d in target.storage_drivers
                     and (not containerd_store or d in CONTAINERD_DRIVERS))
    ]  # fmt: skip
    return {
        "storage_driver": draw(st.sampled_from(drivers or [""])),
        "containerd_store": containerd_store,
        "data_root_mib": draw(st.sampled_from(axes.data_root_mib))
        if target.limits
        else 0,
        "memory_mib": draw(st.sampled_from(axes.memory_mib)) if target.limits else 0,
    }


@st.composite
def context_files(draw: st.DrawFn, profile: Profile) -> tuple[ContextFile, ...]:
    axes = profile.context
    count = draw(st.integers(min_value=0, max_value=axes.max_files))
    entries: list[ContextFile] = []
    taken: set[str] = set()

    for _ in range(count):
        depth = draw(st.integers(min_value=1, max_value=3))
        parts = [draw(st.sampled_from(axes.names)) for _ in range(depth)]
        path = "/".join(parts)
        kind = draw(st.sampled_from(axes.kinds))
        mode_pool = axes.dir_modes if kind is FileKind.DIR else axes.modes
        entry = ContextFile(
            path=path,
            kind=kind,
            size=draw(st.sampled_from(axes.sizes)) if kind is FileKind.FILE else 0,
            mode=draw(st.sampled_from(mode_pool)),
            uid=draw(st.sampled_from(axes.owners)),
            gid=draw(st.sampled_from(axes.owners)),
            mtime_ns=draw(st.sampled_from(axes.mtimes_ns)),
            seed=draw(st.integers(min_value=0, max_value=255)),
            target=draw(st.sampled_from(axes.symlink_targets)),
        )
        placed = _place(entry, entries, taken)
        if placed is not None:
            entries.append(placed)
            taken.add(placed.path)

    return tuple(entries)


def _place(
    entry: ContextFile, entries: list[ContextFile], taken: set[str]
) -> ContextFile | None:
    """Fit ``entry`` into the tree drawn so far, or drop it when it clashes."""
    parts = entry.path.split("/")
    if parts[0] in RESERVED_NAMES or entry.path in taken:
        return None
    # A path may not run through an earlier non-directory, nor may a
    # non-directory be placed where an earlier path needs a directory.
    for index in range(1, len(parts)):
        prefix = "/".join(parts[:index])
        if prefix in taken and _kind_of(prefix, entries) is not FileKind.DIR:
            return None
    if entry.kind is not FileKind.DIR and any(
        other.path.startswith(entry.path + "/") for other in entries
    ):
        return None

    if entry.kind is FileKind.HARDLINK:
        sources = [other for other in entries if other.kind is FileKind.FILE]
        if not sources:
            return replace(entry, kind=FileKind.FILE, target="")
        # A hardlink shares the inode, and so every attribute, of its source.
        source = sources[entry.seed % len(sources)]
        return replace(
            source, path=entry.path, kind=FileKind.HARDLINK, target=source.path
        )
    if entry.kind is FileKind.SYMLINK:
        return replace(entry, target=entry.target or _relative_target(entry, entries))

    return replace(entry, target="")


def _relative_target(entry: ContextFile, entries: list[ContextFile]) -> str:
    depth = entry.path.count("/")
    if not entries:
        return "missing"
    other = entries[entry.seed % len(entries)]
    return "../" * depth + other.path


def _kind_of(path: str, entries: list[ContextFile]) -> FileKind | None:
    for entry in entries:
        if entry.path == path:
            return entry.kind
    return None


def dockerignore_patterns(
    profile: Profile,
) -> st.SearchStrategy[tuple[str, ...] | None]:
    pool = profile.context.dockerignore
    if not pool:
        return st.none()
    patterns = st.lists(st.sampled_from(pool), min_size=1, max_size=3).map(tuple)
    return st.none() | patterns


@st.composite
def dockerfiles(
    draw: st.DrawFn, profile: Profile, files: tuple[ContextFile, ...]
) -> tuple[str, ...]:
    axes = profile.dockerfile
    base = draw(st.sampled_from(axes.bases))
    kinds = axes.instructions
    if base == "scratch":
        kinds = tuple(kind for kind in kinds if kind not in SHELL_INSTRUCTIONS)
    if not kinds:
        kinds = ("copy-all",)

    count = draw(st.integers(min_value=1, max_value=max(1, axes.max_instructions)))
    lines = [f"FROM {BASE_IMAGES[base]}"]
    for _ in range(count):
        kind = draw(st.sampled_from(kinds))
        index = draw(st.integers(min_value=0, max_value=255))
        lines.append(render_instruction(kind, files, index))

    return tuple(lines)


def render_instruction(kind: str, files: tuple[ContextFile, ...], index: int) -> str:
    """Render one Dockerfile instruction of ``kind`` about a chosen file."""
    source = _pick_source(kind, files, index)
    if kind == "copy-all":
        return "COPY . /ctx/"
    if kind in ("copy-file", "copy-dir"):
        return _copy("COPY", [], source, "/picked/")
    if kind == "add-file":
        return _copy("ADD", [], source, "/added/")
    if kind == "copy-chown-id":
        return _copy("COPY", ["--chown=1000:1000"], source, "/owned/")
    if kind == "copy-chown-name":
        return _copy("COPY", ["--chown=nobody:nogroup"], source, "/owned/")
    if kind == "copy-chmod":
        return _copy("COPY", ["--chmod=0750"], source, "/modes/")
    if kind == "run":
        return "RUN ls -lan / > /listing.txt"
    if kind == "workdir":
        return "WORKDIR /work/dir"
    if kind == "env":
        return "ENV BUILDFUZZ_ENV=value"
    if kind == "arg":
        return "ARG BUILDFUZZ_ARG=default"
    raise ValueError(f"unknown instruction kind {kind!r}")


def _pick_source(kind: str, files: tuple[ContextFile, ...], index: int) -> str:
    wanted = FileKind.DIR if kind == "copy-dir" else None
    candidates = [f.path for f in files if wanted is None or f.kind is wanted]
    if not candidates:
        return "."
    return candidates[index % len(candidates)]


def _copy(instruction: str, flags: list[str], source: str, dest: str) -> str:
    prefix = " ".join([instruction, *flags])
    if _needs_json_form(source):
        # The JSON form takes any file name; surrogate escapes stay escaped.
        arguments = json.dumps([source, dest], ensure_ascii=False)
        return f"{prefix} {arguments}"
    return f"{prefix} {source} {dest}"


def _needs_json_form(path: str) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return any(char.isspace() or char in "\"'\\$" for char in path)


def _subset(pairs: tuple[tuple[str, str], ...]) -> st.SearchStrategy:
    if not pairs:
        return st.just(())
    return st.lists(st.sampled_from(pairs), unique=True, max_size=len(pairs)).map(
        lambda chosen: tuple(sorted(chosen))
    )
