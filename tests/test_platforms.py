"""Platform lists and FROM --platform=$BUILDPLATFORM / $TARGETPLATFORM."""

import tarfile
from pathlib import Path

import pytest

from buildfuzz.case import Case, ContextFile, FromLine, Output, split_from
from buildfuzz.errors import DataFileError
from buildfuzz.oracle_model import Unmodelled, expected_tree
from buildfuzz.profile import load_profile
from buildfuzz.rules import load_rules, matching_rule
from buildfuzz.session import Session
from buildfuzz.strategies import BUSYBOX_IMAGE, case_platforms

NATIVE_ONLY = frozenset({"linux/amd64"})
POOL = ("", "linux/amd64", "linux/arm64", "linux/amd64,linux/arm64")


@pytest.mark.parametrize(
    ("line", "parts"),
    [
        ("FROM scratch", FromLine("scratch")),
        ("FROM a AS b", FromLine("a", "", "b")),
        ("FROM --platform=$BUILDPLATFORM a AS b", FromLine("a", "$BUILDPLATFORM", "b")),
        ("FROM --platform=linux/arm64 a", FromLine("a", "linux/arm64")),
        ("FROM a b", None),
        ("COPY . /", None),
    ],
)
def test_from_lines_split(line: str, parts: FromLine | None) -> None:
    assert split_from(line) == parts


def test_platform_lists_validated(tmp_path: Path) -> None:
    profile = tmp_path / "p.toml"
    profile.write_text('[build]\nplatforms = ["linux/amd64,linux/arm64"]\n')
    assert load_profile(str(profile)).build.platforms == ("linux/amd64,linux/arm64",)
    profile.write_text('[build]\nplatforms = ["linux/amd64,linux/vax"]\n')
    with pytest.raises(DataFileError, match="joined by commas"):
        load_profile(str(profile))
    profile.write_text('[build]\nplatforms = ["linux/amd64,linux/amd64"]\n')
    with pytest.raises(DataFileError, match="lists a platform twice"):
        load_profile(str(profile))


def test_lists_need_every_platform() -> None:
    scratch = ("FROM scratch", "COPY . /")
    busybox = (f"FROM {BUSYBOX_IMAGE}", "RUN true")
    assert case_platforms(POOL, scratch, NATIVE_ONLY) == POOL
    assert case_platforms(POOL, busybox, NATIVE_ONLY) == ("", "linux/amd64")


def test_build_platform_stage_takes_native_base() -> None:
    """A base FROM --platform=$BUILDPLATFORM runs natively for any target."""
    cross = (f"FROM --platform=$BUILDPLATFORM {BUSYBOX_IMAGE}", "RUN true")
    target = (f"FROM --platform=$TARGETPLATFORM {BUSYBOX_IMAGE}", "RUN true")
    assert case_platforms(POOL, cross, NATIVE_ONLY) == POOL
    assert case_platforms(POOL, target, NATIVE_ONLY) == ("", "linux/amd64")


def test_model_reads_from_flags_and_skips_lists() -> None:
    files = (ContextFile("a", size=3),)
    flagged = Case(files=files, dockerfile=("FROM --platform=$BUILDPLATFORM scratch",))
    assert expected_tree(flagged).nodes == {}
    listed = Case(files=files, platform="linux/amd64,linux/arm64", output=Output.TAR)
    with pytest.raises(Unmodelled, match="multi-platform"):
        expected_tree(listed)


@pytest.mark.parametrize(
    ("case", "log", "rule"),
    [
        (
            Case(platform="linux/amd64,linux/arm64"),
            "ERROR: docker exporter does not currently support exporting "
            "manifest lists",
            "multi-platform-load",
        ),
        (
            Case(platform="linux/amd64,linux/arm64", output=Output.TAR),
            "ERROR: Multi-platform build is not supported for the docker driver.",
            "docker-driver-multi-platform",
        ),
        (
            Case(builder="classic", platform="linux/amd64,linux/arm64"),
            '"linux/amd64,linux/arm64" is an invalid component of '
            '"linux/amd64,linux/arm64": platform specifier component must match '
            '"^[A-Za-z0-9_-]+$": invalid argument',
            "classic-multi-platform",
        ),
        (
            Case(
                builder="classic",
                dockerfile=("FROM --platform=$BUILDPLATFORM scratch",),
            ),
            'failed to parse platform : "" is an invalid component of "": platform '
            "specifier component must match",
            "classic-from-platform-args",
        ),
    ],
)
def test_measured_messages_have_rules(case: Case, log: str, rule: str) -> None:
    found = matching_rule(load_rules("expected"), case, log)
    assert found is not None
    assert found.id == rule


def _tree(tar: Path) -> list[str]:
    with tarfile.open(tar) as archive:
        return sorted(member.name.lstrip("./") for member in archive.getmembers())


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_platform_list_builds_one_tree_each(session: Session) -> None:
    """A docker-container builder writes one tree per platform of a list."""
    case = Case(
        builder="container-v0-34",
        output=Output.TAR,
        platform="linux/amd64,linux/arm64",
        files=(ContextFile("a", size=3),),
        dockerfile=("FROM scratch", "COPY . /"),
    )
    names: list[str] = []
    record = session.execute(case)
    runner = session._runners[session.engine(case).label]
    runner.run(
        case, lambda result, case_dir: names.extend(_tree(case_dir / "rootfs.tar"))
    )

    assert record.evaluation.verdict == "pass", record.result.log[-1500:]
    assert "tree oracle: not modelled: a multi-platform build" in " ".join(
        record.result.notes
    )
    assert "linux_amd64/a" in names
    assert "linux_arm64/a" in names


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("builder", ["buildx-docker", "container-v0-34"])
def test_build_platform_stage_runs_natively(builder: str, session: Session) -> None:
    """RUN in a $BUILDPLATFORM stage runs the machine's binaries for an arm64 build."""
    case = Case(
        builder=builder,
        output=Output.TAR,
        platform="linux/arm64",
        dockerfile=(
            f"FROM --platform=$BUILDPLATFORM {BUSYBOX_IMAGE} AS build",
            "RUN uname -m > /arch",
            "FROM scratch",
            "COPY --from=build /arch /arch",
        ),
    )
    arch: list[bytes] = []

    def read_arch(result: object, case_dir: Path) -> None:
        with tarfile.open(case_dir / "rootfs.tar") as archive:
            stream = archive.extractfile("arch")
            assert stream is not None
            arch.append(stream.read())

    record = session.execute(case)
    runner = session._runners[session.engine(case).label]
    runner.run(case, read_arch)

    assert record.evaluation.verdict == "pass", record.result.log[-1500:]
    assert arch == [b"x86_64\n"]
