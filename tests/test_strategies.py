"""Tests that generated cases are valid builds of the profile's axes."""

import os
import random

import pytest
from hypothesis import Phase, find, given, settings

from buildfuzz.case import Case, ContextFile, FileKind, Output, check_context_path
from buildfuzz.profile import load_profile
from buildfuzz.strategies import (
    BUSYBOX_IMAGE,
    NATIVE_PLATFORMS,
    RESERVED_NAMES,
    Target,
    cases,
    render_instruction,
)

PROFILE = load_profile("default")
BUILDX = Target("26.1", "buildx-docker", (Output.LOAD, Output.TAR, Output.LOCAL))
CLASSIC = Target("26.1", "classic", (Output.LOAD,))
TARGETS = {target.builder: target for target in (BUILDX, CLASSIC)}
DEFAULT_CASES = cases(PROFILE, [BUILDX, CLASSIC])
EXAMPLES = settings(max_examples=80, deadline=None)


def uses_busybox(case: Case) -> bool:
    return any(BUSYBOX_IMAGE in line for line in case.dockerfile)


@EXAMPLES
@given(DEFAULT_CASES)
def test_paths_are_unique_and_inside(case: Case) -> None:
    paths = [entry.path for entry in case.files]

    assert len(paths) == len(set(paths))
    for path in paths:
        check_context_path(path)
        assert path.split("/")[0] not in RESERVED_NAMES


@EXAMPLES
@given(DEFAULT_CASES)
def test_no_path_runs_through_non_directory(case: Case) -> None:
    kinds = {entry.path: entry.kind for entry in case.files}

    for path in kinds:
        parts = path.split("/")
        for index in range(1, len(parts)):
            prefix = "/".join(parts[:index])
            assert kinds.get(prefix, FileKind.DIR) is FileKind.DIR, path


@EXAMPLES
@given(DEFAULT_CASES)
def test_hardlinks_copy_earlier_file(case: Case) -> None:
    for position, entry in enumerate(case.files):
        if entry.kind is not FileKind.HARDLINK:
            continue
        earlier = {f.path: f for f in case.files[:position]}
        source = earlier.get(entry.target)

        assert source is not None, entry
        assert source.kind is FileKind.FILE
        for name in ("size", "seed", "mode", "uid", "gid", "mtime_ns"):
            assert getattr(entry, name) == getattr(source, name), name


@EXAMPLES
@given(DEFAULT_CASES)
def test_entries_draw_from_profile_pools(case: Case) -> None:
    axes = PROFILE.context

    for entry in case.files:
        assert set(entry.path.split("/")) <= set(axes.names)
        assert entry.kind in axes.kinds
        assert entry.uid in axes.owners
        assert entry.gid in axes.owners
        assert entry.mtime_ns in axes.mtimes_ns
        if entry.kind is FileKind.DIR:
            assert entry.mode in axes.dir_modes
        else:
            assert entry.mode in axes.modes
        if entry.kind is not FileKind.FILE and entry.kind is not FileKind.HARDLINK:
            assert entry.size == 0
        if entry.kind is FileKind.SYMLINK:
            assert entry.target != ""
        if entry.kind in (FileKind.FILE, FileKind.DIR):
            assert entry.target == ""


@EXAMPLES
@given(DEFAULT_CASES)
def test_outputs_come_from_target(case: Case) -> None:
    target = TARGETS[case.builder]

    assert case.engine == target.engine
    assert case.output in target.outputs
    assert case.output in PROFILE.build.outputs


@EXAMPLES
@given(DEFAULT_CASES)
def test_classic_cases_only_load(case: Case) -> None:
    if case.builder == "classic":
        assert case.output is Output.LOAD


@EXAMPLES
@given(DEFAULT_CASES)
def test_scratch_bases_never_run(case: Case) -> None:
    if case.dockerfile[0] == "FROM scratch":
        assert not any(line.startswith("RUN") for line in case.dockerfile)


@EXAMPLES
@given(DEFAULT_CASES)
def test_busybox_only_on_native_platforms(case: Case) -> None:
    if uses_busybox(case):
        assert case.platform in NATIVE_PLATFORMS
    assert case.platform in PROFILE.build.platforms


@EXAMPLES
@given(DEFAULT_CASES)
def test_dockerfile_starts_with_from(case: Case) -> None:
    first, *rest = case.dockerfile

    assert first in ("FROM scratch", f"FROM {BUSYBOX_IMAGE}")
    assert 1 <= len(rest) <= PROFILE.dockerfile.max_instructions
    assert not any(line.startswith("FROM") for line in rest)


