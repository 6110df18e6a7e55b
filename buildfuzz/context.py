"""Materialize a case's build context into a directory."""

import hashlib
import os
import stat
from pathlib import Path

from buildfuzz.case import Case, ContextFile, FileKind

_CHUNK = 1 << 20


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


def materialize(case: Case, directory: Path) -> Path:
    """Write the case's context, Dockerfile and .dockerignore under ``directory``.

    Returns the context path. Attributes are applied deepest first, so a
    directory's mode and mtime are set after its children are written.
    """
    directory.mkdir(parents=True, exist_ok=False)
    root = os.fsencode(directory)

    for entry in case.files:
        _create(root, entry)
    for entry in sorted(case.files, key=lambda e: e.path.count("/"), reverse=True):
        _apply_attributes(root, entry)

    _write(directory / "Dockerfile", case.dockerfile_text)
    if case.dockerignore is not None:
        _write(directory / ".dockerignore", "\n".join(case.dockerignore) + "\n")

    return directory


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode("utf-8", "surrogateescape"))


def _create(root: bytes, entry: ContextFile) -> None:
    path = os.path.join(root, os.fsencode(entry.path))
    os.makedirs(os.path.dirname(path), exist_ok=True)

    if entry.kind is FileKind.FILE:
        _write_content(path, entry.seed, entry.size)
    elif entry.kind is FileKind.DIR:
        os.makedirs(path, exist_ok=True)
    elif entry.kind is FileKind.SYMLINK:
        os.symlink(os.fsencode(entry.target), path)
    elif entry.kind is FileKind.HARDLINK:
        os.link(os.path.join(root, os.fsencode(entry.target)), path)
    elif entry.kind is FileKind.FIFO:
        os.mkfifo(path)


def _write_content(path: bytes, seed: int, size: int) -> None:
    block = content_block(seed)
    chunk = block * (_CHUNK // len(block))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        remaining = size
        while remaining > 0:
            written = os.write(fd, chunk[: min(remaining, len(chunk))])
            remaining -= written
    finally:
        os.close(fd)


def _apply_attributes(root: bytes, entry: ContextFile) -> None:
    if entry.kind is FileKind.HARDLINK:
        return  # it shares the inode, and so every attribute, with its source

    path = os.path.join(root, os.fsencode(entry.path))
    os.lchown(path, entry.uid, entry.gid)
    if entry.kind is not FileKind.SYMLINK:
        # chmod after chown: chown clears the setuid and setgid bits.
        os.chmod(path, stat.S_IMODE(entry.mode))
    os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns), follow_symlinks=False)
