"""The file tree a case's build must give, for the instructions modelled exactly.

Modelled: ``FROM scratch``, ``FROM`` the local busybox or a registry base
of ``base_formats`` (the same busybox tree) and ``FROM`` an earlier stage;
``COPY`` and ``ADD`` of context paths (``.``, files, directories, with
numeric ``--chown`` and with ``--chmod``), ``WORKDIR``, and ``ENV``,
``ARG`` and ``USER``, which change no file. The context is the case's
files after its ``.dockerignore`` (``oracle_ignore``).

What the model cannot know is left out rather than guessed:

* A ``RUN`` step of the generator's own set makes the paths it writes
  opaque; any other ``RUN``, or an unknown instruction, skips the case.
* A ``COPY`` or ``ADD`` the model does not cover (globs, symlink sources,
  archives that ADD extracts, ``--from``, ``--link``, ``--parents``,
  ``--exclude``, ``--chown`` by name, heredocs) makes its destination
  opaque: nothing under it is compared.
* Attributes set at build time (the mtime of a directory that COPY
  creates, of an implied context directory, of the Dockerfile) are None.
* Entries the builders treat in ways not pinned down (FIFOs, devices,
  sockets, sparse files, a path re-included under an excluded directory)
  are opaque.

Measured on Docker 26.1 (BuildKit v0.13) and 20.10 (BuildKit v0.8), both
builders, and BuildKit v0.34 in a container, every output:

* COPY keeps the mtime of files, directories and symlinks; it sets owners
  to 0:0, or to the --chown owner, including the destination directory
  it creates (mode 0755).
* type=tar and ``docker image save`` keep whole seconds only (sub-second
  parts are cut; ``oracle_tree`` compares accordingly); type=local keeps
  nanoseconds.
* type=local does not keep owners: the buildx client writes every file as
  the user it runs as, so owners are not compared for it.
* Known deviations are rules in ``strategies/rules/differences.toml``.
"""

import json
import os
import shlex
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import PurePosixPath

from buildfuzz.base_formats import FORMATS_BY_IMAGE
from buildfuzz.bulk import BULK_MTIME_NS, DIR_MODE, FILE_MODE, bulk_dirs, bulk_files
from buildfuzz.case import Case, FileKind, Output, split_from
from buildfuzz.churn import churn_target
from buildfuzz.context import archive_content, file_content
from buildfuzz.oracle_ignore import IgnoreMatcher, UnsupportedPattern, read_ignore_file
from buildfuzz.oracle_tree import Node, NodeType, Tree, content_digest
from buildfuzz.strategies_dockerfile import BUSYBOX_IMAGE, SECRET_RUN_PATTERN

# RUN steps of the generator (strategies_dockerfile.FIXED_INSTRUCTIONS) and
# the paths each may write or leave behind as mount points.
KNOWN_RUNS: dict[str, tuple[str, ...]] = {
    "RUN ls -lan / > /listing.txt": ("/listing.txt",),
    "RUN <<EOF\necho heredoc > /tmp/heredoc.txt\nEOF": ("/tmp",),
    "RUN --mount=type=cache,target=/cache ls -lan /cache > /tmp/cache.txt": (
        "/cache",
        "/tmp",
    ),
    "RUN --mount=type=tmpfs,target=/scratch ls -lan /scratch > /tmp/tmpfs.txt": (
        "/scratch",
        "/tmp",
    ),
    "RUN --mount=type=bind,target=/mnt/context ls -lanR /mnt/context"
    " > /tmp/context.txt": ("/mnt", "/tmp"),
    "RUN --mount=type=secret,id=token cat /run/secrets/token || true": ("/run",),
}
# Magic numbers of the compressions that ADD detects: gzip, bzip2, xz, zstd.
_ARCHIVE_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
_GLOB = set("*?[\\$")


class Unmodelled(Exception):
    """The case contains something the model cannot predict, so it is not compared."""


@dataclass(frozen=True)
class Source:
    """One entry of the build context as the builder sees it."""

    type: NodeType
    mode: int | None
    size: int | None = None
    digest: str | None = None
    target: str | None = None
    mtime_ns: int | None = None
    inode: str = ""  # entries with the same inode are hardlinks of each other
    uncertain: bool = False  # whether the builder sends it depends on its walker
    archive_like: bool = False  # ADD may take it for an archive and extract it


@dataclass(frozen=True)
class ModelOptions:
    owners: bool = True  # false for type=local, which does not keep owners
    classic: bool = False  # the classic builder, which reads .dockerignore only


