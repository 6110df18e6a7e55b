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
from collections.abc import Iterable
from pathlib import Path

from buildfuzz.bulk import BULK_MTIME_NS, DIR_MODE, FILE_MODE, bulk_files
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

    Returns the context path. Directories are made first. Every other entry
    gets its owner, mode, extended attributes and mtime as soon as it is
    written, through its open descriptor where it has one. Explicit
    directories get theirs last, deepest first, so that writing their
    children cannot change their mtime.
    """
    directory.mkdir(parents=True, exist_ok=False)
    root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _ContextWriter(root).write(case)
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


SHORT_PATH = 3000  # bytes; longer paths are reached one directory at a time
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
_FD_KINDS = frozenset({FileKind.FILE, FileKind.SPARSE, FileKind.ARCHIVE})
# Mode bits that open() cannot set for good: chown and write clear them, and
# open drops setgid for a group that the process is not in, so files with
# either bit get an fchmod at the end.
_SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID


def _proc_path(descriptor: int, name: bytes) -> bytes:
    """Return a short path to ``name`` in an open directory (for setxattr, bind)."""
    return f"/proc/self/fd/{descriptor}/".encode() + name


def _encode(path: str) -> bytes:
    return path.encode("utf-8", "surrogateescape")


def _umask() -> int:
    """Return the process umask, or 0o777 when /proc does not show it.

    /proc/self/status has it since Linux 4.7; os.umask() would have to
    change it for a moment, which a thread creating files could see.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o777


