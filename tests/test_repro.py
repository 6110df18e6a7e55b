"""Tests of repro.sh: the signature pattern, shell quoting and the script."""

import hashlib
import os
import re
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildfuzz.bulk import bulk_dirs, bulk_files
from buildfuzz.case import BulkRecipe, Case, ContextFile, FileKind, Output
from buildfuzz.context import file_content, materialize
from buildfuzz.install import busybox_binary
from buildfuzz.repro import (
    ansi_quote,
    build_command,
    render_repro,
    signature_pattern,
)
from buildfuzz.signature import Phase, Signature, normalise
from buildfuzz.strategies import BUSYBOX_IMAGE
from buildfuzz.strategies_context import long_path

RAW_MESSAGES = [
    "failed to compute cache key: failed to calculate checksum of ref "
    "82426739-289e-41f5-a11e-4b4da7040597::vmsn5t7d8nuaa8b69w3laip63: "
    '"/nosuch.txt": not found',
    "invalid user index: -1",
    "COPY failed: file not found in build context or excluded by .dockerignore: "
    "stat nosuch.txt: file does not exist",
    "failed to read dockerfile: link /does/not/exist /h: no such file or directory",
    'process "/bin/sh -c exit 3" did not complete successfully: exit code: 3',
    "pull access denied for localhost/buildfuzz/nosuch, repository does not exist",
    "error from sender: context canceled after 1.5s at 2024-01-02T03:04:05Z",
    "unexpected   (x) [y] {z} a+b? c|d ^e$ #f ~g &h 'quoted' -2",
]
MESSAGE = 'failed to calculate checksum of ref <ref>: "<q>": not found'
RAW_MESSAGE = 'failed to calculate checksum of ref x: "y": not found'
BUSYBOX_MISSING = not Path(busybox_binary()).is_file()


def python_regex(pattern: str) -> str:
    # The pattern is written for grep -E, and [[:space:]] is the only construct
    # in it that Python's re reads differently.
    return pattern.replace("[[:space:]]", r"\s")


def pattern_of(raw: str) -> str:
    return signature_pattern(Signature(Phase.SOLVE, normalise(raw)))


def grep_matches(pattern: str, text: str) -> bool:
    result = subprocess.run(
        ["grep", "-Eq", "--", pattern],
        input=text.encode(),
        capture_output=True,
        check=False,
    )
    assert result.stderr == b""
    return result.returncode == 0


@pytest.mark.parametrize("raw", RAW_MESSAGES)
def test_pattern_matches_raw_message(raw: str) -> None:
    pattern = pattern_of(raw)

    assert re.search(python_regex(pattern), raw)


@pytest.mark.parametrize("raw", RAW_MESSAGES[:2])
def test_grep_matches_raw_message(raw: str) -> None:
    assert grep_matches(pattern_of(raw), f"#4 ERROR: {raw}\n")


@pytest.mark.parametrize("raw", RAW_MESSAGES)
def test_grep_accepts_pattern(raw: str) -> None:
    assert grep_matches(pattern_of(raw), raw)


def test_pattern_rejects_other_message() -> None:
    pattern = pattern_of(RAW_MESSAGES[0])

    other = RAW_MESSAGES[0].replace("not found", "permission denied")

    assert not re.search(python_regex(pattern), other)
    assert not grep_matches(pattern, other)


@pytest.mark.parametrize("padding", range(285, 300))
def test_pattern_matches_truncated_message(padding: int) -> None:
    # normalise() cuts long messages, sometimes inside a placeholder.
    raw = "x" * padding + ' /some/path "quoted" tail'

    pattern = pattern_of(raw)

    matched = re.search(python_regex(pattern), raw) is not None
    assert matched, f"pattern ends with {pattern[-30:]!r}"


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=64).filter(lambda data: b"\x00" not in data))
def test_ansi_quote_round_trips_bytes(data: bytes) -> None:
    quoted = ansi_quote(os.fsdecode(data))

    result = subprocess.run(
        ["bash", "-c", f"printf %s {quoted}"], capture_output=True, check=True
    )

    assert result.stdout == data


def test_ansi_quote_escapes_specials() -> None:
    quoted = ansi_quote("a'b\\c\n$(x)")

    assert quoted == "$'a\\047b\\134c\\012$(x)'"


