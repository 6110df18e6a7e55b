"""Materialize a case's build context into a directory.

Every entry is created relative to an open file descriptor of its parent
directory, so that paths longer than PATH_MAX (4096 bytes) work too.
"""

import bz2
import gzip
import hashlib
import io
import lzma
import os
import socket
import stat
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from buildfuzz.bulk import BULK_MTIME_NS, DIR_MODE, FILE_MODE, bulk_dirs, bulk_files
from buildfuzz.case import BulkRecipe, Case, ContextFile, FileKind

_CHUNK = 1 << 20
# A file name that no generated entry has: a socket is bound under it first,
# because a unix socket address has room for at most 107 bytes of path.
_SOCKET_TEMP = b".buildfuzz-socket"
ARCHIVE_COMPRESSIONS = ("gz", "bz2", "xz")  # chosen by an archive's seed
DEVICE_KINDS = {FileKind.CHAR_DEVICE: stat.S_IFCHR, FileKind.BLOCK_DEVICE: stat.S_IFBLK}


def content_block(seed: int) -> bytes:
    """Return the 64-byte block that a file's content repeats.

    Content is a pure function of the seed and the size, so that a shell
    script can recreate it without buildfuzz (see ``repro``).
    """
    return hashlib.sha256(f"buildfuzz-{seed}".encode()).digest() * 2


def file_content(seed: int, size: int) -> bytes:
    block = content_block(seed)
    repeats = size // len(block) + 1
    return (block * repeats)[:size]


def archive_content(seed: int, size: int) -> bytes:
    """Return a compressed tar that ADD extracts: ``tarred/`` with two members.

    ``tarred/file`` contains ``size`` bytes of the seed's content and
    ``tarred/link`` is a symlink to it. Every header field is fixed, so the
    bytes depend only on the seed, the size and the compression library.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        directory = tarfile.TarInfo("tarred")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        archive.addfile(directory)
        member = tarfile.TarInfo("tarred/file")
        member.size = size
        member.mode = 0o644
        archive.addfile(member, io.BytesIO(file_content(seed, size)))
        link = tarfile.TarInfo("tarred/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "file"
        archive.addfile(link)
    raw = buffer.getvalue()

    compression = ARCHIVE_COMPRESSIONS[seed % len(ARCHIVE_COMPRESSIONS)]
    if compression == "gz":
        return gzip.compress(raw, mtime=0)
    if compression == "bz2":
        return bz2.compress(raw)
    return lzma.compress(raw, format=lzma.FORMAT_XZ)


def materialize(case: Case, directory: Path) -> Path:
    """Write the case's context, Dockerfile and .dockerignore files under ``directory``.

    Returns the context path. Attributes are applied deepest first, so a
    directory's mode and mtime are set after its children are written.
    """
    directory.mkdir(parents=True, exist_ok=False)
    _made_directories.clear()
    root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for entry in case.files:
            _create(root, entry)
        if case.bulk is not None:
            _create_bulk(directory, case.bulk)
        for entry in sorted(case.files, key=lambda e: e.path.count("/"), reverse=True):
            _apply_attributes(root, entry)
    finally:
        os.close(root)

    dockerfile = directory / case.dockerfile_name
    dockerfile.parent.mkdir(parents=True, exist_ok=True)
    _write(dockerfile, case.dockerfile_text)
    if case.dockerignore is not None:
        _write(directory / ".dockerignore", _lines(case.dockerignore))
    if case.dockerfile_dockerignore is not None:
        specific = dockerfile.with_name(dockerfile.name + ".dockerignore")
        _write(specific, _lines(case.dockerfile_dockerignore))

    return directory


def _lines(patterns: tuple[str, ...]) -> str:
    return "".join(pattern + "\n" for pattern in patterns)


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


@contextmanager
def _parent(root: int, path: str, *, create: bool) -> Iterator[tuple[int, bytes]]:
    """Yield an open descriptor of ``path``'s parent directory and its last name.

    Each directory on the way is opened relative to the one before, creating
    it first when ``create`` is set, so no system call gets the whole path.
    """
    encoded = os.fsencode(path)
    if len(encoded) < SHORT_PATH:
        # Short paths need no walk: one call relative to the root is enough,
        # and opening every directory on the way made 100k-file contexts
        # several times slower than cp -a. (Generated paths never run
        # through a symlink: strategies place nothing below a non-directory.)
        parent_path, _, last = encoded.rpartition(b"/")
        if parent_path and create and parent_path not in _made_directories:
            os.makedirs(_proc_path(root, parent_path), 0o755, exist_ok=True)
            _made_directories.add(parent_path)
        yield root, encoded
        return
    *directories, name = encoded.split(b"/")
    descriptor = os.dup(root)
    try:
        for part in directories:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=descriptor)
                except FileExistsError:
                    pass
            child = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=descriptor
            )
            os.close(descriptor)
            descriptor = child
        yield descriptor, name
    finally:
        os.close(descriptor)


SHORT_PATH = 3000  # bytes; longer paths are reached one directory at a time
# Directories that the current materialize() call has created.
_made_directories: set[bytes] = set()


def _proc_path(descriptor: int, name: bytes) -> bytes:
    """Return a short path to ``name`` in an open directory (for setxattr, bind)."""
    return f"/proc/self/fd/{descriptor}/".encode() + name


def _create(root: int, entry: ContextFile) -> None:
    with _parent(root, entry.path, create=True) as (parent, name):
        kind = entry.kind
        if kind is FileKind.FILE:
            _write_content(parent, name, entry)
        elif kind is FileKind.SPARSE:
            descriptor = _open_new(parent, name)
            try:
                os.ftruncate(descriptor, entry.size)
            finally:
                os.close(descriptor)
        elif kind is FileKind.ARCHIVE:
            data = archive_content(entry.seed, entry.size)
            _write_bytes(parent, name, data)
        elif kind is FileKind.DIR:
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass
        elif kind is FileKind.SYMLINK:
            os.symlink(os.fsencode(entry.target), name, dir_fd=parent)
        elif kind is FileKind.HARDLINK:
            with _parent(root, entry.target, create=False) as (source, source_name):
                os.link(
                    source_name,
                    name,
                    src_dir_fd=source,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                )
        elif kind is FileKind.FIFO:
            os.mkfifo(name, 0o600, dir_fd=parent)
        elif kind in DEVICE_KINDS:
            device = os.makedev(entry.major, entry.minor)
            os.mknod(name, 0o600 | DEVICE_KINDS[kind], device, dir_fd=parent)
        elif kind is FileKind.SOCKET:
            _make_socket(parent, name)

        # user.* attributes exist only on regular files and directories.
        for attribute, value in entry.xattrs:
            os.setxattr(
                _proc_path(parent, name),
                attribute,
                value.encode("utf-8", "surrogateescape"),
                follow_symlinks=False,
            )


def _make_socket(parent: int, name: bytes) -> None:
    """Leave a unix socket node at ``name``: bind a listener, then close it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(_proc_path(parent, _SOCKET_TEMP))
    finally:
        listener.close()
    os.rename(_SOCKET_TEMP, name, src_dir_fd=parent, dst_dir_fd=parent)


