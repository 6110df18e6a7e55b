"""Tests that generated cases are valid builds of the profile's axes."""

import json
import os
import random
import re
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings

from buildfuzz.base_formats import FORMATS_BY_IMAGE
from buildfuzz.case import (
    Case,
    ContextFile,
    FileKind,
    Output,
    case_from_dict,
    check_context_path,
    split_from,
)
from buildfuzz.profile import load_profile
from buildfuzz.strategies import (
    BUSYBOX_IMAGE,
    NATIVE_PLATFORMS,
    RESERVED_NAMES,
    Target,
    cases,
    render_instruction,
)
from buildfuzz.strategies_context import (
    DEVICE_KINDS,
    SIZED_KINDS,
    XATTR_KINDS,
    long_path,
)
from buildfuzz.strategies_dockerfile import (
    instruction_kinds,
    layer_count,
    stage_count,
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
        # The long path lives under deep/, a name kept for it.
        assert path.split("/")[0] not in RESERVED_NAMES - {"deep"}
        assert path.split("/")[0] != "deep" or path == paths[-1]


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
        if entry.path.startswith("deep/"):
            continue  # the long path, see test_long_path_has_exact_length
        assert set(entry.path.split("/")) <= set(axes.names)
        assert entry.kind in axes.kinds
        assert entry.uid in axes.owners
        assert entry.gid in axes.owners
        assert entry.mtime_ns in axes.mtimes_ns
        if entry.kind is FileKind.DIR:
            assert entry.mode in axes.dir_modes
        else:
            assert entry.mode in axes.modes
        if entry.kind not in SIZED_KINDS | {FileKind.HARDLINK, FileKind.SPARSE}:
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
    if not uses_busybox(case):
        assert not any(line.startswith("RUN") for line in case.dockerfile)


@EXAMPLES
@given(DEFAULT_CASES)
def test_busybox_only_on_native_platforms(case: Case) -> None:
    """busybox is local for this machine only, unless a stage takes it for
    the build platform ($BUILDPLATFORM)."""
    on_target = [
        line
        for line in case.dockerfile
        if BUSYBOX_IMAGE in line and "--platform=$BUILDPLATFORM" not in line
    ]
    if on_target:
        assert case.platform in NATIVE_PLATFORMS
    assert case.platform in PROFILE.build.platforms


@EXAMPLES
@given(DEFAULT_CASES)
def test_dockerfile_starts_with_from(case: Case) -> None:
    first = case.dockerfile[0]
    elements = list(case.dockerfile)
    if layer_count(case.dockerfile):
        elements.pop()  # the block of extra layers ends the last stage
    starts = [i for i, line in enumerate(elements) if line.startswith("FROM")]
    ends = [*starts[1:], len(elements)]

    flag = r"(--platform=\$(BUILD|TARGET)PLATFORM )?"
    assert re.fullmatch(f"FROM {flag}(scratch|{BUSYBOX_IMAGE})( AS stage0)?", first)
    assert starts[0] == 0
    for start, end in zip(starts, ends, strict=True):
        assert 1 <= end - start - 1 <= PROFILE.dockerfile.max_instructions


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


# The widened axes: every profile, new kinds, stages, build options.

NIGHTLY = load_profile("nightly")
NIGHTLY_CASES = cases(NIGHTLY, [BUILDX, CLASSIC])
PROFILE_CASES = {
    name: cases(load_profile(name), [BUILDX, CLASSIC])
    for name in ("default", "nightly", "context", "images")
}


def drawn_cases(profile_name: str, count: int) -> list[Case]:
    """Draw ``count`` cases of a profile, the same ones on every run."""
    drawn: list[Case] = []

    @settings(
        max_examples=count,
        database=None,
        derandomize=True,
        phases=[Phase.generate],
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(PROFILE_CASES[profile_name])
    def record(case: Case) -> None:
        drawn.append(case)

    record()
    return drawn


@pytest.fixture(scope="module")
def many_cases() -> dict[str, list[Case]]:
    return {name: drawn_cases(name, 300) for name in ("default", "nightly")}


def stage_names(case: Case) -> list[str]:
    return [
        line.split(" AS ")[1] for line in case.dockerfile if line.startswith("FROM ")
        if " AS " in line
    ]  # fmt: skip


@pytest.mark.parametrize("name", sorted(PROFILE_CASES))
def test_every_profile_gives_valid_cases(name: str) -> None:
    for case in drawn_cases(name, 40):
        loaded = case_from_dict(json.loads(case.to_json()))

        assert loaded == case
        paths = [entry.path for entry in case.files]
        assert len(paths) == len(set(paths))
        for path in paths:
            check_context_path(path)


@EXAMPLES
@given(NIGHTLY_CASES)
def test_new_attributes_only_where_they_exist(case: Case) -> None:
    axes = NIGHTLY.context

    for entry in case.files:
        if entry.kind in DEVICE_KINDS:
            assert (entry.major, entry.minor) in axes.devices
        else:
            assert (entry.major, entry.minor) == (0, 0)
        if entry.kind in XATTR_KINDS or entry.kind is FileKind.HARDLINK:
            assert entry.xattrs in axes.xattrs
        else:
            assert entry.xattrs == ()
        if entry.kind is FileKind.SPARSE:
            assert entry.size in axes.sparse_sizes


@EXAMPLES
@given(NIGHTLY_CASES)
def test_long_path_has_exact_length(case: Case) -> None:
    deep = [entry for entry in case.files if entry.path.startswith("deep/")]

    assert len(deep) <= 1
    for entry in deep:
        assert len(os.fsencode(entry.path)) in NIGHTLY.context.path_lengths
        assert all(len(part) <= 255 for part in entry.path.split("/"))
        assert entry is case.files[-1]


@EXAMPLES
@given(NIGHTLY_CASES)
def test_bulk_recipe_comes_from_pools(case: Case) -> None:
    axes = NIGHTLY.context

    if case.bulk is None:
        return
    assert case.bulk.count in axes.bulk_files
    assert case.bulk.count > 0
    assert case.bulk.sizes in axes.bulk_sizes
    assert case.bulk.depth in axes.bulk_depths
    assert not any(entry.path.split("/")[0] == "bulk" for entry in case.files)


@EXAMPLES
@given(NIGHTLY_CASES)
def test_stages_are_named_and_referenced(case: Case) -> None:
    froms = [line for line in case.dockerfile if line.startswith("FROM ")]
    names = stage_names(case)

    assert len(froms) in NIGHTLY.dockerfile.stages
    if len(froms) > 1 or case.target:
        assert names == [f"stage{index}" for index in range(len(froms))]
    if case.target:
        assert case.target == "stage0"
    for position, line in enumerate(case.dockerfile):
        for reference in re.findall(r"(?:--from=|FROM )(stage\d+)", line):
            earlier = stage_names(Case(dockerfile=case.dockerfile[:position]))
            assert reference in earlier, line


@EXAMPLES
@given(NIGHTLY_CASES)
def test_shell_steps_only_on_busybox_stages(case: Case) -> None:
    roots: list[str] = []
    root = ""
    for line in case.dockerfile:
        parts = split_from(line)
        if parts is not None:
            image = parts.image
            root = roots[int(image[5:])] if image.startswith("stage") else image
            roots.append(root)
        elif line.startswith("RUN"):
            assert root == BUSYBOX_IMAGE or root in FORMATS_BY_IMAGE, case.dockerfile


@EXAMPLES
@given(NIGHTLY_CASES)
def test_build_options_come_from_pools(case: Case) -> None:
    build = NIGHTLY.build

    assert case.dockerfile_name in NIGHTLY.dockerfile.paths
    assert case.no_cache in build.no_cache
    assert case.tags in build.tags
    if case.output is not Output.LOAD:
        assert case.tags == ()
    if case.dockerfile_dockerignore is not None:
        assert set(case.dockerfile_dockerignore) <= set(NIGHTLY.context.dockerignore)
    for entry in case.files:
        assert entry.path.split("/")[0] != case.dockerfile_name.split("/")[0]


@EXAMPLES
@given(NIGHTLY_CASES)
def test_layers_block_is_one_element(case: Case) -> None:
    count = layer_count(case.dockerfile)

    assert count in NIGHTLY.dockerfile.layers
    if count:
        assert case.dockerfile[-1].count("\n") == count - 1


def test_long_path_lengths() -> None:
    for length in (8, 100, 120, 256, 4096, 4200, 10000):
        path = long_path(length)

        assert len(os.fsencode(path)) == length
        assert path.startswith("deep/")
        assert max(len(part) for part in path.split("/")) <= 255


def test_default_profile_keeps_cases_quick() -> None:
    axes = PROFILE.context

    assert FileKind.FIFO not in axes.kinds
    assert max(axes.bulk_files) <= 1000
    assert max(axes.path_lengths) < 4096
    assert max(PROFILE.dockerfile.layers) < 100


def is_sparse_8g(case: Case) -> bool:
    return any(f.kind is FileKind.SPARSE and f.size == 8 << 30 for f in case.files)


def has_non_utf8_name(case: Case) -> bool:
    for entry in case.files:
        try:
            os.fsencode(entry.path).decode("utf-8")
        except UnicodeDecodeError:
            return True
    return False


def has_kind(kind: FileKind) -> Callable[[Case], bool]:
    return lambda case: any(entry.kind is kind for entry in case.files)


def has_instruction(kind: str) -> Callable[[Case], bool]:
    return lambda case: kind in instruction_kinds(case.dockerfile, case.files)


NEW_FEATURES: dict[str, Callable[[Case], bool]] = {
    "bulk 100": lambda c: c.bulk is not None and c.bulk.count == 100,
    "bulk 10000": lambda c: c.bulk is not None and c.bulk.count == 10000,
    "bulk nested 4": lambda c: c.bulk is not None and c.bulk.depth == 4,
    "sparse 8 GiB": is_sparse_8g,
    "xattrs": lambda c: any(entry.xattrs for entry in c.files),
    "char device": has_kind(FileKind.CHAR_DEVICE),
    "block device": has_kind(FileKind.BLOCK_DEVICE),
    "whiteout device": lambda c: any(
        f.kind is FileKind.CHAR_DEVICE and (f.major, f.minor) == (0, 0) for f in c.files
    ),
    "socket": has_kind(FileKind.SOCKET),
    "fifo": has_kind(FileKind.FIFO),
    "archive": has_kind(FileKind.ARCHIVE),
    "non-utf8 name": has_non_utf8_name,
    "path over 100 bytes": lambda c: any(
        100 < len(os.fsencode(f.path)) for f in c.files
    ),
    "path over 4096 bytes": lambda c: any(
        len(os.fsencode(f.path)) > 4096 for f in c.files
    ),
    "owner over 2^21": lambda c: any(f.uid > 2**21 for f in c.files),
    "owner 2^32-2": lambda c: any(f.uid == 2**32 - 2 for f in c.files),
    "mtime before 1970": lambda c: any(f.mtime_ns < 0 for f in c.files),
    "mtime after 2038": lambda c: any(f.mtime_ns > 2**31 * 10**9 for f in c.files),
    "unsearchable dir": lambda c: any(
        f.kind is FileKind.DIR and f.mode in (0o000, 0o300) for f in c.files
    ),
    "dockerignore negation": lambda c: any(
        p.startswith("!") for p in c.dockerignore or ()
    ),
    "dockerignore double star": lambda c: any("**" in p for p in c.dockerignore or ()),
    "dockerignore trailing slash": lambda c: any(
        p.endswith("/") for p in c.dockerignore or ()
    ),
    "Dockerfile.dockerignore": lambda c: c.dockerfile_dockerignore is not None,
    "dockerfile name": lambda c: c.dockerfile_name != "Dockerfile",
    "multi-stage": lambda c: stage_count(c.dockerfile) > 1,
    "FROM stage": lambda c: any(line.startswith("FROM stage") for line in c.dockerfile),
    "copy --from": has_instruction("copy-from-stage"),
    "run heredoc": has_instruction("run-heredoc"),
    "copy heredoc": has_instruction("copy-heredoc"),
    "mount cache": has_instruction("run-mount-cache"),
    "mount tmpfs": has_instruction("run-mount-tmpfs"),
    "mount bind": has_instruction("run-mount-bind"),
    "mount secret": has_instruction("run-mount-secret"),
    "copy --link": has_instruction("copy-link"),
    "copy --parents": has_instruction("copy-parents"),
    "copy --exclude": has_instruction("copy-exclude"),
    "add archive": lambda c: (
        has_instruction("add-archive")(c) and has_kind(FileKind.ARCHIVE)(c)
    ),
    "user": has_instruction("user"),
    "workdir": has_instruction("workdir"),
    "arg": has_instruction("arg"),
    "env": has_instruction("env"),
    "10 layers": lambda c: layer_count(c.dockerfile) == 10,
    "130 layers": lambda c: layer_count(c.dockerfile) == 130,
    "several tags": lambda c: len(c.tags) >= 2,
    "target": lambda c: c.target == "stage0",
    "no cache": lambda c: c.no_cache,
    "secret-like build arg": lambda c: any(
        name == "REGISTRY_PASSWORD" for name, _ in c.build_args
    ),
}


@pytest.mark.parametrize("feature", sorted(NEW_FEATURES))
def test_new_feature_is_reachable(
    feature: str, many_cases: dict[str, list[Case]]
) -> None:
    check = NEW_FEATURES[feature]

    found = [name for name, drawn in many_cases.items() if any(map(check, drawn))]

    assert found, f"{feature} in none of {sorted(many_cases)}"