@cache
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def context_sources(case: Case, *, classic: bool = False) -> dict[str, Source]:
    """Return the context after its ignore file, by relative path.

    BuildKit (through buildx, on Docker 20.10 too) reads
    ``<Dockerfile>.dockerignore`` in place of ``.dockerignore`` when it
    exists; the classic builder reads ``.dockerignore`` only (measured).
    """
    patterns = case.dockerignore or ()
    if case.dockerfile_dockerignore is not None and not classic:
        patterns = case.dockerfile_dockerignore
    try:
        matcher = IgnoreMatcher(read_ignore_file(patterns))
    except UnsupportedPattern as error:
        raise Unmodelled(f".dockerignore: {error}") from None

    sources: dict[str, Source] = {}
    by_path = {entry.path: entry for entry in case.files}
    for entry in case.files:
        origin = by_path.get(entry.target) if entry.kind is FileKind.HARDLINK else None
        base = origin or entry
        inode = base.path
        if base.kind in (FileKind.FILE, FileKind.HARDLINK):
            content = file_content(base.seed, base.size)
            sources[entry.path] = _file(base.mode, content, base.mtime_ns, inode)
        elif base.kind is FileKind.ARCHIVE:
            content = archive_content(base.seed, base.size)
            sources[entry.path] = _file(base.mode, content, base.mtime_ns, inode)
        elif base.kind is FileKind.DIR:
            sources[entry.path] = Source(
                NodeType.DIR, base.mode & 0o7777, mtime_ns=base.mtime_ns
            )
        elif base.kind is FileKind.SYMLINK:
            sources[entry.path] = Source(
                NodeType.SYMLINK, None, target=base.target, mtime_ns=base.mtime_ns
            )
        else:
            sources[entry.path] = Source(NodeType.OTHER, None)
    churned = churn_target(case.files) if case.churn else None
    for path, source in list(sources.items()):
        if churned is not None and source.inode == churned:
            # Changed while the client sent it (hardlinks of it too): any
            # size, content or mtime.
            sources[path] = replace(source, size=None, digest=None, mtime_ns=None)
    if case.bulk is not None:
        for directory in bulk_dirs(case.bulk):
            sources[directory] = Source(NodeType.DIR, DIR_MODE, mtime_ns=BULK_MTIME_NS)
        for path, size in bulk_files(case.bulk):
            content = file_content(case.bulk.seed, size)
            sources[path] = _file(FILE_MODE, content, BULK_MTIME_NS, path)

    generated = 0o666 & ~_umask()
    dockerfile = case.dockerfile_text.encode("utf-8", "surrogateescape")
    sources[case.dockerfile_name] = _file(generated, dockerfile, None, "Dockerfile")
    if case.dockerignore is not None:
        text = "".join(line + "\n" for line in case.dockerignore)
        content = text.encode("utf-8", "surrogateescape")
        sources[".dockerignore"] = _file(generated, content, None, ".dockerignore")
    if case.dockerfile_dockerignore is not None:
        text = "".join(line + "\n" for line in case.dockerfile_dockerignore)
        content = text.encode("utf-8", "surrogateescape")
        name = case.dockerfile_name + ".dockerignore"
        sources[name] = _file(generated, content, None, name)

    implied = Source(NodeType.DIR, 0o777 & ~_umask())
    for path in list(sources):
        parts = path.split("/")
        for end in range(1, len(parts)):
            sources.setdefault("/".join(parts[:end]), implied)

    kept = {}
    for path, source in sources.items():
        if matcher.excluded(path):
            continue
        if matcher.excluded_ancestor(path):
            source = replace(source, uncertain=True)
        kept[path] = source
    if classic and matcher.excluded(case.dockerfile_name):
        # The docker CLI sends an excluded Dockerfile anyway and the daemon
        # deletes it before the build, leaving its directories behind.
        parts = case.dockerfile_name.split("/")
        for end in range(1, len(parts)):
            parent = "/".join(parts[:end])
            kept.setdefault(parent, Source(NodeType.DIR, None, uncertain=True))
    return kept


def _file(mode: int, content: bytes, mtime_ns: int | None, inode: str) -> Source:
    return Source(
        NodeType.FILE,
        mode & 0o7777,
        size=len(content),
        digest=content_digest(content),
        mtime_ns=mtime_ns,
        inode=inode,
        archive_like=content.startswith(_ARCHIVE_MAGIC) or content[257:262] == b"ustar",
    )


