"""Registry bases: their formats, strategies, model, repro.sh and real builds."""

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildfuzz.base_formats import (
    BASE_FORMATS,
    FORMATS_BY_NAME,
    BaseFormat,
    base_dockerfile,
    formats_in,
    unusable_bases,
)
from buildfuzz.base_publisher import (
    PASSWORD_VARIABLE,
    USER_VARIABLE,
    BasePullError,
    install_credential_helper,
)
from buildfuzz.baseimage import import_busybox
from buildfuzz.build import CaseRunner
from buildfuzz.buildx_builders import BuilderPool, mirror_config
from buildfuzz.case import Case, Output
from buildfuzz.definitions import load_definitions
from buildfuzz.emulation import missing_emulation
from buildfuzz.engine import EngineOptions, SandboxEngine
from buildfuzz.install import busybox_binary, engine_tree_name
from buildfuzz.oracle_model import Unmodelled, expected_tree
from buildfuzz.packages import tree_path
from buildfuzz.profile import load_profile
from buildfuzz.registry import LoopbackRegistry
from buildfuzz.repro import render_repro
from buildfuzz.rules import load_rules, matching_rule
from buildfuzz.signature import Phase, Signature
from buildfuzz.strategies import BUSYBOX_IMAGE, Target, case_platforms, cases
from tests.conftest import client_tools, start_engine

MULTI = FORMATS_BY_NAME["busybox-multi"]
OCI_ZSTD = FORMATS_BY_NAME["busybox-oci-zstd"]
RUN_LISTING = "RUN ls -lan / > /listing.txt"
SIGNATURE = Signature(Phase.SOLVE, "failed to compute cache key: not found")


def test_format_names_and_images_unique() -> None:
    names = [base.name for base in BASE_FORMATS]
    images = [base.image for base in BASE_FORMATS]

    assert len(set(names)) == len(names)
    assert len(set(images)) == len(images)
    assert all(image.startswith("localhost/buildfuzz/busybox-") for image in images)


def test_attestations_only_with_oci_media_types() -> None:
    """BuildKit v0.34.2 rejects attestations with oci-mediatypes=false."""
    with_attestations = [base for base in BASE_FORMATS if base.attestations]

    assert with_attestations
    assert all(base.oci_mediatypes for base in with_attestations)


def test_formats_cover_required_axes() -> None:
    compressions = {base.compression for base in BASE_FORMATS}
    media_types = {base.oci_mediatypes for base in BASE_FORMATS}

    assert compressions == {"gzip", "zstd", "estargz", "uncompressed"}
    assert media_types == {True, False}
    assert any(base.multi_platform for base in BASE_FORMATS)
    assert any(base.authenticated for base in BASE_FORMATS)


def test_output_option_of_oci_zstd() -> None:
    output = OCI_ZSTD.output("localhost:5000/buildfuzz/busybox-oci-zstd:1")

    assert output == (
        "type=image,name=localhost:5000/buildfuzz/busybox-oci-zstd:1,push=true,"
        "oci-mediatypes=true,compression=zstd,force-compression=true"
    )


def test_build_flags_of_attested_multi_base() -> None:
    base = FORMATS_BY_NAME["busybox-multi-attest-zstd"]

    assert base.build_flags() == [
        "--platform",
        "linux/amd64,linux/arm64",
        "--build-arg",
        "BASE_NAME=busybox-multi-attest-zstd",
        "--provenance=mode=min",
        "--sbom=false",
    ]
    assert base.buildctl_options() == [
        "--opt=platform=linux/amd64,linux/arm64",
        "--opt=build-arg:BASE_NAME=busybox-multi-attest-zstd",
        "--opt=attest:provenance=mode=min",
    ]


def test_formats_in_reads_from_lines() -> None:
    dockerfile = (
        f"FROM {OCI_ZSTD.image} AS stage0",
        "COPY . /ctx/",
        f"FROM {MULTI.image}",
        f"FROM {OCI_ZSTD.image}",
        f"FROM {BUSYBOX_IMAGE}",
    )

    assert formats_in(dockerfile) == [OCI_ZSTD, MULTI]


def test_base_dockerfile_adds_tar_per_arch() -> None:
    assert "ADD rootfs-${TARGETARCH}.tar /" in base_dockerfile()


PLATFORMS = ("", "linux/amd64", "linux/arm64")
NATIVE_ONLY = frozenset({"linux/amd64"})  # a machine without qemu handlers


