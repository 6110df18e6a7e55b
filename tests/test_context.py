"""Tests that materialize() writes the context a case describes.

The tests run as root, because only root can give files other owners.
"""

import os
import stat
import tarfile
import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings

from buildfuzz.bulk import BULK_MTIME_NS, bulk_dirs, bulk_files
from buildfuzz.case import BulkRecipe, Case, ContextFile, FileKind, Output
from buildfuzz.context import (
    archive_content,
    content_block,
    file_content,
    materialize,
)
from buildfuzz.profile import load_profile
from buildfuzz.strategies import Target, cases
from buildfuzz.strategies_context import long_path

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
    FileKind.SPARSE: stat.S_IFREG,
    FileKind.ARCHIVE: stat.S_IFREG,
    FileKind.CHAR_DEVICE: stat.S_IFCHR,
    FileKind.BLOCK_DEVICE: stat.S_IFBLK,
    FileKind.SOCKET: stat.S_IFSOCK,
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
            check_wide_entry(context, entry)
        dockerfile = context / case.dockerfile_name
        assert dockerfile.read_text(errors="surrogateescape") == case.dockerfile_text


# The widened entries: devices, sockets, sparse files, extended attributes,
# archives, raw byte names, paths beyond PATH_MAX and the bulk recipe.

GIB = 1 << 30
NIGHTLY = load_profile("nightly")
# Every nightly axis, with the bulk recipe and file sizes kept small: a test
# of materialize() needs each kind of entry, not gigabytes of content.
SMALL_NIGHTLY = replace(
    NIGHTLY,
    context=replace(
        NIGHTLY.context,
        sizes=(0, 1, 513),
        bulk_files=(0, 100),
        bulk_sizes=((0, 1, 700),),
    ),
)
NIGHTLY_CASES = cases(SMALL_NIGHTLY, TARGETS)


def lstat_at(context: Path, path: str) -> os.stat_result:
    """lstat a context path one directory at a time, so any length works."""
    *parents, name = os.fsencode(path).split(b"/")
    descriptor = os.open(context, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for part in parents:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY, dir_fd=descriptor)
            os.close(descriptor)
            descriptor = child
        return os.stat(name, dir_fd=descriptor, follow_symlinks=False)
    finally:
        os.close(descriptor)


WIDE_CASE = Case(
    files=(
        ContextFile("null", FileKind.CHAR_DEVICE, major=1, minor=3, mode=0o666),
        ContextFile("whiteout", FileKind.CHAR_DEVICE, major=0, minor=0),
        ContextFile("loop", FileKind.BLOCK_DEVICE, major=7, minor=0, uid=1000),
        ContextFile("sock", FileKind.SOCKET, mode=0o755, mtime_ns=0),
        ContextFile("holes", FileKind.SPARSE, size=8 * GIB, mode=0o600),
        ContextFile(
            "attrs",
            size=3,
            xattrs=(("user.a", "1"), ("user.empty", ""), ("user.raw", "\udcff")),
        ),
        ContextFile("dir", FileKind.DIR, mode=0o300, xattrs=(("user.d", "x"),)),
        ContextFile("dir/archive", FileKind.ARCHIVE, size=100, seed=4),
        ContextFile("non-\udcffutf8", size=1, uid=2097152),
        ContextFile("very-long-socket-name-" + "s" * 150, FileKind.SOCKET),
        ContextFile(long_path(4200), size=5, seed=1, mtime_ns=-1),
    ),
    bulk=BulkRecipe(count=300, sizes=(0, 1, 700), depth=3, seed=9),
    dockerfile=("FROM scratch", "COPY . /"),
    dockerfile_name="docker/build.Dockerfile",
    dockerfile_dockerignore=("*", "!a"),
)


@pytest.fixture(scope="module")
def wide_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize(WIDE_CASE, tmp_path_factory.mktemp("wide") / "context")


@pytest.mark.parametrize("entry", WIDE_CASE.files, ids=lambda e: ascii(e.path[:30]))
def test_wide_entry_has_type_and_attributes(
    wide_context: Path, entry: ContextFile
) -> None:
    info = lstat_at(wide_context, entry.path)

    assert stat.S_IFMT(info.st_mode) == FILE_TYPES[entry.kind]
    assert stat.S_IMODE(info.st_mode) == stat.S_IMODE(entry.mode)
    assert (info.st_uid, info.st_gid) == (entry.uid, entry.gid)
    assert info.st_mtime_ns == entry.mtime_ns