@dataclass
class _Stage:
    nodes: dict[str, Node]
    closed: set[str] = field(default_factory=set)
    opaque: set[str] = field(default_factory=set)
    user: bool = False  # a USER other than root is in effect

    def copy(self) -> "_Stage":
        return _Stage(dict(self.nodes), set(self.closed), set(self.opaque), self.user)


@dataclass(frozen=True)
class _Copy:
    instruction: str  # COPY or ADD
    sources: tuple[str, ...]
    destination: str
    chown: tuple[int, int] | None
    chmod: int | None
    modelled: bool  # false: flags the model does not cover


def expected_tree(case: Case, options: ModelOptions | None = None) -> Tree:
    """Return the tree ``case`` must build; raise Unmodelled when it can't say."""
    options = options or ModelOptions(owners=case.output is not Output.LOCAL)
    if case.context_from:
        # NOTE: not modelled: with a context from stdin the builders treat
        # .dockerignore and the Dockerfile differently (see README.md).
        raise Unmodelled(f"a context from stdin ({case.context_from})")
    if "," in case.platform:
        # Outputs then hold one tree per platform (linux_amd64/ and so on).
        raise Unmodelled(f"a multi-platform build ({case.platform})")
    sources = context_sources(case, classic=options.classic)
    stages = _split_stages(case.dockerfile)
    names = [name for name, _, _ in stages]
    wanted = names.index(case.target) if case.target in names else len(stages) - 1
    if case.target and case.target not in names:
        raise Unmodelled(f"target {case.target!r} is not a stage")
    built: dict[str, _Stage] = {}
    for index, (name, base, instructions) in enumerate(stages[: wanted + 1]):
        stage = _base(base, built, options)
        for number, instruction in enumerate(instructions):
            _apply(stage, instruction, sources, options, f"{index}.{number}")
        built[name or str(index)] = stage
    stage = built[names[wanted] or str(wanted)]
    nodes = {path: node for path, node in stage.nodes.items() if path != "/"}
    opaque = set(stage.opaque)
    if case.attest and case.output in (Output.TAR, Output.LOCAL):
        # BuildKit writes the attestations beside the file system (measured
        # with v0.34, and v0.12 and v0.15 for the SBOM); their content is the
        # builder's, not the case's.
        opaque.add("/provenance.json")
        opaque.add("/sbom.spdx.json")
    return Tree(nodes=nodes, closed=stage.closed, opaque=opaque)


def _split_stages(dockerfile: tuple[str, ...]) -> list[tuple[str, str, list[str]]]:
    stages: list[tuple[str, str, list[str]]] = []
    for element in dockerfile:
        if element.startswith("FROM "):
            parts = split_from(element)
            if parts is None:
                raise Unmodelled(f"FROM line {element!r}")
            # A --platform flag chooses the base's platform; the modelled
            # bases have the same files on every platform.
            stages.append((parts.alias, parts.image, []))
        elif not stages:
            raise Unmodelled("an instruction before FROM")
        else:
            stages[-1][2].append(element)
    if not stages:
        raise Unmodelled("no FROM")
    return stages


def _base(base: str, built: dict[str, _Stage], options: ModelOptions) -> _Stage:
    if base == "scratch":
        return _Stage({"/": Node(NodeType.DIR)}, closed={"/"})
    if base == BUSYBOX_IMAGE or base in FORMATS_BY_IMAGE:
        # Its files are not modelled; /bin, /etc and /tmp exist as directories.
        # The registry bases hold the same busybox tree in every format and on
        # every platform (base_formats).
        nodes = {"/": Node(NodeType.DIR)}
        stage = _Stage(nodes, opaque={"/bin", "/etc", "/tmp"})
        for path in ("/bin", "/etc", "/tmp"):
            nodes[path] = Node(NodeType.DIR)
        return stage
    if base in built:
        return built[base].copy()
    raise Unmodelled(f"base image {base!r}")


