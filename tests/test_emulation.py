"""Emulated platforms: binfmt_misc handlers, strategies, rules and real builds."""

import tarfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import buildfuzz.emulation as emulation
from buildfuzz.base_formats import FORMATS_BY_NAME
from buildfuzz.baseimage import import_busybox
from buildfuzz.build import BuildResult, CaseRunner
from buildfuzz.buildx_builders import BuilderPool
from buildfuzz.case import Case, Output
from buildfuzz.definitions import load_definitions
from buildfuzz.doctor import _binfmt_check
from buildfuzz.emulation import (
    missing_emulation,
    qemu_handlers,
    read_handler,
    runnable_platforms,
)
from buildfuzz.install import busybox_binary
from buildfuzz.profile import load_profile
from buildfuzz.rules import load_rules, matching_rule
from buildfuzz.strategies import Target, case_platforms, cases
from tests.conftest import client_tools, start_engine

MULTI = FORMATS_BY_NAME["busybox-multi"]
RUN_ARCH = "RUN uname -m > /arch"
# e_machine of an ELF header (bytes 18 and 19, little endian) for AArch64.
EM_AARCH64 = 183

AARCH64_ENABLED = (
    "enabled\n"
    "interpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\n"
    "flags: PF\n"
    "offset 0\n"
    "magic 7f454c460201010000000000000000000200b700\n"
    "mask ffffffffffffff00fffffffffffffffffeffffff\n"
)


