"""Strategies for a case's build context: its files, bulk recipe and ignore files.

Every attribute is drawn with ``sampled_from`` over the profile's pool, so
shrinking moves it towards the pool's first value.
"""

from dataclasses import replace

from hypothesis import strategies as st

from buildfuzz.case import (
    BULK_DIR,
    DEEP_DIR,
    DOCKERFILE,
    BulkRecipe,
    ContextFile,
    FileKind,
)
from buildfuzz.profile import Profile

# Names that the build itself reads from the context root, and the
# directories that generated entries own.
RESERVED_NAMES = frozenset({DOCKERFILE, ".dockerignore", BULK_DIR, DEEP_DIR})
# Kinds whose entries contain data of a size drawn from the sizes pool.
SIZED_KINDS = frozenset({FileKind.FILE, FileKind.ARCHIVE})
# user.* extended attributes exist only on regular files and directories.
XATTR_KINDS = frozenset(
    {FileKind.FILE, FileKind.DIR, FileKind.SPARSE, FileKind.ARCHIVE}
)
DEVICE_KINDS = frozenset({FileKind.CHAR_DEVICE, FileKind.BLOCK_DEVICE})
MAX_NAME_BYTES = 255  # NAME_MAX of Linux file systems
LONG_COMPONENT = "long-" + "x" * 195  # 200 bytes: a directory on a long path


@st.composite
def context_files(
    draw: st.DrawFn, profile: Profile, reserved: frozenset[str] = RESERVED_NAMES
) -> tuple[ContextFile, ...]:
    """Draw the context's entries; none starts with a name in ``reserved``."""
    axes = profile.context
    count = draw(st.integers(min_value=0, max_value=axes.max_files))
    entries: list[ContextFile] = []
    taken: set[str] = set()

    for _ in range(count):
        entry = draw(_entry(profile))
        placed = _place(entry, entries, taken, reserved)
        if placed is not None:
            entries.append(placed)
            taken.add(placed.path)

    # The long path comes last, so that no hardlink or symlink points at it.
    length = draw(st.sampled_from(axes.path_lengths))
    if length:
        size = draw(st.sampled_from(axes.sizes))
        seed = draw(st.integers(min_value=0, max_value=255))
        entries.append(ContextFile(long_path(length), size=size, seed=seed))

    return tuple(entries)


@st.composite
def _entry(draw: st.DrawFn, profile: Profile) -> ContextFile:
    axes = profile.context
    depth = draw(st.integers(min_value=1, max_value=3))
    parts = [draw(st.sampled_from(axes.names)) for _ in range(depth)]
    kind = draw(st.sampled_from(axes.kinds))
    mode_pool = axes.dir_modes if kind is FileKind.DIR else axes.modes
    size = 0
    if kind in SIZED_KINDS:
        size = draw(st.sampled_from(axes.sizes))
    elif kind is FileKind.SPARSE:
        size = draw(st.sampled_from(axes.sparse_sizes))
    major = minor = 0
    if kind in DEVICE_KINDS:
        major, minor = draw(st.sampled_from(axes.devices))
    xattrs: tuple[tuple[str, str], ...] = ()
    if kind in XATTR_KINDS:
        xattrs = draw(st.sampled_from(axes.xattrs))

    return ContextFile(
        path="/".join(parts),
        kind=kind,
        size=size,
        mode=draw(st.sampled_from(mode_pool)),
        uid=draw(st.sampled_from(axes.owners)),
        gid=draw(st.sampled_from(axes.owners)),
        mtime_ns=draw(st.sampled_from(axes.mtimes_ns)),
        seed=draw(st.integers(min_value=0, max_value=255)),
        target=draw(st.sampled_from(axes.symlink_targets)),
        major=major,
        minor=minor,
        xattrs=xattrs,
    )


def long_path(length: int) -> str:
    """Return a path under ``deep/`` of exactly ``length`` bytes (at least 8).

    Directories of 200 bytes lead to a last name of at most 255 bytes, so
    every component fits NAME_MAX while the whole path may pass PATH_MAX.
    """
    parts = [DEEP_DIR]
    total = len(DEEP_DIR)
    while length - total - 1 > MAX_NAME_BYTES:
        parts.append(LONG_COMPONENT)
        total += 1 + len(LONG_COMPONENT)
    leaf = length - total - 1
    parts.append(("file-" + "y" * MAX_NAME_BYTES)[:leaf])
    return "/".join(parts)


def _place(
    entry: ContextFile,
    entries: list[ContextFile],
    taken: set[str],
    reserved: frozenset[str] = RESERVED_NAMES,
) -> ContextFile | None:
    """Fit ``entry`` into the tree drawn so far, or drop it when it clashes."""
    parts = entry.path.split("/")
    if parts[0] in reserved or entry.path in taken:
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


@st.composite
def bulk_recipes(draw: st.DrawFn, profile: Profile) -> BulkRecipe | None:
    """Draw the bulk recipe, or None when its file count is 0."""
    axes = profile.context
    count = draw(st.sampled_from(axes.bulk_files))
    if not count:
        return None
    return BulkRecipe(
        count=count,
        sizes=draw(st.sampled_from(axes.bulk_sizes)),
        depth=draw(st.sampled_from(axes.bulk_depths)),
        seed=draw(st.integers(min_value=0, max_value=255)),
    )


def dockerignore_patterns(
    profile: Profile,
) -> st.SearchStrategy[tuple[str, ...] | None]:
    pool = profile.context.dockerignore
    if not pool:
        return st.none()
    patterns = st.lists(st.sampled_from(pool), min_size=1, max_size=3).map(tuple)
    return st.none() | patterns


@st.composite
def dockerfile_dockerignore_patterns(
    draw: st.DrawFn, profile: Profile
) -> tuple[str, ...] | None:
    """Draw the patterns of ``<Dockerfile>.dockerignore``, or None for no file."""
    if not draw(st.sampled_from(profile.context.dockerfile_dockerignore)):
        return None
    pool = profile.context.dockerignore
    if not pool:
        return ()
    return tuple(draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3)))