def _apply(
    stage: _Stage,
    element: str,
    sources: dict[str, Source],
    options: ModelOptions,
    step: str,
) -> None:
    if element in KNOWN_RUNS:
        stage.opaque.update(KNOWN_RUNS[element])
        return
    if SECRET_RUN_PATTERN.match(element):
        stage.opaque.add("/run")  # the mount point of the secret
        return
    if element.startswith("COPY <<"):
        destination = element.split("\n", 1)[0].split()[-1]
        stage.opaque.add(_absolute(destination))
        return
    lines = element.split("\n")
    if len(lines) > 1 and all(line.startswith("COPY ") for line in lines):
        for number, line in enumerate(lines):
            _apply(stage, line, sources, options, f"{step}.{number}")
        return
    keyword, _, rest = element.partition(" ")
    keyword = keyword.upper()
    if keyword in ("ENV", "ARG"):
        return
    if keyword == "USER":
        stage.user = rest.strip().split(":")[0] not in ("0", "root")
        return
    if keyword == "WORKDIR":
        _workdir(stage, rest.strip(), options)
        return
    if keyword in ("COPY", "ADD"):
        copy = _parse_copy(keyword, rest)
        _copy(stage, copy, sources, options, step)
        return
    raise Unmodelled(f"instruction {element.splitlines()[0][:60]!r}")


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise Unmodelled(f"relative path {path!r}")
    return str(PurePosixPath(path)) if path != "/" else "/"


def _workdir(stage: _Stage, path: str, options: ModelOptions) -> None:
    if not path.startswith("/") or any(c in path for c in "$\\\"'"):
        raise Unmodelled(f"WORKDIR {path!r}")
    owner = None if stage.user else (0, 0)
    _make_dirs(stage, _absolute(path), owner, None, options, "workdir", set())


def _parse_copy(keyword: str, rest: str) -> _Copy:
    words = rest.split(" ")
    flags = []
    while words and words[0].startswith("--"):
        flags.append(words.pop(0))
    arguments = " ".join(words).strip()
    if arguments.startswith("["):
        try:
            paths = [str(p) for p in json.loads(arguments)]
        except json.JSONDecodeError:
            raise Unmodelled(f"{keyword} arguments {arguments!r}") from None
    else:
        try:
            paths = shlex.split(arguments, posix=False)
        except ValueError:
            raise Unmodelled(f"{keyword} arguments {arguments!r}") from None
    if len(paths) < 2:
        raise Unmodelled(f"{keyword} without a destination")

    chown = chmod = None
    modelled = True
    for flag in flags:
        name, _, value = flag.partition("=")
        if name == "--chown" and _numeric_owner(value):
            user, _, group = value.partition(":")
            chown = (int(user), int(group or user))
        elif name == "--chmod" and value.isdigit() and set(value) <= set("01234567"):
            chmod = int(value, 8) & 0o7777
        else:
            modelled = False
    return _Copy(keyword, tuple(paths[:-1]), paths[-1], chown, chmod, modelled)


def _numeric_owner(value: str) -> bool:
    user, _, group = value.partition(":")
    return user.isdigit() and (group == "" or group.isdigit())


def _origin(copy: _Copy, sources: dict[str, Source]) -> str:
    if copy.chown is not None:
        return "copy-chown"
    if copy.chmod is not None:
        return "copy-chmod"
    if copy.sources == (".",):
        return "add-all" if copy.instruction == "ADD" else "copy-all"
    source = sources.get(_clean(copy.sources[0]))
    kind = "dir" if source is not None and source.type is NodeType.DIR else "file"
    return f"{copy.instruction.lower()}-{kind}"


def _clean(path: str) -> str:
    cleaned = str(PurePosixPath(path.lstrip("/")))
    return "." if cleaned in ("", ".") else cleaned


def _copy(
    stage: _Stage,
    copy: _Copy,
    sources: dict[str, Source],
    options: ModelOptions,
    step: str,
) -> None:
    destination = _absolute(copy.destination)
    if not copy.modelled or any(set(s) & _GLOB for s in copy.sources):
        stage.opaque.add(destination)
        return

    # (path in the image, context path) of everything this instruction writes.
    writes: list[tuple[str, str]] = []
    into = copy.destination.endswith("/") or len(copy.sources) > 1
    for raw in copy.sources:
        name = _clean(raw)
        source = sources.get(name)
        if name != "." and source is None:
            raise Unmodelled(f"source {raw!r} is not in the context")
        if source is not None and (
            source.type in (NodeType.SYMLINK, NodeType.OTHER)
            or source.uncertain
            or copy.instruction == "ADD"
            and source.archive_like
        ):
            # A followed symlink gets a name the model does not pin down;
            # ADD extracts an archive.
            stage.opaque.add(destination)
            return
        if name == "." or source is not None and source.type is NodeType.DIR:
            into = True
            prefix = "" if name == "." else name + "/"
            for path in sorted(sources):
                if path.startswith(prefix) and path != name:
                    writes.append((_join(destination, path[len(prefix) :]), path))
        elif copy.destination.endswith("/") or len(copy.sources) > 1:
            writes.append((_join(destination, name.rsplit("/", 1)[-1]), name))
        else:
            existing = stage.nodes.get(destination)
            if existing is not None and existing.type is NodeType.DIR:
                raise Unmodelled(f"{destination}: a file copied onto a directory")
            writes.append((destination, name))

    origin = _origin(copy, sources)
    before = set(stage.nodes)
    top = destination if into else destination.rsplit("/", 1)[0] or "/"
    _make_dirs(stage, top, copy.chown or (0, 0), copy.chmod, options, origin, before)
    for target, name in writes:
        _write(stage, target, sources[name], copy, options, origin, step, before)


