"""Tests that materialize() writes the context a case describes.

The tests run as root, because only root can give files other owners.
"""

import os
import stat
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings

from buildfuzz.case import Case, ContextFile, FileKind, Output
from buildfuzz.context import content_block, file_content, materialize
from buildfuzz.profile import load_profile
from buildfuzz.strategies import Target, cases

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for chown")

TARGETS = [
    Target("26.1", "buildx-docker", (Output.LOAD, Output.TAR, Output.LOCAL)),
    Target("26.1", "classic", (Output.LOAD,)),
]
DEFAULT_CASES = cases(load_profile("default"), TARGETS)
FILE_TYPES = {
    FileKind.FILE: stat.S_IFREG,
    FileKind.HARDLINK: stat.S_IFREG,
    FileKind.DIR: stat.S_IFDIR,
    FileKind.SYMLINK: stat.S_IFLNK,
    FileKind.FIFO: stat.S_IFIFO,
}

CASE = Case(
    files=(
        ContextFile("dir", FileKind.DIR, mode=0o1777, uid=1000, gid=1000),
        ContextFile(
            "dir/setuid",
            size=513,
            mode=0o4755,
            uid=2097152,
            gid=65534,
            mtime_ns=1_700_000_000_123_456_789,
            seed=3,
        ),
        ContextFile("setgid", size=1, mode=0o2755, mtime_ns=-1_000_000_000_000_000_000),
        ContextFile("dir/sub/deep", size=65536, mode=0o000, seed=200, mtime_ns=0),
        ContextFile(
            "link",
            FileKind.HARDLINK,
            size=513,
            mode=0o4755,
            uid=2097152,
            gid=65534,
            mtime_ns=1_700_000_000_123_456_789,
            seed=3,
            target="dir/setuid",
        ),
        ContextFile(
            "sym",
            FileKind.SYMLINK,
            uid=4294967294,
            gid=1000,
            mtime_ns=4_102_444_800_000_000_001,
            target="../outside",
        ),
        ContextFile("fifo", FileKind.FIFO, mode=0o600, uid=1000),
        ContextFile("bad\udcff", size=0, mode=0o600),
    ),
    dockerignore=("*.txt", "!b.txt"),
    dockerfile=("FROM scratch", "COPY . /ctx/"),
)


def entry_path(context: Path, entry: ContextFile) -> bytes:
    return os.path.join(os.fsencode(context), os.fsencode(entry.path))


def check_entry(context: Path, entry: ContextFile) -> None:
    path = entry_path(context, entry)
    info = os.lstat(path)

    assert stat.S_IFMT(info.st_mode) == FILE_TYPES[entry.kind], entry
    assert info.st_uid == entry.uid, entry
    assert info.st_gid == entry.gid, entry
    assert info.st_mtime_ns == entry.mtime_ns, entry
    if entry.kind is not FileKind.SYMLINK:
        assert stat.S_IMODE(info.st_mode) == stat.S_IMODE(entry.mode), entry
    if entry.kind in (FileKind.FILE, FileKind.HARDLINK):
        assert info.st_size == entry.size, entry
        with open(path, "rb") as stream:
            assert stream.read() == file_content(entry.seed, entry.size), entry
    if entry.kind is FileKind.SYMLINK:
        assert os.readlink(path) == os.fsencode(entry.target), entry
    if entry.kind is FileKind.HARDLINK:
        source = os.lstat(entry_path(context, ContextFile(entry.target)))
        assert info.st_ino == source.st_ino, entry


@pytest.fixture
def context(tmp_path: Path) -> Path:
    return materialize(CASE, tmp_path / "context")


def test_materialize_returns_directory(tmp_path: Path) -> None:
    directory = tmp_path / "context"

    assert materialize(CASE, directory) == directory


@pytest.mark.parametrize("entry", CASE.files, ids=lambda e: ascii(e.path))
def test_entry_matches_case(context: Path, entry: ContextFile) -> None:
    check_entry(context, entry)


def test_special_mode_bits_survive(context: Path) -> None:
    setuid = os.lstat(context / "dir" / "setuid")
    setgid = os.lstat(context / "setgid")
    sticky = os.lstat(context / "dir")

    assert setuid.st_mode & stat.S_ISUID
    assert setgid.st_mode & stat.S_ISGID
    assert sticky.st_mode & stat.S_ISVTX


def test_hardlink_shares_inode(context: Path) -> None:
    link = os.lstat(context / "link")
    source = os.lstat(context / "dir" / "setuid")

    assert link.st_ino == source.st_ino
    assert link.st_nlink == 2


def test_non_utf8_name_is_raw_bytes(context: Path) -> None:
    assert b"bad\xff" in os.listdir(os.fsencode(context))


def test_implicit_parent_is_directory(context: Path) -> None:
    info = os.lstat(context / "dir" / "sub")

    assert stat.S_ISDIR(info.st_mode)


def test_dockerfile_is_written(context: Path) -> None:
    assert (context / "Dockerfile").read_text() == "FROM scratch\nCOPY . /ctx/\n"


def test_dockerignore_is_written(context: Path) -> None:
    assert (context / ".dockerignore").read_text() == "*.txt\n!b.txt\n"


def test_no_dockerignore_without_patterns(tmp_path: Path) -> None:
    context = materialize(Case(), tmp_path / "context")

    assert sorted(os.listdir(context)) == ["Dockerfile"]


def test_non_utf8_dockerfile_keeps_bytes(tmp_path: Path) -> None:
    case = Case(dockerfile=("FROM scratch", 'COPY ["bad\udcff", "/picked/"]'))

    context = materialize(case, tmp_path / "context")

    assert (context / "Dockerfile").read_bytes().endswith(b'["bad\xff", "/picked/"]\n')


def test_existing_directory_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(FileExistsError):
        materialize(CASE, tmp_path)


def test_content_repeats_block() -> None:
    block = content_block(9)

    assert len(block) == 64
    assert file_content(9, 0) == b""
    assert file_content(9, 100) == (block * 2)[:100]
    assert file_content(9, 64) == block
    assert content_block(9) != content_block(10)


def test_large_file_content_matches(tmp_path: Path) -> None:
    size = (1 << 20) + 65
    case = Case(files=(ContextFile("big", size=size, seed=77),))

    context = materialize(case, tmp_path / "context")

    assert (context / "big").read_bytes() == file_content(77, size)


@settings(max_examples=30, deadline=None)
@given(DEFAULT_CASES)
def test_generated_context_matches_case(case: Case) -> None:
    with tempfile.TemporaryDirectory() as directory:
        context = materialize(case, Path(directory) / "context")

        for entry in case.files:
            check_entry(context, entry)
        assert (context / "Dockerfile").read_text() == case.dockerfile_text