def scratch_case() -> Case:
    return Case(
        files=(
            ContextFile("dir", FileKind.DIR, mode=0o1777, uid=1000),
            ContextFile("dir/f", size=513, mode=0o4755, uid=65534, seed=5),
            ContextFile("dir/h", FileKind.HARDLINK, size=513, mode=0o4755, uid=65534,
                        seed=5, target="dir/f"),
            ContextFile("sub dir/it's $x", size=0, mtime_ns=0),
            ContextFile("bad\udcff", size=70000, seed=9,
                        mtime_ns=1_700_000_000_123_456_789),
            ContextFile("old", size=1, mtime_ns=-1_000_000_000_000_000_000),
            ContextFile("s", FileKind.SYMLINK, target="../out side", gid=1000),
            ContextFile("fifo", FileKind.FIFO, mode=0o600),
        ),
        dockerignore=("*.txt", "!b.txt"),
        dockerfile=("FROM scratch", 'COPY ["sub dir", "/picked/"]', "COPY . /ctx/"),
        build_args=(("A", "va lue"),),
    )  # fmt: skip


def check_syntax(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "repro.sh"
    path.write_text(script, errors="surrogateescape")
    return subprocess.run(
        ["bash", "-n", str(path)], capture_output=True, text=True, check=False
    )


@pytest.mark.parametrize("builder", ["buildx-docker", "classic"])
@pytest.mark.parametrize("phase", [Phase.SOLVE, Phase.HANG])
def test_scratch_script_parses(tmp_path: Path, builder: str, phase: Phase) -> None:
    case = scratch_case().with_changes(builder=builder)

    result = check_syntax(
        render_repro(case, Signature(phase, MESSAGE), timeout=60), tmp_path
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


@pytest.mark.parametrize("output", list(Output))
def test_every_output_parses(tmp_path: Path, output: Output) -> None:
    case = scratch_case().with_changes(output=output)

    script = render_repro(case, Signature(Phase.EXPORT, MESSAGE), timeout=60)

    assert check_syntax(script, tmp_path).returncode == 0


def test_classic_script_disables_buildkit() -> None:
    case = scratch_case().with_changes(builder="classic")

    script = render_repro(case, Signature(Phase.SOLVE, MESSAGE), timeout=60)

    assert "DOCKER_BUILDKIT=0 timeout 60 docker build --tag" in script
    assert "docker buildx" not in script


def test_hang_script_checks_timeout() -> None:
    script = render_repro(scratch_case(), Signature(Phase.HANG, MESSAGE), timeout=9)

    assert 'if [ "$status" -eq 124 ]; then' in script
    assert "timeout 9 docker buildx build" in script


@pytest.mark.skipif(
    BUSYBOX_MISSING,
    reason=f"needs the cached busybox tree ({busybox_binary()}); "
    "run `buildfuzz setup` to fetch it",
)
def test_busybox_script_parses(tmp_path: Path) -> None:
    case = Case(dockerfile=(f"FROM {BUSYBOX_IMAGE}", "RUN ls -lan / > /listing.txt"))

    script = render_repro(case, Signature(Phase.SOLVE, MESSAGE), timeout=60)

    assert "__BUSYBOX_ROOTFS_BASE64__" in script
    assert check_syntax(script, tmp_path).returncode == 0


# The scripts run end to end against a stand-in for docker that copies the
# context it is given, saves the busybox tar it imports and prints a message.
DOCKER_STAND_IN = """#!/bin/bash
case "$1" in
  image) exit 0 ;;
  import) cp "$6" "$SAVE_TO/busybox.tar"; exit 0 ;;
esac
cp -a "${@: -1}" "$SAVE_TO/context"
printf '#4 ERROR: %s\\n' "$MESSAGE"
exit 1
"""


def run_script(script: str, tmp_path: Path, message: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(DOCKER_STAND_IN)
    (bin_dir / "docker").chmod(0o755)
    save_to = tmp_path / "saved"
    save_to.mkdir()
    (tmp_path / "repro.sh").write_text(script, errors="surrogateescape")
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "SAVE_TO": str(save_to),
        "MESSAGE": message,
    }
    result = subprocess.run(
        ["bash", str(tmp_path / "repro.sh")],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "buildfuzz repro: REPRODUCED" in result.stdout
    return save_to


def snapshot(context: Path, case: Case) -> dict[str, tuple[object, ...]]:
    """Return each case entry's type, attributes, content and link target."""
    entries = {}
    for entry in case.files:
        path = os.path.join(os.fsencode(context), os.fsencode(entry.path))
        info = os.lstat(path)
        content = b""
        if stat.S_ISREG(info.st_mode):
            with open(path, "rb") as stream:
                content = stream.read()
        target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else b""
        mode = info.st_mode if not stat.S_ISLNK(info.st_mode) else stat.S_IFLNK
        links = info.st_nlink if stat.S_ISREG(info.st_mode) else 0
        entries[entry.path] = (
            mode,
            info.st_uid,
            info.st_gid,
            info.st_mtime_ns,
            info.st_size,
            content,
            target,
            links,
        )
    return entries


def test_script_recreates_context(tmp_path: Path) -> None:
    case = scratch_case()
    raw = RAW_MESSAGES[0]
    script = render_repro(case, Signature(Phase.SOLVE, normalise(raw)), timeout=60)
    expected = materialize(case, tmp_path / "expected")

    saved = run_script(script, tmp_path, raw)

    assert snapshot(saved / "context", case) == snapshot(expected, case)
    assert (saved / "context" / "Dockerfile").read_bytes() == (
        expected / "Dockerfile"
    ).read_bytes()
    assert (saved / "context" / ".dockerignore").read_text() == "*.txt\n!b.txt\n"


@pytest.mark.parametrize("mtime_ns", [-1, -1_500_000_000, 1])
def test_script_keeps_fractional_mtime(tmp_path: Path, mtime_ns: int) -> None:
    case = Case(files=(ContextFile("f", mtime_ns=mtime_ns),))
    script = render_repro(case, Signature(Phase.SOLVE, MESSAGE), timeout=60)

    saved = run_script(script, tmp_path, RAW_MESSAGE)

    assert os.lstat(saved / "context" / "f").st_mtime_ns == mtime_ns


def test_script_handles_newline_names(tmp_path: Path) -> None:
    case = Case(files=(ContextFile("d\n/f", size=3),))
    script = render_repro(case, Signature(Phase.SOLVE, MESSAGE), timeout=60)

    saved = run_script(script, tmp_path, RAW_MESSAGE)

    assert (saved / "context" / "d\n" / "f").read_bytes() == file_content(0, 3)


@pytest.mark.skipif(
    BUSYBOX_MISSING,
    reason=f"needs the cached busybox tree ({busybox_binary()}); "
    "run `buildfuzz setup` to fetch it",
)
def test_script_imports_busybox(tmp_path: Path) -> None:
    case = Case(dockerfile=(f"FROM {BUSYBOX_IMAGE}", "RUN ls -lan / > /listing.txt"))
    script = render_repro(case, Signature(Phase.SOLVE, MESSAGE), timeout=60)

    saved = run_script(script, tmp_path, RAW_MESSAGE)

    with tarfile.open(saved / "busybox.tar") as archive:
        busybox = archive.extractfile("bin/busybox")
        assert busybox is not None
        assert busybox.read() == Path(busybox_binary()).read_bytes()
        assert archive.getmember("bin/sh").linkname == "busybox"


# The widened context: the script must build the same tree as materialize().

# A stand-in for docker that moves the context out of the script's work
# directory instead of copying it: cp -a fails on paths beyond PATH_MAX.
DOCKER_MOVE = """#!/bin/bash
case "$1" in
  image) exit 0 ;;
esac
printf '%s\\n' "$@" > "$SAVE_TO/arguments"
mv "${@: -1}" "$SAVE_TO/context"
printf '#4 ERROR: %s\\n' "$MESSAGE"
exit 1
"""
SETFATTR_MISSING = shutil.which("setfattr") is None


def run_moving_script(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(DOCKER_MOVE)
    (bin_dir / "docker").chmod(0o755)
    save_to = tmp_path / "saved"
    save_to.mkdir()
    (tmp_path / "repro.sh").write_text(script, errors="surrogateescape")
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "SAVE_TO": str(save_to),
        "MESSAGE": RAW_MESSAGE,
    }
    return subprocess.run(
        ["bash", str(tmp_path / "repro.sh")],
        env=environment,
        capture_output=True,
        text=True,
        errors="surrogateescape",
        check=False,
        timeout=120,
    )


def tree(context: Path, timed: set[bytes]) -> dict[bytes, tuple[object, ...]]:
    """Return every entry under ``context`` with its type, attributes and data.

    mtimes count only for ``timed`` paths: directories that exist only as
    parents get the time they were made.
    """
    entries = {}
    root = os.fsencode(context)
    for directory, names, files, descriptor in os.fwalk(root):
        relative_dir = os.path.relpath(directory, root)
        for name in names + files:
            relative = os.path.normpath(os.path.join(relative_dir, name))
            info = os.stat(name, dir_fd=descriptor, follow_symlinks=False)
            data: object = b""
            if stat.S_ISREG(info.st_mode) and info.st_size <= 1 << 24:
                fd = os.open(name, os.O_RDONLY, dir_fd=descriptor)
                with os.fdopen(fd, "rb") as stream:
                    data = hashlib.sha256(stream.read()).hexdigest()
            elif stat.S_ISREG(info.st_mode):
                data = ("holes", info.st_blocks <= 128)
            elif stat.S_ISLNK(info.st_mode):
                data = os.readlink(name, dir_fd=descriptor)
            xattrs: list[tuple[str, bytes]] = []
            if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
                path = f"/proc/self/fd/{descriptor}/".encode() + name
                xattrs = sorted(
                    (attribute, os.getxattr(path, attribute))
                    for attribute in os.listxattr(path)
                )
            entries[relative] = (
                info.st_mode,
                info.st_uid,
                info.st_gid,
                info.st_size if not stat.S_ISDIR(info.st_mode) else 0,
                info.st_rdev,
                info.st_nlink if stat.S_ISREG(info.st_mode) else 0,
                info.st_mtime_ns if relative in timed else None,
                data,
                xattrs,
            )
    return entries


def timed_paths(case: Case) -> set[bytes]:
    paths = {os.fsencode(entry.path) for entry in case.files}
    if case.bulk is not None:
        paths |= {os.fsencode(path) for path, _ in bulk_files(case.bulk)}
        paths |= {os.fsencode(path) for path in bulk_dirs(case.bulk)}
    return paths


WIDE_CASE = Case(
    files=(
        ContextFile("dir", FileKind.DIR, mode=0o300, xattrs=(("user.d", "x"),)),
        ContextFile("dir/null", FileKind.CHAR_DEVICE, major=1, minor=3, uid=1000),
        ContextFile("whiteout", FileKind.CHAR_DEVICE, major=0, minor=0),
        ContextFile("loop", FileKind.BLOCK_DEVICE, major=7, minor=0, mode=0o640),
        ContextFile("holes", FileKind.SPARSE, size=8 << 30, mtime_ns=-1),
        ContextFile(
            "attrs",
            size=70,
            seed=3,
            xattrs=(("user.a", "1"), ("user.empty", ""), ("user.q", "it's $x\n")),
        ),
        ContextFile("archive", FileKind.ARCHIVE, size=1000, seed=1),
        ContextFile("non-\udcffutf8", size=2, gid=4294967294),
        ContextFile(long_path(120), size=3),
    ),
    bulk=BulkRecipe(count=300, sizes=(0, 1, 700, 70000), depth=3, seed=12),
    dockerignore=("*.txt",),
    dockerfile=("FROM scratch", "COPY . /"),
    dockerfile_name="docker/build.Dockerfile",
    dockerfile_dockerignore=("!a",),
)


@pytest.mark.skipif(SETFATTR_MISSING, reason="needs setfattr (Debian package attr)")
def test_script_recreates_wide_context(tmp_path: Path) -> None:
    script = render_repro(WIDE_CASE, Signature(Phase.SOLVE, MESSAGE), timeout=60)
    expected = materialize(WIDE_CASE, tmp_path / "expected")

    completed = run_moving_script(script, tmp_path)

    assert "buildfuzz repro: REPRODUCED" in completed.stdout, completed.stderr
    saved = tmp_path / "saved" / "context"
    timed = timed_paths(WIDE_CASE)
    assert tree(saved, timed) == tree(expected, timed)


def test_script_recreates_path_beyond_path_max(tmp_path: Path) -> None:
    case = Case(files=(ContextFile(long_path(4200), size=70, seed=2, mode=0o600),))
    script = render_repro(case, Signature(Phase.SOLVE, MESSAGE), timeout=60)
    expected = materialize(case, tmp_path / "expected")

    completed = run_moving_script(script, tmp_path)

    assert "REPRODUCED" in completed.stdout, completed.stderr
    timed = timed_paths(case)
    assert tree(tmp_path / "saved" / "context", timed) == tree(expected, timed)


@pytest.mark.parametrize("seed", [0, 5, 255])
def test_script_bulk_loop_matches_python(tmp_path: Path, seed: int) -> None:
    case = Case(bulk=BulkRecipe(count=200, sizes=(0, 65, 300), depth=2, seed=seed))
    script = render_repro(case, Signature(Phase.SOLVE, MESSAGE), timeout=60)
    expected = materialize(case, tmp_path / "expected")

    completed = run_moving_script(script, tmp_path)

    assert "REPRODUCED" in completed.stdout, completed.stderr
    timed = timed_paths(case)
    assert tree(tmp_path / "saved" / "context", timed) == tree(expected, timed)


def test_bulk_recipe_is_a_loop_not_a_listing() -> None:
    case = Case(bulk=BulkRecipe(count=10000, sizes=(0, 512), depth=4, seed=3))

    script = render_repro(case, Signature(Phase.SOLVE, MESSAGE), timeout=60)

    assert "for ((i = 0; i < 10000; i++)); do" in script
    assert len(script) < 10000


def test_socket_is_skipped_with_a_note(tmp_path: Path) -> None:
    case = Case(files=(ContextFile("sock", FileKind.SOCKET), ContextFile("a")))
    script = render_repro(case, Signature(Phase.SOLVE, MESSAGE), timeout=60)

    completed = run_moving_script(script, tmp_path)

    assert "not creating socket 'sock'" in completed.stderr
    assert sorted(os.listdir(tmp_path / "saved" / "context")) == ["Dockerfile", "a"]


def test_script_checks_for_setfattr() -> None:
    with_attrs = Case(files=(ContextFile("a", xattrs=(("user.a", "1"),)),))

    script = render_repro(with_attrs, Signature(Phase.SOLVE, MESSAGE), timeout=60)
    plain = render_repro(scratch_case(), Signature(Phase.SOLVE, MESSAGE), timeout=60)

    assert "command -v setfattr" in script
    assert "command -v setfattr" not in plain


@pytest.mark.parametrize("builder", ["buildx-docker", "classic"])
def test_script_passes_build_options(tmp_path: Path, builder: str) -> None:
    case = Case(
        dockerfile=("FROM scratch AS stage0", "COPY . /"),
        dockerfile_name="docker/build.Dockerfile",
        target="stage0",
        no_cache=True,
        tags=("buildfuzz-case:second", "localhost/x/y:1"),
        builder=builder,
    )
    script = render_repro(case, Signature(Phase.SOLVE, MESSAGE), timeout=60)

    completed = run_moving_script(script, tmp_path)

    arguments = (tmp_path / "saved" / "arguments").read_text().splitlines()
    context = arguments[-1]
    assert "REPRODUCED" in completed.stdout, completed.stderr
    assert arguments[arguments.index("--file") + 1] == (
        f"{context}/docker/build.Dockerfile"
    )
    assert arguments[arguments.index("--target") + 1] == "stage0"
    assert "--no-cache" in arguments
    tags = [arguments[i + 1] for i, word in enumerate(arguments) if word == "--tag"]
    assert tags[1:] == ["buildfuzz-case:second", "localhost/x/y:1"]
    assert 'docker image rm -f "$image" buildfuzz-case:second localhost/x/y:1' in (
        script
    )


def test_default_options_add_no_flags() -> None:
    words = build_command(Case(), classic=False)

    for flag in ("--file", "--target", "--no-cache"):
        assert flag not in words
    assert words.count("--tag") == 1
