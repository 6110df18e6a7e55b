"""The tree oracle: a successful build must give the file tree its case implies.

A built root filesystem is read into a ``Tree``: one ``Node`` per absolute
path with its type, permission bits, owner, size, content digest, symlink
target, hardlink group and mtime. It comes from the tar of ``type=tar``,
the directory of ``type=local``, or, for a loaded image (the classic
builder's only output), from the layers of ``docker image save``.

``oracle_model.expected_tree`` gives the tree the case implies, with
``None`` for every attribute it cannot know; ``compare`` lists the
differences, and ``tree_report`` turns them into a finding.
"""

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from docker import APIClient
from python_on_whales import DockerClient

from buildfuzz.signature import Phase, Signature

_CHUNK = 1 << 20


class NodeType(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    OTHER = "other"  # FIFOs, devices and sockets: compared by type only


@dataclass(frozen=True)
class Node:
    """One path of a tree. ``None`` (in an expected tree): not compared."""

    type: NodeType
    mode: int | None = None  # permission bits with setuid, setgid and sticky
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    digest: str | None = None  # sha256 of a file's content
    target: str | None = None  # a symlink's target
    mtime_ns: int | None = None
    link: str | None = None  # hardlink group: nodes with the same value share data
    origin: str = ""  # expected trees: the instruction that made the node


@dataclass
class Tree:
    """Paths of a root filesystem, such as ``/ctx/a``, and how far it is known.

    In an expected tree, ``closed`` lists directories whose whole content is
    known: any other path under them is extra. Paths under ``opaque`` are
    never compared (what a RUN step wrote, for example).
    """

    nodes: dict[str, Node] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)
    opaque: set[str] = field(default_factory=set)
    # A tar stores whole seconds unless a PAX header gives the fraction.
    whole_seconds: bool = False

    def is_opaque(self, path: str) -> bool:
        return any(_within(path, root) for root in self.opaque)

    def is_closed(self, path: str) -> bool:
        return any(_within(path, root) and path != root for root in self.closed)