class _ContextWriter:
    """Create a case's entries under the open directory ``root``.

    Each directory is made once, and each entry is reached from an open
    descriptor of its parent, so no system call resolves a whole path.
    A regular file is created with its final mode where the umask allows,
    and is chowned only when its owner differs from the owner that the
    first new file in the same directory got from the kernel. So most
    files cost four system calls: openat, write, futimens and close.
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self.made: set[bytes] = {b""}  # directories that exist, relative to root
        self.blocks: dict[int, bytes] = {}  # content_block() by seed
        self.umask = _umask()

    def write(self, case: Case) -> None:
        directories: list[tuple[bytes, ContextFile]] = []
        by_parent: dict[bytes, list[tuple[bytes, ContextFile]]] = {}
        hardlinks: list[tuple[bytes, ContextFile]] = []
        for entry in case.files:
            path = _encode(entry.path)
            if entry.kind is FileKind.DIR:
                directories.append((path, entry))
            elif entry.kind is FileKind.HARDLINK:
                hardlinks.append((path, entry))
            else:
                parent, _, name = path.rpartition(b"/")
                by_parent.setdefault(parent, []).append((name, entry))

        for path, entry in directories:
            self._make_directory(path, entry)
        # NOTE: two writer threads were no faster on a shared 2-core machine:
        # the time goes to file creation in the kernel, and cp -a uses one.
        for parent, items in by_parent.items():
            self._make_parents(parent)
            self._write_group(parent, items)
        # A hardlink's source may be any entry, so the links come after them.
        for path, entry in hardlinks:
            self._make_parents(path.rpartition(b"/")[0])
            self._link(path, entry)
        if case.bulk is not None:
            self._write_bulk(case.bulk)

        deepest_first = sorted(directories, key=lambda d: d[0].count(b"/"))
        for path, entry in reversed(deepest_first):
            self._apply_by_name(path, entry)

    def _make_parents(self, parent: bytes) -> None:
        if parent in self.made:
            return
        if len(parent) < SHORT_PATH:
            os.makedirs(_proc_path(self.root, parent), 0o755, exist_ok=True)
        else:
            os.close(self._open_directory(parent, create=True))
        self.made.add(parent)

    def _make_directory(self, path: bytes, entry: ContextFile) -> None:
        parent_path, _, name = path.rpartition(b"/")
        self._make_parents(parent_path)
        parent = self._open_directory(parent_path)
        try:
            try:
                os.mkdir(name, 0o755, dir_fd=parent)
            except FileExistsError:
                pass  # an implicit parent of an earlier entry
            for attribute, value in entry.xattrs:
                os.setxattr(
                    _proc_path(parent, name),
                    attribute,
                    _encode(value),
                    follow_symlinks=False,
                )
        finally:
            self._close(parent)
        self.made.add(path)

    def _open_directory(self, path: bytes, *, create: bool = False) -> int:
        """Open the directory at ``path`` (the root itself when it is empty)."""
        if not path:
            return self.root
        if len(path) < SHORT_PATH:
            return os.open(path, _DIRECTORY, dir_fd=self.root)
        descriptor = os.dup(self.root)
        try:
            for part in path.split(b"/"):
                if create:
                    try:
                        os.mkdir(part, 0o755, dir_fd=descriptor)
                    except FileExistsError:
                        pass
                child = os.open(part, _DIRECTORY, dir_fd=descriptor)
                os.close(descriptor)
                descriptor = child
        except BaseException:
            os.close(descriptor)
            raise
        return descriptor

    def _close(self, descriptor: int) -> None:
        if descriptor != self.root:
            os.close(descriptor)

    def _write_group(
        self, parent_path: bytes, items: list[tuple[bytes, ContextFile]]
    ) -> None:
        parent = self._open_directory(parent_path)
        try:
            owner: tuple[int, int] | None = None
            for name, entry in items:
                if entry.kind in _FD_KINDS:
                    owner = self._write_file(parent, name, entry, owner)
                else:
                    self._make_node(parent, name, entry)
                    _apply_at(parent, name, entry)
        finally:
            self._close(parent)

    def _write_file(
        self,
        parent: int,
        name: bytes,
        entry: ContextFile,
        owner: tuple[int, int] | None,
    ) -> tuple[int, int]:
        """Write a regular file and set its attributes through its descriptor.

        ``owner`` is the uid and gid that a new file in ``parent`` gets, or
        None when no file there was written yet. Returns it.
        """
        mode = stat.S_IMODE(entry.mode)
        # An unprivileged process can set user.* attributes only on a file
        # that its mode lets it write, so those files get their mode last.
        exact = not (mode & (self.umask | _SPECIAL_BITS) or entry.xattrs)
        descriptor = os.open(name, _NEW_FILE, mode if exact else 0o600, dir_fd=parent)
        try:
            if owner is None:
                created = os.fstat(descriptor)
                owner = (created.st_uid, created.st_gid)
            if entry.kind is FileKind.SPARSE:
                os.ftruncate(descriptor, entry.size)
            elif entry.kind is FileKind.ARCHIVE:
                _write_all(descriptor, archive_content(entry.seed, entry.size))
            elif entry.size:
                self._write_content(descriptor, entry.seed, entry.size)
            for attribute, value in entry.xattrs:
                os.setxattr(descriptor, attribute, _encode(value))
            if (entry.uid, entry.gid) != owner:
                os.fchown(descriptor, entry.uid, entry.gid)
            if not exact:
                # chmod after chown: chown clears the setuid and setgid bits.
                os.fchmod(descriptor, mode)
            os.utime(descriptor, ns=(entry.mtime_ns, entry.mtime_ns))
        finally:
            os.close(descriptor)
        return owner

    def _write_content(self, descriptor: int, seed: int, size: int) -> None:
        block = self.blocks.get(seed)
        if block is None:
            block = self.blocks[seed] = content_block(seed)
        if size <= _CHUNK:
            _write_all(descriptor, (block * (size // len(block) + 1))[:size])
            return
        chunk = memoryview(block * (_CHUNK // len(block)))
        remaining = size
        while remaining > 0:
            remaining -= os.write(descriptor, chunk[: min(remaining, len(chunk))])

    def _make_node(self, parent: int, name: bytes, entry: ContextFile) -> None:
        kind = entry.kind
        if kind is FileKind.SYMLINK:
            os.symlink(_encode(entry.target), name, dir_fd=parent)
        elif kind is FileKind.FIFO:
            os.mkfifo(name, 0o600, dir_fd=parent)
        elif kind in DEVICE_KINDS:
            device = os.makedev(entry.major, entry.minor)
            os.mknod(name, 0o600 | DEVICE_KINDS[kind], device, dir_fd=parent)
        elif kind is FileKind.SOCKET:
            _make_socket(parent, name)
        else:
            raise ValueError(f"cannot create {entry.path!r} of kind {kind}")
        # Generated cases give user.* attributes only to regular files and
        # directories; the kernel rejects them on these kinds.
        for attribute, value in entry.xattrs:
            os.setxattr(
                _proc_path(parent, name),
                attribute,
                _encode(value),
                follow_symlinks=False,
            )

    def _link(self, path: bytes, entry: ContextFile) -> None:
        source_path, _, source_name = _encode(entry.target).rpartition(b"/")
        parent_path, _, name = path.rpartition(b"/")
        source = self._open_directory(source_path)
        try:
            parent = self._open_directory(parent_path)
            try:
                os.link(
                    source_name,
                    name,
                    src_dir_fd=source,
                    dst_dir_fd=parent,
                    follow_symlinks=False,
                )
            finally:
                self._close(parent)
        finally:
            self._close(source)

    def _apply_by_name(self, path: bytes, entry: ContextFile) -> None:
        parent_path, _, name = path.rpartition(b"/")
        parent = self._open_directory(parent_path)
        try:
            _apply_at(parent, name, entry)
        finally:
            self._close(parent)

    def _write_bulk(self, recipe: BulkRecipe) -> None:
        """Expand the bulk recipe: files 0644, directories 0755, owner 0:0, one mtime.

        The directories are made before the files and get their attributes
        after them, children first.
        """
        by_parent: dict[bytes, list[tuple[bytes, int]]] = {}
        for path, size in bulk_files(recipe):
            parent, _, name = _encode(path).rpartition(b"/")
            by_parent.setdefault(parent, []).append((name, size))
        directories = _with_ancestors(by_parent)
        for directory in directories:
            try:
                os.mkdir(directory, 0o755, dir_fd=self.root)
            except FileExistsError:
                pass

        contents = {size: file_content(recipe.seed, size) for size in set(recipe.sizes)}
        times = (BULK_MTIME_NS, BULK_MTIME_NS)

        for parent, items in by_parent.items():
            self._write_bulk_group(parent, items, contents)
        for directory in reversed(directories):
            os.chown(directory, 0, 0, dir_fd=self.root, follow_symlinks=False)
            os.chmod(directory, DIR_MODE, dir_fd=self.root)
            os.utime(directory, ns=times, dir_fd=self.root, follow_symlinks=False)

    def _write_bulk_group(
        self,
        parent_path: bytes,
        items: list[tuple[bytes, int]],
        contents: dict[int, bytes],
    ) -> None:
        parent = os.open(parent_path, _DIRECTORY, dir_fd=self.root)
        times = (BULK_MTIME_NS, BULK_MTIME_NS)
        exact = not FILE_MODE & self.umask
        owner: tuple[int, int] | None = None
        try:
            for name, size in items:
                descriptor = os.open(
                    name, _NEW_FILE, FILE_MODE if exact else 0o600, dir_fd=parent
                )
                try:
                    if owner is None:
                        created = os.fstat(descriptor)
                        owner = (created.st_uid, created.st_gid)
                    if size:
                        _write_all(descriptor, contents[size])
                    if owner != (0, 0):
                        os.fchown(descriptor, 0, 0)
                    if not exact:
                        os.fchmod(descriptor, FILE_MODE)
                    os.utime(descriptor, ns=times)
                finally:
                    os.close(descriptor)
        finally:
            os.close(parent)


def _with_ancestors(directories: Iterable[bytes]) -> list[bytes]:
    """Return the directories and all their ancestors, parents before children."""
    found: set[bytes] = set()
    for directory in directories:
        while directory and directory not in found:
            found.add(directory)
            directory = directory.rpartition(b"/")[0]
    return sorted(found, key=lambda path: (path.count(b"/"), path))


def _apply_at(parent: int, name: bytes, entry: ContextFile) -> None:
    """Set the owner, mode and mtime of an entry that has no open descriptor."""
    os.chown(name, entry.uid, entry.gid, dir_fd=parent, follow_symlinks=False)
    if entry.kind is not FileKind.SYMLINK:
        # chmod after chown: chown clears the setuid and setgid bits.
        os.chmod(name, stat.S_IMODE(entry.mode), dir_fd=parent)
    times = (entry.mtime_ns, entry.mtime_ns)
    os.utime(name, ns=times, dir_fd=parent, follow_symlinks=False)


def _make_socket(parent: int, name: bytes) -> None:
    """Leave a unix socket node at ``name``: bind a listener, then close it."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(_proc_path(parent, _SOCKET_TEMP))
    finally:
        listener.close()
    os.rename(_SOCKET_TEMP, name, src_dir_fd=parent, dst_dir_fd=parent)


def _write_all(descriptor: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(descriptor, view) :]