def _open_new(parent: int, name: bytes) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    return os.open(name, flags, 0o600, dir_fd=parent)


def _write_content(parent: int, name: bytes, entry: ContextFile) -> None:
    block = content_block(entry.seed)
    chunk = block * (_CHUNK // len(block))
    descriptor = _open_new(parent, name)
    try:
        remaining = entry.size
        while remaining > 0:
            written = os.write(descriptor, chunk[: min(remaining, len(chunk))])
            remaining -= written
    finally:
        os.close(descriptor)


def _write_bytes(parent: int, name: bytes, data: bytes) -> None:
    descriptor = _open_new(parent, name)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view) :]
    finally:
        os.close(descriptor)


def _apply_attributes(root: int, entry: ContextFile) -> None:
    if entry.kind is FileKind.HARDLINK:
        return  # it shares the inode, and so every attribute, with its source

    with _parent(root, entry.path, create=False) as (parent, name):
        os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
        if entry.kind is not FileKind.SYMLINK:
            # chmod after chown: chown clears the setuid and setgid bits.
            os.chmod(name, stat.S_IMODE(entry.mode), dir_fd=parent)
        times = (entry.mtime_ns, entry.mtime_ns)
        os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)


def _create_bulk(directory: Path, recipe: BulkRecipe) -> None:
    """Expand the bulk recipe: files 0644, directories 0755, owner 0:0, one mtime."""
    root = os.fsencode(directory)
    directories = [os.path.join(root, os.fsencode(d)) for d in bulk_dirs(recipe)]
    for path in directories:
        os.makedirs(path, exist_ok=True)

    contents: dict[int, bytes] = {}
    times = (BULK_MTIME_NS, BULK_MTIME_NS)
    for relative, size in bulk_files(recipe):
        if size not in contents:
            contents[size] = file_content(recipe.seed, size)
        path = os.path.join(root, os.fsencode(relative))
        with open(path, "wb") as stream:
            stream.write(contents[size])
        os.chown(path, 0, 0)
        os.chmod(path, FILE_MODE)
        os.utime(path, ns=times)
    for path in reversed(directories):
        os.chown(path, 0, 0)
        os.chmod(path, DIR_MODE)
        os.utime(path, ns=times)