@pytest.mark.parametrize(
    ("dockerfile", "expected"),
    [
        ((f"FROM {MULTI.image}", "COPY . /ctx/"), PLATFORMS),
        ((f"FROM {MULTI.image}", RUN_LISTING), ("", "linux/amd64")),
        ((f"FROM {OCI_ZSTD.image}", "COPY . /ctx/"), ("", "linux/amd64")),
        ((f"FROM {BUSYBOX_IMAGE}", "FROM busybox-multi"), ("", "linux/amd64")),
        (("FROM scratch", "COPY . /ctx/"), PLATFORMS),
    ],
)
def test_case_platforms(dockerfile: tuple[str, ...], expected: tuple[str, ...]) -> None:
    assert case_platforms(PLATFORMS, dockerfile, NATIVE_ONLY) == expected


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_images_profile_draws_only_buildable_platforms(data: st.DataObject) -> None:
    profile = load_profile("images")
    targets = (Target("26.1", "buildx-docker"), Target("26.1", "classic"))

    case = data.draw(cases(profile, targets))

    allowed = case_platforms(profile.build.platforms, case.dockerfile)
    assert case.platform in allowed


def test_unusable_bases_by_engine_and_store() -> None:
    zstd = {base.name for base in BASE_FORMATS if base.compression == "zstd"}

    assert (
        unusable_bases(engine="20.10", containerd_store=False, engine_store=True)
        == zstd
    )
    assert unusable_bases(engine="26.1", containerd_store=True, engine_store=True) == {
        "busybox-docker-zstd"
    }
    assert not unusable_bases(engine="26.1", containerd_store=False, engine_store=True)
    assert not unusable_bases(
        engine="20.10", containerd_store=False, engine_store=False
    )


def test_unreachable_registry_gives_no_bases() -> None:
    from buildfuzz.campaign import _reaches_loopback

    definitions = load_definitions()
    every = {base.name for base in BASE_FORMATS}
    external = replace(definitions.engines["26.1"], source="external")

    assert _reaches_loopback(definitions.engines["26.1"])
    assert not _reaches_loopback(definitions.engines["dind-26.1"])
    assert not _reaches_loopback(replace(external, host="tcp://docker:2375"))
    assert _reaches_loopback(replace(external, host="unix:///run/docker.sock"))
    assert (
        unusable_bases(
            engine="26.1", containerd_store=False, engine_store=True, registry=False
        )
        == every
    )
    # Builders in containers pull through their mirror, whatever the engine.
    assert not unusable_bases(
        engine="26.1", containerd_store=False, engine_store=False, registry=False
    )


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_cases_skip_unusable_bases(data: st.DataObject) -> None:
    profile = load_profile("images")
    targets = (
        Target("26.1", "buildx-docker", containerd_store=True),
        Target("20.10", "classic"),
    )

    case = data.draw(cases(profile, targets))

    compressions = {base.compression for base in formats_in(case.dockerfile)}
    if case.containerd_store:
        assert FORMATS_BY_NAME["busybox-docker-zstd"] not in formats_in(case.dockerfile)
    if case.engine == "20.10":
        assert "zstd" not in compressions


LOAD_ERROR_20_10 = (
    " > importing to docker:\n------\nERROR: failed to solve: rpc error: code = "
    "Unknown desc = Error processing tar file(exit status 1): "
    "archive/tar: invalid tar header\n"
)


@pytest.mark.parametrize("base", [b for b in BASE_FORMATS if b.compression == "zstd"])
def test_zstd_load_rule_on_20_10(base: BaseFormat) -> None:
    """The log of remote-v0-34 loading FROM busybox-oci-zstd into Docker 20.10."""
    rules = load_rules("expected")
    case = Case(
        dockerfile=(f"FROM {base.image}", "COPY . /ctx/"),
        engine="20.10",
        builder="remote-v0-34",
    )

    rule = matching_rule(rules, case, LOAD_ERROR_20_10)
    on_26 = matching_rule(rules, case.with_changes(engine="26.1"), LOAD_ERROR_20_10)

    assert rule is not None
    assert rule.id == "zstd-base-load-20.10"
    assert on_26 is None


def test_files_containing_finds_planted_text(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "config.json").write_text('{"auth": "planted-secret"}')
    (tmp_path / "other").write_text("nothing")

    assert files_containing(tmp_path, "planted-secret") == [
        tmp_path / "sub" / "config.json"
    ]