@EXAMPLES
@given(DEFAULT_CASES)
def test_build_args_come_from_profile(case: Case) -> None:
    names = [name for name, _ in case.build_args]

    assert set(case.build_args) <= set(PROFILE.build.build_args)
    assert names == sorted(set(names))


@EXAMPLES
@given(DEFAULT_CASES)
def test_dockerignore_comes_from_profile(case: Case) -> None:
    if case.dockerignore is not None:
        assert 1 <= len(case.dockerignore) <= 3
        assert set(case.dockerignore) <= set(PROFILE.context.dockerignore)


def test_same_buffer_gives_same_case() -> None:
    drawn: list[Case] = []

    @given(DEFAULT_CASES)
    def record_case(case: Case) -> None:
        drawn.append(case)

    buffers = [random.Random(seed).randbytes(512) for seed in range(20)]
    for buffer in buffers:
        drawn.clear()
        record_case.hypothesis.fuzz_one_input(buffer)
        first = list(drawn)
        drawn.clear()
        record_case.hypothesis.fuzz_one_input(buffer)

        assert len(first) == 1
        assert drawn == first


REACHABLE = {
    "hardlink": lambda c: any(f.kind is FileKind.HARDLINK for f in c.files),
    "symlink": lambda c: any(f.kind is FileKind.SYMLINK for f in c.files),
    "busybox run": lambda c: uses_busybox(c) and "RUN" in c.dockerfile_text,
    "classic": lambda c: c.builder == "classic",
    "tar output": lambda c: c.output is Output.TAR,
    "foreign platform": lambda c: c.platform == "linux/arm64",
    "dockerignore": lambda c: c.dockerignore is not None,
    "json form": lambda c: '["' in c.dockerfile_text,
}


@pytest.mark.parametrize("name", sorted(REACHABLE))
def test_strategy_reaches_feature(name: str) -> None:
    # The property tests above pass vacuously if no case has this feature.
    quick = settings(max_examples=2000, database=None, phases=[Phase.generate])

    case = find(DEFAULT_CASES, REACHABLE[name], settings=quick)

    assert REACHABLE[name](case)


def test_empty_targets_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least one target"):
        cases(PROFILE, [])


@pytest.mark.parametrize(
    ("kind", "line"),
    [
        ("copy-all", "COPY . /ctx/"),
        ("copy-file", "COPY a /picked/"),
        ("copy-dir", "COPY d /picked/"),
        ("add-file", "ADD a /added/"),
        ("copy-chown-id", "COPY --chown=1000:1000 a /owned/"),
        ("copy-chown-name", "COPY --chown=nobody:nogroup a /owned/"),
        ("copy-chmod", "COPY --chmod=0750 a /modes/"),
        ("run", "RUN ls -lan / > /listing.txt"),
        ("workdir", "WORKDIR /work/dir"),
        ("env", "ENV BUILDFUZZ_ENV=value"),
        ("arg", "ARG BUILDFUZZ_ARG=default"),
    ],
)
def test_instruction_renders_kind(kind: str, line: str) -> None:
    files = (ContextFile("a"), ContextFile("d", FileKind.DIR))

    assert render_instruction(kind, files, 0) == line


def test_copy_without_files_copies_root() -> None:
    assert render_instruction("copy-dir", (), 5) == "COPY . /picked/"


@pytest.mark.parametrize(
    ("path", "line"),
    [
        ("sub dir", 'COPY ["sub dir", "/picked/"]'),
        ('q"uote', 'COPY ["q\\"uote", "/picked/"]'),
        ("$HOME", 'COPY ["$HOME", "/picked/"]'),
        ("bad\udcff", 'COPY ["bad\udcff", "/picked/"]'),
    ],
)
def test_awkward_names_use_json_form(path: str, line: str) -> None:
    rendered = render_instruction("copy-file", (ContextFile(path),), 0)

    assert rendered == line


def test_json_form_keeps_raw_bytes() -> None:
    rendered = render_instruction("copy-file", (ContextFile("bad\udcff"),), 0)

    assert os.fsencode(rendered).endswith(b'["bad\xff", "/picked/"]')


def test_unknown_instruction_is_rejected() -> None:
    with pytest.raises(ValueError, match="'healthcheck'"):
        render_instruction("healthcheck", (), 0)