def fake_binfmt(
    directory: Path, handlers: dict[str, str], status: str = "enabled"
) -> Path:
    """Write a binfmt_misc directory with ``handlers`` (name to file text)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "status").write_text(f"{status}\n")
    (directory / "register").write_text("")
    for name, text in handlers.items():
        (directory / name).write_text(text)
    return directory


def test_read_handler_parses_flags(tmp_path: Path) -> None:
    fake_binfmt(tmp_path, {"qemu-aarch64": AARCH64_ENABLED})

    handler = read_handler(tmp_path / "qemu-aarch64")

    assert handler is not None
    assert handler.name == "qemu-aarch64"
    assert handler.enabled
    assert handler.flags == "PF"
    assert handler.interpreter == "/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
    assert handler.usable


def test_runnable_platforms_of_handlers(tmp_path: Path) -> None:
    arm = AARCH64_ENABLED.replace("aarch64", "arm")
    fake_binfmt(
        tmp_path,
        {
            "qemu-aarch64": AARCH64_ENABLED,
            "qemu-arm": arm,
            "qemu-s390x": AARCH64_ENABLED.replace("enabled", "disabled", 1),
            "qemu-riscv64": AARCH64_ENABLED.replace("flags: PF", "flags: P"),
            "python3.11": AARCH64_ENABLED,
        },
    )

    platforms = runnable_platforms(tmp_path, machine="x86_64")

    assert "linux/amd64" in platforms
    assert "linux/386" in platforms
    assert "linux/arm64" in platforms
    assert "linux/arm/v7" in platforms
    assert "linux/s390x" not in platforms  # disabled
    assert "linux/riscv64" not in platforms  # no F flag
    assert "linux/ppc64le" not in platforms  # not registered


def test_runnable_platforms_without_binfmt(tmp_path: Path) -> None:
    disabled = fake_binfmt(
        tmp_path / "off", {"qemu-aarch64": AARCH64_ENABLED}, status="disabled"
    )

    assert runnable_platforms(tmp_path / "missing", machine="x86_64") == {
        "linux/amd64",
        "linux/386",
    }
    assert qemu_handlers(disabled) == []
    assert runnable_platforms(tmp_path / "missing", machine="aarch64") == {
        "linux/arm64"
    }


def test_missing_emulation_names_handler_and_fix(tmp_path: Path) -> None:
    empty = fake_binfmt(tmp_path / "empty", {})
    no_f = fake_binfmt(
        tmp_path / "no-f",
        {"qemu-aarch64": AARCH64_ENABLED.replace("flags: PF", "flags: P")},
    )
    ready = fake_binfmt(tmp_path / "ready", {"qemu-aarch64": AARCH64_ENABLED})

    message = missing_emulation("linux/arm64", empty, machine="x86_64")
    without_f = missing_emulation("linux/arm64", no_f, machine="x86_64")

    assert message is not None
    assert "no qemu-aarch64 handler is registered" in message
    assert "qemu-user-static" in message
    assert without_f is not None
    assert "without F" in without_f
    assert missing_emulation("linux/arm64", ready, machine="x86_64") is None
    assert missing_emulation("", empty, machine="x86_64") is None
    assert missing_emulation("linux/amd64", empty, machine="x86_64") is None


@pytest.mark.parametrize(
    ("runnable", "expected"),
    [
        (frozenset({"linux/amd64"}), ("", "linux/amd64")),
        (frozenset({"linux/amd64", "linux/arm64"}), ("", "linux/amd64", "linux/arm64")),
    ],
)
def test_case_platforms_follow_runnable(
    runnable: frozenset[str], expected: tuple[str, ...]
) -> None:
    platforms = ("", "linux/amd64", "linux/arm64")
    dockerfile = (f"FROM {MULTI.image}", RUN_ARCH)

    assert case_platforms(platforms, dockerfile, runnable) == expected


def test_case_platforms_read_binfmt_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    platforms = ("", "linux/amd64", "linux/arm64")
    dockerfile = (f"FROM {MULTI.image}", RUN_ARCH)
    monkeypatch.setattr(emulation, "BINFMT_DIR", fake_binfmt(tmp_path / "none", {}))
    without = case_platforms(platforms, dockerfile)
    monkeypatch.setattr(
        emulation,
        "BINFMT_DIR",
        fake_binfmt(tmp_path / "arm", {"qemu-aarch64": AARCH64_ENABLED}),
    )

    assert without == ("", "linux/amd64")
    assert case_platforms(platforms, dockerfile) == platforms


def foreign_run_cases(examples: int) -> list[Case]:
    """Draw ``examples`` cases FROM busybox-multi; keep arm64 RUN cases."""
    images = load_profile("images")
    axes = replace(images.dockerfile, bases=("busybox-multi",), instructions=("run",))
    profile = replace(images, dockerfile=axes)
    targets = (Target("26.1", "buildx-docker"), Target("26.1", "container-v0-34"))
    found: list[Case] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def draw(data: st.DataObject) -> None:
        case = data.draw(cases(profile, targets))
        runs = any(element.startswith("RUN ") for element in case.dockerfile)
        if case.platform == "linux/arm64" and runs:
            found.append(case)

    draw()
    return found


def test_foreign_run_cases_need_handler(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulation, "BINFMT_DIR", fake_binfmt(tmp_path / "none", {}))
    without = foreign_run_cases(100)
    monkeypatch.setattr(
        emulation,
        "BINFMT_DIR",
        fake_binfmt(tmp_path / "arm", {"qemu-aarch64": AARCH64_ENABLED}),
    )
    with_handler = foreign_run_cases(100)

    assert without == []
    assert with_handler != []


# The end of the log of buildx-docker building FROM busybox-multi with
# RUN uname -m > /arch for linux/arm64 while the qemu-aarch64 handler was
# disabled (engine 26.1).
NO_HANDLER_LOG = (
    "#5 [2/2] RUN uname -m > /arch\n#5 0.131 exec /bin/sh: exec format error\n"
)


def test_rule_explains_missing_handler() -> None:
    rules = load_rules("expected")
    case = Case(dockerfile=(f"FROM {MULTI.image}", RUN_ARCH), platform="linux/arm64")

    rule = matching_rule(rules, case, NO_HANDLER_LOG)

    assert rule is not None
    assert rule.id == "foreign-run-without-emulator"
    assert "qemu-user-static" in rule.reason


def test_doctor_lists_usable_handlers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(emulation, "BINFMT_DIR", fake_binfmt(tmp_path / "none", {}))
    missing = _binfmt_check()
    monkeypatch.setattr(
        emulation,
        "BINFMT_DIR",
        fake_binfmt(tmp_path / "arm", {"qemu-aarch64": AARCH64_ENABLED}),
    )
    ready = _binfmt_check()

    assert not missing.ok
    assert "update-binfmts --enable" in missing.fix
    assert ready.ok
    assert "linux/arm64" in ready.detail


# Engine tests ----------------------------------------------------------------


@pytest.fixture
def runner_on_engine(run_dir: Path) -> Iterator[tuple[BuilderPool, CaseRunner, object]]:
    """An engine 26.1 with the busybox base, a builder pool and a case runner."""
    definitions = load_definitions()
    engine = start_engine("26.1", run_dir)
    docker = client_tools(run_dir).docker(engine.host)
    pool = BuilderPool(run_dir)
    try:
        import_busybox(docker, Path(busybox_binary()), engine.directory)
        runner = CaseRunner(
            docker,
            definitions.builders,
            run_dir / "cases",
            timeout=180,
            builder_name=lambda builder: pool.builder("26.1", docker, builder),
        )
        yield pool, runner, docker
    finally:
        pool.close()
        engine.stop()


def read_members(tar_path: Path, names: tuple[str, ...]) -> dict[str, bytes]:
    """Return the contents of the members ``names`` of a rootfs tar."""
    contents = {}
    with tarfile.open(tar_path) as archive:
        for member in archive.getmembers():
            name = member.name.removeprefix("./").lstrip("/")
            extracted = archive.extractfile(member) if member.isfile() else None
            if name in names and extracted is not None:
                contents[name] = extracted.read()
    return contents


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("builder", ["buildx-docker", "container-v0-34"])
def test_run_step_on_arm64_runs_aarch64(
    builder: str, runner_on_engine: tuple[BuilderPool, CaseRunner, object]
) -> None:
    """RUN on linux/arm64 runs the arm64 busybox of busybox-multi under qemu."""
    assert missing_emulation("linux/arm64") is None, missing_emulation("linux/arm64")
    pool, runner, docker = runner_on_engine
    case = Case(
        dockerfile=(f"FROM {MULTI.image}", RUN_ARCH),
        builder=builder,
        platform="linux/arm64",
        output=Output.TAR,
    )
    pool.provide_bases("26.1", docker, case, load_definitions().builders[builder])  # type: ignore[arg-type]
    contents: dict[str, bytes] = {}

    def inspect(result: BuildResult, case_dir: Path) -> None:
        if result.succeeded:
            contents.update(
                read_members(case_dir / "rootfs.tar", ("arch", "bin/busybox"))
            )

    result = runner.run(case, inspect)

    assert result.succeeded, result.log[-1500:]
    assert contents["arch"] == b"aarch64\n"
    elf = contents["bin/busybox"][:20]
    assert elf[:4] == b"\x7fELF"
    assert int.from_bytes(elf[18:20], "little") == EM_AARCH64