@pytest.mark.parametrize("name", ["images", "nightly"])
def test_profiles_list_every_format(name: str) -> None:
    bases = load_profile(name).dockerfile.bases

    assert bases[0] == "scratch"
    assert {base.name for base in BASE_FORMATS} <= set(bases)


def test_mirror_config_asks_auth_registry_second(tmp_path: Path) -> None:
    registry = LoopbackRegistry(tmp_path)
    auth = LoopbackRegistry(tmp_path, "auth", "user", "secret-password")
    registry.port, auth.port = 5001, 5002

    text = mirror_config(registry, auth_registry=auth)

    assert 'mirrors = ["127.0.0.1:5001", "127.0.0.1:5002"]' in text
    assert '[registry."127.0.0.1:5002"]' in text
    assert "secret-password" not in text


@pytest.mark.parametrize("base", ["busybox-oci-zstd", "busybox-multi"])
def test_model_of_registry_base_matches_busybox(base: str) -> None:
    """WORKDIR, because a COPY of the context would copy Dockerfiles that differ."""
    image = FORMATS_BY_NAME[base].image

    tree = expected_tree(Case(dockerfile=(f"FROM {image}", "WORKDIR /work/dir")))
    local = expected_tree(
        Case(dockerfile=(f"FROM {BUSYBOX_IMAGE}", "WORKDIR /work/dir"))
    )

    assert tree == local
    assert "/bin" in tree.opaque


def test_model_rejects_unknown_registry_image() -> None:
    case = Case(dockerfile=("FROM localhost/buildfuzz/other:1", "COPY . /ctx/"))

    with pytest.raises(Unmodelled):
        expected_tree(case)


def test_credential_helper_reads_environment(tmp_path: Path) -> None:
    saved_path = os.environ.get("PATH", "")
    try:
        helper = install_credential_helper(tmp_path / "bin")
    finally:
        os.environ["PATH"] = saved_path
    environment = {USER_VARIABLE: "fuzz", PASSWORD_VARIABLE: "pa$$word"}

    found = subprocess.run(
        [str(helper), "get"],
        input="localhost:5000",
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )
    missing = subprocess.run(
        [str(helper), "get"], input="x", env={}, capture_output=True, text=True
    )

    assert found.returncode == 0
    assert json.loads(found.stdout) == {
        "ServerURL": "localhost:5000",
        "Username": "fuzz",
        "Secret": "pa$$word",
    }
    assert missing.returncode == 1
    assert "pa$$word" not in helper.read_text()


@pytest.mark.parametrize("builder", ["buildx-docker", "container-v0-34"])
def test_repro_recreates_registry_base(builder: str) -> None:
    case = Case(dockerfile=(f"FROM {MULTI.image}", "COPY . /ctx/"), builder=builder)

    script = render_repro(case, SIGNATURE, timeout=60)

    assert "BASE_REGISTRY" in script
    assert "--platform linux/amd64,linux/arm64" in script
    assert "compression=gzip,force-compression=true" in script
    assert "__BUILDFUZZ_BASE_CONTEXT_BASE64__" in script
    pull = 'docker pull --quiet "$BASE_REGISTRY/buildfuzz/busybox-multi:1"'
    if builder == "buildx-docker":
        assert pull in script
        assert "--config" not in script
    else:
        assert pull not in script
        assert '--config "$work/buildkitd.toml"' in script


# Engine tests ----------------------------------------------------------------


@pytest.fixture
def pool_on_engine(run_dir: Path) -> Iterator[tuple[BuilderPool, CaseRunner, object]]:
    """An engine 26.1 with the busybox base, a builder pool and a case runner."""
    definitions = load_definitions()
    engine = start_engine("26.1", run_dir)
    tools = client_tools(run_dir)
    docker = tools.docker(engine.host)
    pool = BuilderPool(run_dir)
    try:
        import_busybox(docker, Path(busybox_binary()), engine.directory)
        runner = CaseRunner(
            docker,
            definitions.builders,
            run_dir / "cases",
            timeout=120,
            builder_name=lambda builder: pool.builder("26.1", docker, builder),
        )
        yield pool, runner, docker
    finally:
        pool.close()
        engine.stop()