def test_device_numbers_are_kept(wide_context: Path) -> None:
    null = os.lstat(wide_context / "null")
    whiteout = os.lstat(wide_context / "whiteout")
    loop = os.lstat(wide_context / "loop")

    assert stat.S_ISCHR(null.st_mode)
    assert (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_ISCHR(whiteout.st_mode)
    assert whiteout.st_rdev == 0
    assert stat.S_ISBLK(loop.st_mode)
    assert (os.major(loop.st_rdev), os.minor(loop.st_rdev)) == (7, 0)


def test_sockets_are_nodes(wide_context: Path) -> None:
    names = [entry.path for entry in WIDE_CASE.files if entry.kind == "socket"]

    for name in names:
        assert stat.S_ISSOCK(os.lstat(wide_context / name).st_mode), name
    assert ".buildfuzz-socket" not in os.listdir(wide_context)


def test_sparse_file_takes_no_disk(wide_context: Path) -> None:
    info = os.lstat(wide_context / "holes")

    assert info.st_size == 8 * GIB
    assert info.st_blocks * 512 <= 64 * 1024


def test_extended_attributes_are_set(wide_context: Path) -> None:
    path = wide_context / "attrs"

    assert sorted(os.listxattr(path)) == ["user.a", "user.empty", "user.raw"]
    assert os.getxattr(path, "user.a") == b"1"
    assert os.getxattr(path, "user.empty") == b""
    assert os.getxattr(path, "user.raw") == b"\xff"
    assert os.getxattr(wide_context / "dir", "user.d") == b"x"


def test_raw_byte_name_is_kept(wide_context: Path) -> None:
    names = os.listdir(os.fsencode(wide_context))

    assert b"non-\xffutf8" in names


def test_path_beyond_path_max_exists(wide_context: Path) -> None:
    entry = WIDE_CASE.files[-1]

    assert len(os.fsencode(entry.path)) == 4200
    assert lstat_at(wide_context, entry.path).st_size == 5


def test_archive_extracts_to_members(wide_context: Path) -> None:
    with tarfile.open(wide_context / "dir" / "archive") as archive:
        names = archive.getnames()
        member = archive.extractfile("tarred/file")
        assert member is not None
        content = member.read()

    assert names == ["tarred", "tarred/file", "tarred/link"]
    assert content == file_content(4, 100)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_archive_compression_by_seed(seed: int) -> None:
    magic = {0: b"\x1f\x8b", 1: b"BZh", 2: b"\xfd7zXZ"}

    data = archive_content(seed, 10)

    assert data.startswith(magic[seed])
    assert data == archive_content(seed, 10)


def test_dockerfile_and_its_ignore_file(wide_context: Path) -> None:
    dockerfile = wide_context / "docker" / "build.Dockerfile"
    ignore = wide_context / "docker" / "build.Dockerfile.dockerignore"

    assert dockerfile.read_text() == "FROM scratch\nCOPY . /\n"
    assert ignore.read_text() == "*\n!a\n"
    assert not (wide_context / "Dockerfile").exists()
    assert not (wide_context / ".dockerignore").exists()


def test_bulk_recipe_expands_to_tree(wide_context: Path) -> None:
    recipe = WIDE_CASE.bulk
    assert recipe is not None
    expected = dict(bulk_files(recipe))
    found = {}
    for directory, _, names in os.walk(wide_context / "bulk"):
        for name in names:
            path = Path(directory) / name
            found[str(path.relative_to(wide_context))] = path

    assert sorted(found) == sorted(expected)
    for relative, path in found.items():
        info = os.lstat(path)
        assert info.st_size == expected[relative]
        assert stat.S_IMODE(info.st_mode) == 0o644
        assert info.st_mtime_ns == BULK_MTIME_NS
        assert path.read_bytes() == file_content(recipe.seed, info.st_size)
    for directory in bulk_dirs(recipe):
        info = os.lstat(wide_context / directory)
        assert stat.S_IMODE(info.st_mode) == 0o755
        assert info.st_mtime_ns == BULK_MTIME_NS


def test_bulk_names_depend_on_seed() -> None:
    first = [path for path, _ in bulk_files(BulkRecipe(5, (0,), 2, 1))]
    second = [path for path, _ in bulk_files(BulkRecipe(5, (0,), 2, 2))]

    assert len(set(first)) == 5
    assert all(path.count("/") == 3 for path in first)
    assert set(first).isdisjoint(second)


def check_wide_entry(context: Path, entry: ContextFile) -> None:
    info = lstat_at(context, entry.path)

    assert stat.S_IFMT(info.st_mode) == FILE_TYPES[entry.kind], entry
    assert (info.st_uid, info.st_gid) == (entry.uid, entry.gid), entry
    assert info.st_mtime_ns == entry.mtime_ns, entry
    if entry.kind is not FileKind.SYMLINK:
        assert stat.S_IMODE(info.st_mode) == stat.S_IMODE(entry.mode), entry
    if entry.kind in (FileKind.FILE, FileKind.HARDLINK, FileKind.SPARSE):
        assert info.st_size == entry.size, entry
    if entry.kind in (FileKind.CHAR_DEVICE, FileKind.BLOCK_DEVICE):
        assert os.major(info.st_rdev) == entry.major, entry
        assert os.minor(info.st_rdev) == entry.minor, entry


@settings(max_examples=25, deadline=None)
@given(NIGHTLY_CASES)
def test_generated_nightly_context_matches_case(case: Case) -> None:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as directory:
        context = materialize(case, Path(directory) / "context")

        for entry in case.files:
            check_wide_entry(context, entry)
        dockerfile = context / case.dockerfile_name
        assert dockerfile.read_text(errors="surrogateescape") == case.dockerfile_text
        if case.bulk is not None:
            assert len(list((context / "bulk").rglob("*"))) >= case.bulk.count


# Entries in several directories, listed out of order: each directory's
# entries are written together, and directories get their attributes last.

MIXED_CASE = Case(
    files=(
        ContextFile("a/one", size=3, mode=0o4750, uid=1000, gid=1000, seed=1),
        ContextFile("b/two", size=0, mode=0o600, mtime_ns=5),
        ContextFile("a", FileKind.DIR, mode=0o000, mtime_ns=7, uid=65534),
        ContextFile("a/three", size=64, seed=1, mtime_ns=-3),
        ContextFile("b", FileKind.DIR, mode=0o300, mtime_ns=11),
        ContextFile("b/sym", FileKind.SYMLINK, target="two", uid=5, mtime_ns=13),
        ContextFile("b/fifo", FileKind.FIFO, mode=0o640, gid=7, mtime_ns=17),
        ContextFile(
            "links/deep/one",
            FileKind.HARDLINK,
            size=3,
            mode=0o4750,
            uid=1000,
            gid=1000,
            seed=1,
            target="a/one",
        ),
        ContextFile("c/d/e", FileKind.DIR, mode=0o1777, mtime_ns=19),
        ContextFile("c/d/e/f", size=65, seed=2, xattrs=(("user.k", "v"),)),
    ),
)


@pytest.fixture(scope="module")
def mixed_context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return materialize(MIXED_CASE, tmp_path_factory.mktemp("mixed") / "context")


@pytest.mark.parametrize("entry", MIXED_CASE.files, ids=lambda e: ascii(e.path))
def test_mixed_entry_matches_case(mixed_context: Path, entry: ContextFile) -> None:
    check_entry(mixed_context, entry)


def test_closed_directories_keep_contents(mixed_context: Path) -> None:
    names_a = sorted(os.listdir(mixed_context / "a"))
    names_b = sorted(os.listdir(mixed_context / "b"))

    assert names_a == ["one", "three"]
    assert names_b == ["fifo", "sym", "two"]
    assert os.getxattr(mixed_context / "c" / "d" / "e" / "f", "user.k") == b"v"


def test_hardlink_in_implicit_directory(mixed_context: Path) -> None:
    link = os.lstat(mixed_context / "links" / "deep" / "one")
    source = os.lstat(mixed_context / "a" / "one")

    assert link.st_ino == source.st_ino
    assert stat.S_IMODE(os.lstat(mixed_context / "links").st_mode) == 0o755


@pytest.mark.parametrize("size", [1, 63, 64, 65, 1 << 20, (1 << 20) + 1, 3 << 20])
def test_content_of_every_size(tmp_path: Path, size: int) -> None:
    case = Case(
        files=(
            ContextFile("first", size=size, seed=5),
            ContextFile("same-seed", size=size // 2, seed=5),
        )
    )

    context = materialize(case, tmp_path / "context")

    assert (context / "first").read_bytes() == file_content(5, size)
    assert (context / "same-seed").read_bytes() == file_content(5, size // 2)


def test_bulk_entries_belong_to_root(wide_context: Path) -> None:
    owners = {
        (info.st_uid, info.st_gid)
        for path in (wide_context / "bulk").rglob("*")
        for info in [os.lstat(path)]
    }

    assert owners == {(0, 0)}


# Files are created with their final mode where the umask allows, and are
# chowned only when the kernel gave them another owner.

OWNER_CASE = Case(
    files=(
        ContextFile("root-owned", size=5, mode=0o644),
        ContextFile("other-owned", size=5, mode=0o640, uid=1000, gid=1000),
        ContextFile("open", size=5, mode=0o777),
        ContextFile("sub/setgid", size=5, mode=0o2775, gid=1000),
        ContextFile("sub/root-owned", size=5, mode=0o666),
    ),
    bulk=BulkRecipe(count=20, sizes=(0, 7), depth=1, seed=4),
)


def test_modes_survive_strict_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        context = materialize(OWNER_CASE, tmp_path / "context")
    finally:
        os.umask(previous)

    for entry in OWNER_CASE.files:
        check_entry(context, entry)
    modes = {
        stat.S_IMODE(os.lstat(path).st_mode)
        for path in (context / "bulk").rglob("*")
        if path.is_file()
    }
    assert modes == {0o644}


def test_owners_under_setgid_parent(tmp_path: Path) -> None:
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chown(parent, 0, 4321)
    os.chmod(parent, 0o2775)

    context = materialize(OWNER_CASE, parent / "context")

    for entry in OWNER_CASE.files:
        check_entry(context, entry)
    owners = {
        (info.st_uid, info.st_gid)
        for path in (context / "bulk").rglob("*")
        if path.is_file()
        for info in [os.lstat(path)]
    }
    assert owners == {(0, 0)}