def _within(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


def tar_path(name: str) -> str:
    """Return the absolute tree path of a tar member name."""
    stripped = name.strip("/")
    while stripped.startswith("./"):
        stripped = stripped[2:]
    if stripped in ("", "."):
        return "/"
    return "/" + stripped.rstrip("/")


def read_tar(path: Path) -> Tree:
    """Read a root filesystem tar, such as type=tar or ``docker export`` writes."""
    tree = Tree(whole_seconds=True)
    with tarfile.open(path, "r:", encoding="utf-8", errors="surrogateescape") as tar:
        for member in tar:
            tree.nodes[tar_path(member.name)] = _tar_node(tar, member)
    return _resolve_tar_links(tree)


def _tar_node(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Node:
    pax_time = member.pax_headers.get("mtime")
    node = Node(
        NodeType.OTHER,
        mode=stat.S_IMODE(member.mode),
        uid=member.uid,
        gid=member.gid,
        mtime_ns=_pax_time_ns(pax_time) if pax_time else int(member.mtime) * 10**9,
    )
    if member.isreg():
        stream = tar.extractfile(member)
        assert stream is not None
        digest, size = _digest(iter(lambda: stream.read(_CHUNK), b""))
        return replace(node, type=NodeType.FILE, size=size, digest=digest)
    if member.islnk():
        # Resolved in a second pass: the data is the link target's.
        return replace(node, type=NodeType.FILE, link=tar_path(member.linkname))
    if member.isdir():
        return replace(node, type=NodeType.DIR)
    if member.issym():
        return replace(node, type=NodeType.SYMLINK, target=member.linkname)
    return node


def _pax_time_ns(text: str) -> int:
    """Return nanoseconds of a PAX time such as ``-12.5`` or ``1700000000.1``."""
    negative = text.startswith("-")
    whole, _, fraction = text.lstrip("-").partition(".")
    value = int(whole or "0") * 10**9 + int((fraction + "0" * 9)[:9])
    return -value if negative else value


def _resolve_tar_links(tree: Tree) -> Tree:
    """Give hardlink members their target's data and one group name per inode."""
    groups: dict[str, str] = {}
    for name, node in tree.nodes.items():
        if node.link is not None:
            groups[name] = groups.get(node.link, node.link)
            groups.setdefault(node.link, node.link)
    for name, group in groups.items():
        node = tree.nodes[name]
        source = tree.nodes.get(group)
        if node.link is not None and source is not None:
            node = replace(node, size=source.size, digest=source.digest)
        tree.nodes[name] = replace(node, link=group)
    return tree


def read_directory(root: Path) -> Tree:
    """Read a root filesystem directory, such as type=local writes."""
    tree = Tree()
    inodes: dict[tuple[int, int], str] = {}
    for path, info in _walk(os.fsencode(root), b""):
        name = "/" + os.fsdecode(path) if path else "/"
        node = Node(
            NodeType.OTHER,
            mode=stat.S_IMODE(info.st_mode),
            uid=info.st_uid,
            gid=info.st_gid,
            mtime_ns=info.st_mtime_ns,
        )
        full = os.path.join(os.fsencode(root), path)
        if stat.S_ISREG(info.st_mode):
            link = None
            if info.st_nlink > 1:
                link = inodes.setdefault((info.st_dev, info.st_ino), name)
            with open(full, "rb") as stream:
                digest, size = _digest(iter(lambda: stream.read(_CHUNK), b""))
            node = replace(
                node, type=NodeType.FILE, size=size, digest=digest, link=link
            )
        elif stat.S_ISDIR(info.st_mode):
            node = replace(node, type=NodeType.DIR)
        elif stat.S_ISLNK(info.st_mode):
            target = os.fsdecode(os.readlink(full))
            node = replace(node, type=NodeType.SYMLINK, target=target)
        tree.nodes[name] = node
    return tree


def _walk(root: bytes, relative: bytes) -> Iterator[tuple[bytes, os.stat_result]]:
    full = os.path.join(root, relative) if relative else root
    info = os.lstat(full)
    yield relative, info
    if stat.S_ISDIR(info.st_mode):
        for name in sorted(os.listdir(full)):
            yield from _walk(root, os.path.join(relative, name) if relative else name)


def read_image(docker: DockerClient, image: str, work_dir: Path) -> Tree:
    """Read a loaded image's root filesystem from ``docker image save``.

    The layers are applied in order, with their whiteouts. (``docker
    export`` of a created container would be simpler, but on Docker 26.1 it
    leaves the container's overlay mount behind after ``docker rm``, which
    the engine-health oracle would take for the build's leak.)
    """
    saved = work_dir / "image-save.tar"
    try:
        _save_image(docker, image, saved)
        return read_saved_image(saved)
    finally:
        saved.unlink(missing_ok=True)


# Docker 20.10's, the oldest engine in builders/engines.toml.
_ENGINE_API_VERSION = "1.41"


def _save_image(docker: DockerClient, image: str, path: Path) -> None:
    """Write ``docker image save`` of ``image`` to ``path``.

    On a unix socket the Engine API request is made here: that spares the
    start of a docker CLI process, which takes longer than the save itself
    for a small image.
    """
    host = docker.client_config.host or ""
    if not host.startswith("unix://"):
        docker.image.save(image, path)
        return
    client = APIClient(base_url=host, version=_ENGINE_API_VERSION, timeout=300)
    try:
        with path.open("wb") as stream:
            for chunk in client.get_image(image, chunk_size=_CHUNK):
                stream.write(chunk)
    finally:
        client.close()


def read_saved_image(path: Path) -> Tree:
    """Apply the layers of a ``docker save`` tar into one tree."""
    tree = Tree(whole_seconds=True)
    with tarfile.open(path, "r:") as outer:
        manifest = json.loads(_member_bytes(outer, "manifest.json"))
        # An image of no layer (FROM scratch with ENV only) has "Layers": null.
        for layer in manifest[0].get("Layers") or []:
            _apply_layer_bytes(tree, _member_bytes(outer, layer))
    return _resolve_tar_links(tree)


# Media types of a manifest list, whose entries are per-platform images.
_INDEX_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
)


def read_oci_layout(path: Path) -> Tree:
    """Apply the layers of the image in an OCI image layout tar (type=oci).

    Nested indexes are followed to the first image that is not an
    attestation (whose platform is ``unknown/unknown``).
    """
    tree = Tree(whole_seconds=True)
    with tarfile.open(path, "r:") as outer:

        def blob(descriptor: dict[str, Any]) -> bytes:
            algorithm, _, digest = descriptor["digest"].partition(":")
            return _member_bytes(outer, f"blobs/{algorithm}/{digest}")

        document = json.loads(_member_bytes(outer, "index.json"))
        while document.get("mediaType") in _INDEX_TYPES or "manifests" in document:
            images = [
                entry
                for entry in document["manifests"]
                if entry.get("platform", {}).get("os") != "unknown"
            ]
            document = json.loads(blob(images[0]))
        for layer in document.get("layers") or []:
            _apply_layer_bytes(tree, blob(layer))
    return _resolve_tar_links(tree)


def _apply_layer_bytes(tree: Tree, data: bytes) -> None:
    if data.startswith(b"\x1f\x8b"):
        data = gzip.decompress(data)
    elif data.startswith(b"\x28\xb5\x2f\xfd"):
        raise ValueError("a zstd-compressed layer, which the tree oracle cannot read")
    with tarfile.open(
        fileobj=io.BytesIO(data),
        mode="r:",
        encoding="utf-8",
        errors="surrogateescape",
    ) as tar:
        _apply_layer(tree, tar)


def _member_bytes(archive: tarfile.TarFile, name: str) -> bytes:
    stream = archive.extractfile(name)
    if stream is None:
        raise ValueError(f"{name} is not a file in the saved image")
    return stream.read()


def _apply_layer(tree: Tree, tar: tarfile.TarFile) -> None:
    for member in tar:
        path = tar_path(member.name)
        directory, _, name = path.rpartition("/")
        directory = directory or "/"
        if name == ".wh..wh..opq":
            _remove_under(tree, directory, keep_root=True)
        elif name.startswith(".wh."):
            _remove_under(tree, _join_path(directory, name[4:]), keep_root=False)
        else:
            node = _tar_node(tar, member)
            old = tree.nodes.get(path)
            if old is not None and not (
                old.type is NodeType.DIR and node.type is NodeType.DIR
            ):
                _remove_under(tree, path, keep_root=False)
            tree.nodes[path] = node


def _join_path(directory: str, name: str) -> str:
    return directory.rstrip("/") + "/" + name


def _remove_under(tree: Tree, root: str, *, keep_root: bool) -> None:
    for path in [p for p in tree.nodes if _within(p, root)]:
        if not (keep_root and path == root):
            del tree.nodes[path]


def _digest(chunks: Iterable[bytes]) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def content_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# Kinds of difference, most severe first; a finding is named by its first.
KINDS = (
    "missing",
    "extra",
    "type",
    "content",
    "size",
    "target",
    "hardlink",
    "owner",
    "mode",
    "mtime",
)


@dataclass(frozen=True)
class Difference:
    kind: str
    path: str
    expected: str
    actual: str
    node_type: str  # the expected type, or the actual one for extra paths
    origin: str  # the instruction that made the path, or "" when unknown

    def line(self) -> str:
        where = f" ({self.origin})" if self.origin else ""
        return (
            f"{self.kind:<8} {self.path}{where}: expected {self.expected}, "
            f"got {self.actual}"
        )


def compare(expected: Tree, actual: Tree) -> list[Difference]:
    """List how ``actual`` differs from ``expected``, most severe kinds first."""
    differences: list[Difference] = []
    for path, want in sorted(expected.nodes.items()):
        if expected.is_opaque(path):
            continue
        have = actual.nodes.get(path)
        if have is None:
            differences.append(
                Difference(
                    "missing", path, str(want.type), "nothing", want.type, want.origin
                )
            )
            continue
        differences.extend(_compare_node(path, want, have, actual))
    differences.extend(_extra_paths(expected, actual))
    differences.extend(_hardlink_differences(expected, actual))
    order = {kind: index for index, kind in enumerate(KINDS)}
    return sorted(differences, key=lambda d: (order[d.kind], d.path))


def _compare_node(path: str, want: Node, have: Node, actual: Tree) -> list[Difference]:
    def difference(kind: str, expected: object, got: object) -> Difference:
        return Difference(kind, path, str(expected), str(got), want.type, want.origin)

    if want.type != have.type:
        return [difference("type", want.type, have.type)]
    found = []
    if (
        want.digest is not None
        and have.digest is not None
        and want.digest != have.digest
    ):
        found.append(difference("content", want.digest[:12], have.digest[:12]))
    if want.size is not None and want.size != have.size:
        found.append(difference("size", want.size, have.size))
    if want.target is not None and want.target != have.target:
        found.append(difference("target", repr(want.target), repr(have.target)))
    if _differs(want.uid, have.uid) or _differs(want.gid, have.gid):
        found.append(
            difference("owner", f"{want.uid}:{want.gid}", f"{have.uid}:{have.gid}")
        )
    if want.mode is not None and want.mode != have.mode:
        found.append(difference("mode", f"{want.mode:04o}", f"{have.mode or 0:04o}"))
    if want.mtime_ns is not None and have.mtime_ns is not None:
        if not _same_time(want.mtime_ns, have.mtime_ns, actual.whole_seconds):
            found.append(difference("mtime", want.mtime_ns, have.mtime_ns))
    return found


def _differs(wanted: int | None, got: int | None) -> bool:
    return wanted is not None and wanted != got


def _same_time(wanted: int, got: int, whole_seconds: bool) -> bool:
    """Compare mtimes; a whole second in a tar may be the wanted one cut or rounded."""
    if wanted == got:
        return True
    second = 10**9
    if not whole_seconds or got % second:
        return False
    return got in (wanted - wanted % second, (wanted + second // 2) // second * second)


def _extra_paths(expected: Tree, actual: Tree) -> Iterator[Difference]:
    for path, have in sorted(actual.nodes.items()):
        if path in expected.nodes or expected.is_opaque(path):
            continue
        if expected.is_closed(path):
            origin = _origin_of_parent(expected, path)
            yield Difference(
                "extra", path, "nothing", str(have.type), have.type, origin
            )


def _origin_of_parent(expected: Tree, path: str) -> str:
    parent = path.rsplit("/", 1)[0] or "/"
    while parent not in expected.nodes and parent != "/":
        parent = parent.rsplit("/", 1)[0] or "/"
    node = expected.nodes.get(parent)
    return node.origin if node else ""


def _hardlink_differences(expected: Tree, actual: Tree) -> Iterator[Difference]:
    """Paths that share data in the model must share it in the tree, and back."""
    compared = {
        path: node
        for path, node in expected.nodes.items()
        if node.type is NodeType.FILE
        and node.link is not None
        and not expected.is_opaque(path)
        and path in actual.nodes
    }
    for path, want in sorted(compared.items()):
        partners = {p for p, n in compared.items() if n.link == want.link}
        have = actual.nodes[path]
        shared = {path} | {
            p
            for p in compared
            if have.link is not None and actual.nodes[p].link == have.link
        }
        if partners != shared:
            yield Difference(
                "hardlink",
                path,
                ", ".join(sorted(partners)),
                ", ".join(sorted(shared)) or "no link",
                want.type,
                want.origin,
            )


# Instructions, simplest first: a finding is named after the simplest one
# that shows its kind of difference.
_ORIGIN_GROUPS = {
    "copy-all": "COPY",
    "copy-file": "COPY",
    "copy-dir": "COPY",
    "add-all": "ADD",
    "add-file": "ADD",
    "add-dir": "ADD",
    "copy-chown": "COPY --chown",
    "copy-chmod": "COPY --chmod",
    "workdir": "WORKDIR",
}
_GROUP_ORDER = ("COPY", "ADD", "WORKDIR", "COPY --chown", "COPY --chmod", "")
_SPECIAL_BITS = 0o7000


def origin_group(origin: str) -> str:
    return _ORIGIN_GROUPS.get(origin, origin)


def first_difference(differences: list[Difference]) -> Difference:
    """The most severe difference, from the simplest instruction, by path."""
    order = {kind: index for index, kind in enumerate(KINDS)}

    def key(difference: Difference) -> tuple[int, int, str]:
        group = origin_group(difference.origin)
        rank = _GROUP_ORDER.index(group) if group in _GROUP_ORDER else len(_GROUP_ORDER)
        return order[difference.kind], rank, difference.path

    return min(differences, key=key)


def describe(difference: Difference) -> str:
    """Say what kind of difference this is, without paths or values.

    The same cause on other files gives the same text: a mode says which
    group of bits differs, not the modes themselves.
    """
    group = origin_group(difference.origin)
    where = f" from {group}" if group else ""
    text = f"{difference.kind} of a {difference.node_type}{where}"
    if difference.kind == "mode":
        try:
            wanted, got = int(difference.expected, 8), int(difference.actual, 8)
        except ValueError:
            return text
        changes = []
        special = (wanted ^ got) & _SPECIAL_BITS
        if special & wanted:
            changes.append("special bits lost")
        if special & got:
            changes.append("special bits gained")
        if (wanted ^ got) & 0o777:
            changes.append("permission bits differ")
        text += ": " + ", ".join(changes)
    return text


def tree_signature(differences: list[Difference]) -> Signature:
    """Name a finding by its most severe kind of difference (see ``describe``)."""
    return Signature(
        Phase.RESULT, f"tree differs: {describe(first_difference(differences))}"
    )


def render_differences(differences: list[Difference], limit: int = 200) -> str:
    lines = [difference.line() for difference in differences[:limit]]
    if len(differences) > limit:
        lines.append(f"... and {len(differences) - limit} more")
    return "\n".join(lines) + "\n"