def files_containing(directory: Path, text: str) -> list[Path]:
    """Return the regular files under ``directory`` that contain ``text``.

    Files that cannot be read, such as the engine's network namespace
    mount points, are skipped.
    """
    found = []
    for path in directory.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if text.encode() in data:
            found.append(path)
    return found


def build_from(
    pool: BuilderPool, runner: CaseRunner, docker: object, case: Case
) -> tuple[bool, str]:
    definition = load_definitions().builders[case.builder]
    pool.provide_bases("26.1", docker, case, definition)  # type: ignore[arg-type]
    result = runner.run(case)
    return result.succeeded, result.log[-1500:]


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_every_format_builds_on_three_builders(
    pool_on_engine: tuple[BuilderPool, CaseRunner, object],
) -> None:
    """Each base is published once and built FROM on the docker driver and a
    docker-container builder, with a RUN step that needs its busybox.
    Multi-platform bases build for linux/arm64 too, where the RUN step runs
    the arm64 busybox under qemu (dev.sh registers the handler). busybox-multi
    also builds on the classic builder, for arm64 and then natively again, so
    the engine's tag switches platforms."""
    assert missing_emulation("linux/arm64") is None, missing_emulation("linux/arm64")
    pool, runner, docker = pool_on_engine
    builds = []
    for base in BASE_FORMATS:
        builds += [(base, "buildx-docker", ""), (base, "container-v0-34", "")]
        if base.multi_platform:
            builds.append((base, "container-v0-34", "linux/arm64"))
    for builder in ("buildx-docker", "classic"):
        builds += [(MULTI, builder, "linux/arm64"), (MULTI, builder, "")]
    failures = []

    for base, builder, platform in builds:
        case = Case(
            dockerfile=(f"FROM {base.image}", RUN_LISTING, "COPY . /ctx/"),
            builder=builder,
            platform=platform,
            output=Output.LOAD if builder == "classic" else Output.TAR,
        )
        succeeded, log = build_from(pool, runner, docker, case)
        if not succeeded:
            failures.append(f"{base.name} {platform} on {builder}: {log}")

    assert failures == []


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_repro_rebuilds_registry_base(run_dir: Path) -> None:
    """repro.sh builds the multi-platform base again, pushes it to the
    registry of BASE_REGISTRY and reproduces a failure FROM it, on the
    docker driver and on a docker-container builder."""
    from buildfuzz.buildkit_images import publish_buildkit_image

    signature = Signature(Phase.SOLVE, '"/missing-file": not found')
    scripts = {}
    for builder in ("buildx-docker", "container-v0-34"):
        case = Case(
            dockerfile=(f"FROM {MULTI.image}", "COPY missing-file /x"),
            builder=builder,
            platform="linux/arm64",
        )
        scripts[builder] = run_dir / f"repro-{builder}.sh"
        scripts[builder].write_text(render_repro(case, signature, timeout=120))
    engine = start_engine("26.1", run_dir)
    tools = client_tools(run_dir)
    registry = LoopbackRegistry(run_dir)
    runs = {}
    try:
        registry.start()
        docker = tools.docker(engine.host)
        image = publish_buildkit_image(docker, registry, "v0.34.2")
        environment = {
            "PATH": f"{tools.cli.parent}:/usr/bin:/bin",
            "DOCKER_HOST": engine.host,
            "DOCKER_CONFIG": str(tools.config_dir),
            "BUILDKIT_IMAGE": image,
            "BUILDKIT_BASE_IMAGE": image,
            "HOME": str(run_dir),
        }
        without = subprocess.run(
            ["bash", str(scripts["buildx-docker"])],
            env=environment,
            capture_output=True,
            text=True,
        )
        for builder, script in scripts.items():
            runs[builder] = subprocess.run(
                ["bash", str(script)],
                env={**environment, "BASE_REGISTRY": registry.host},
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
        catalog = registry.catalog()
        builders = [b.name for b in docker.buildx.list()]
    finally:
        registry.stop()
        engine.stop()

    assert without.returncode == 2
    assert "set BASE_REGISTRY" in without.stderr
    for builder, completed in runs.items():
        output = completed.stdout[-2000:] + completed.stderr
        assert completed.returncode == 0, f"{builder}: {output}"
        assert "buildfuzz repro: REPRODUCED" in completed.stdout, builder
    assert MULTI.repository in catalog
    assert not any(name.startswith("buildfuzz-") for name in builders)


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_auth_password_in_no_file(
    run_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    pool_on_engine: tuple[BuilderPool, CaseRunner, object],
) -> None:
    """busybox-auth builds on both drivers with the password from the
    environment, and no file of the run or of the finding holds it."""
    password = "pw-" + os.urandom(12).hex()
    monkeypatch.setenv(PASSWORD_VARIABLE, password)
    monkeypatch.setenv(USER_VARIABLE, "fuzzer")
    pool, runner, docker = pool_on_engine
    base = FORMATS_BY_NAME["busybox-auth"]
    results = tmp_path / "results"
    results.mkdir()

    outcomes = []
    for builder in ("buildx-docker", "container-v0-34"):
        case = Case(dockerfile=(f"FROM {base.image}", RUN_LISTING), builder=builder)
        outcomes.append(build_from(pool, runner, docker, case))
        (results / f"repro-{builder}.sh").write_text(
            render_repro(case, SIGNATURE, timeout=60)
        )
    assert pool._auth_registry is not None
    assert pool._auth_registry.probe() == 401
    assert pool._auth_registry.probe("fuzzer", password) == 200
    holders = files_containing(run_dir, password) + files_containing(results, password)

    assert [ok for ok, _ in outcomes] == [True, True], outcomes
    assert holders == []


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_engine_20_10_rejects_zstd_layers(run_dir: Path) -> None:
    """Docker 20.10 fails to pull a zstd base, which is why the strategies
    never draw one for builders that read its image store."""
    engine = start_engine("20.10", run_dir)
    docker = client_tools(run_dir).docker(engine.host)
    pool = BuilderPool(run_dir)
    try:
        import_busybox(docker, Path(busybox_binary()), engine.directory)
        case = Case(dockerfile=(f"FROM {OCI_ZSTD.image}",), engine="20.10")
        gzip = case.with_changes(dockerfile=(f"FROM {MULTI.image}",))
        definition = load_definitions().builders["buildx-docker"]
        pool.provide_bases("20.10", docker, gzip, definition)
        with pytest.raises(BasePullError) as raised:
            pool.provide_bases("20.10", docker, case, definition)
    finally:
        pool.close()
        engine.stop()

    assert "archive/tar: invalid tar header" in raised.value.output


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_containerd_store_loads_from_bases(run_dir: Path) -> None:
    """With the containerd image store, an image built FROM a base must find
    the base's layer blobs when it is exported, also after another base
    (with the same busybox files) was pulled first."""
    definitions = load_definitions()
    engine = SandboxEngine(
        definitions.engines["26.1"],
        tree_path(engine_tree_name("26.1")),
        run_dir,
        EngineOptions(containerd_store=True),
    )
    engine.start()
    docker = client_tools(run_dir).docker(engine.host)
    pool = BuilderPool(run_dir)
    outcomes = []
    try:
        import_busybox(docker, Path(busybox_binary()), engine.directory)
        runner = CaseRunner(docker, definitions.builders, run_dir / "c", timeout=120)
        for name in ("busybox-oci", "busybox-oci-zstd", "busybox-docker"):
            case = Case(
                dockerfile=(f"FROM {FORMATS_BY_NAME[name].image}", "COPY . /ctx/"),
                containerd_store=True,
            )
            pool.provide_bases(
                engine.label, docker, case, definitions.builders[case.builder]
            )
            result = runner.run(case)
            outcomes.append((name, result.succeeded, result.log[-800:]))
    finally:
        pool.close()
        engine.stop()

    assert [(name, ok) for name, ok, _ in outcomes] == [
        ("busybox-oci", True),
        ("busybox-oci-zstd", True),
        ("busybox-docker", True),
    ], outcomes


def test_ensure_base_parts_fetches_foreign_busybox(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import buildfuzz.base_publisher as publisher
    import buildfuzz.registry as registry
    from buildfuzz.buildkit_images import newest_release

    calls: list[str] = []
    monkeypatch.setattr(publisher, "ensure_buildkit_binaries", calls.append)
    monkeypatch.setattr(registry, "registry_binary", lambda: calls.append("registry"))
    monkeypatch.setattr(publisher, "busybox_for", calls.append)

    publisher.ensure_base_parts(["scratch", "busybox", "stage"])
    local_only = list(calls)
    publisher.ensure_base_parts(["scratch", "busybox-multi", "busybox-oci"])

    assert local_only == []
    assert calls == [newest_release(), "registry", "amd64", "arm64"]