def _join(directory: str, relative: str) -> str:
    return directory.rstrip("/") + "/" + relative if relative else directory


def _make_dirs(
    stage: _Stage,
    path: str,
    owner: tuple[int, int] | None,
    chmod: int | None,
    options: ModelOptions,
    origin: str,
    before: set[str],
) -> None:
    """Create ``path`` and its missing parents as COPY and WORKDIR do.

    The last directory gets ``owner`` (the --chown owner); parents above it
    only when that is root, the owner measured for every builder.
    """
    current = "/"
    for part in PurePosixPath(path).parts[1:]:
        parent, current = current, _join(current, part)
        node = stage.nodes.get(current)
        if node is not None:
            if node.type is not NodeType.DIR:
                raise Unmodelled(f"{current} is a {node.type}, not a directory")
            continue
        _touch_parent(stage, parent, before)
        known = owner is not None and options.owners
        known = known and (current == path or owner == (0, 0))
        stage.nodes[current] = Node(
            NodeType.DIR,
            # BuildKit v0.13 leaves a created destination 0755 under --chmod,
            # v0.34 gives it the --chmod mode.
            mode=0o755 if chmod is None else None,
            uid=owner[0] if known and owner else None,
            gid=owner[1] if known and owner else None,
            origin=origin,
        )
        stage.closed.add(current)


def _touch_parent(stage: _Stage, parent: str, before: set[str]) -> None:
    """A directory that existed before this instruction gets a new mtime."""
    node = stage.nodes.get(parent)
    if node is not None and parent in before and node.mtime_ns is not None:
        stage.nodes[parent] = replace(node, mtime_ns=None)


def _write(
    stage: _Stage,
    target: str,
    source: Source,
    copy: _Copy,
    options: ModelOptions,
    origin: str,
    step: str,
    before: set[str],
) -> None:
    if source.uncertain or source.type is NodeType.OTHER:
        stage.opaque.add(target)
        return
    parent = target.rsplit("/", 1)[0] or "/"
    node = stage.nodes.get(parent)
    if node is None or node.type is not NodeType.DIR:
        raise Unmodelled(f"{target}: parent is not a modelled directory")
    _touch_parent(stage, parent, before)

    chown = copy.chown or (0, 0)
    mode = source.mode
    if copy.chmod is not None and source.type is not NodeType.SYMLINK:
        mode = copy.chmod
    new = Node(
        source.type,
        mode=None if source.type is NodeType.SYMLINK else mode,
        uid=chown[0] if options.owners else None,
        gid=chown[1] if options.owners else None,
        size=source.size,
        digest=source.digest,
        target=source.target,
        mtime_ns=source.mtime_ns,
        link=f"{step}:{source.inode}" if source.type is NodeType.FILE else None,
        origin=origin,
    )
    old = stage.nodes.get(target)
    if old is not None:
        if (old.type is NodeType.DIR) != (new.type is NodeType.DIR):
            raise Unmodelled(f"{target}: a {new.type} replaces a {old.type}")
        if old.type is NodeType.SYMLINK:
            raise Unmodelled(f"{target}: a copy onto a symlink")
        if old.type is NodeType.DIR and target in before:
            # Merged into an existing directory: which attributes win is
            # not pinned down.
            new = Node(NodeType.DIR, origin=origin)
        if old.type is NodeType.FILE and _shares_data(stage, target, old):
            raise Unmodelled(f"{target}: a copy onto a hardlink")
    stage.nodes[target] = new


def _shares_data(stage: _Stage, target: str, old: Node) -> bool:
    return any(
        path != target and node.link == old.link and old.link is not None
        for path, node in stage.nodes.items()
    )
