"""Pushed outputs (type=image,push=true): case fields, profile keys, the
manifest check, repro.sh, and real pushes to a loopback registry."""

import gzip
import io
import json
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildfuzz.baseimage import import_busybox
from buildfuzz.build import BuildResult, CaseRunner, buildx_arguments, image_names
from buildfuzz.buildx_builders import BuilderPool
from buildfuzz.case import Case, Output, case_from_dict, load_case
from buildfuzz.definitions import load_definitions
from buildfuzz.errors import DataFileError
from buildfuzz.install import busybox_binary
from buildfuzz.minimize import simplifications
from buildfuzz.oracle_push import (
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    STARGZ_ANNOTATION,
    blob_compression,
    pushed_image_report,
)
from buildfuzz.oracle_suite import OracleSettings, OracleSuite
from buildfuzz.profile import load_profile
from buildfuzz.repro import build_command, render_repro
from buildfuzz.rules import load_rules
from buildfuzz.signature import Phase, Signature
from buildfuzz.strategies import Target, cases
from buildfuzz.verdict import Evaluation, Verdict, judge
from tests.conftest import buildfuzz, client_tools, start_engine

OCI_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
ZSTD_HEAD = b"\x28\xb5\x2f\xfd" + bytes(100)


def _tar_head() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.addfile(tarfile.TarInfo("a"), io.BytesIO())
    return buffer.getvalue()[:512]


def _registry(
    top: dict[str, Any], images: dict[str, dict[str, Any]], blobs: dict[str, bytes]
) -> tuple[Any, Any]:
    def manifest(reference: str) -> dict[str, Any]:
        return top if reference == "tag" else images[reference]

    return manifest, blobs.__getitem__


def _image(media_type: str, *layers: tuple[str, str]) -> dict[str, Any]:
    return {
        "mediaType": media_type,
        "config": {"mediaType": "x", "digest": "sha256:c"},
        "layers": [{"mediaType": kind, "digest": digest} for kind, digest in layers],
    }


def test_case_round_trips_push_options() -> None:
    case = Case(
        output=Output.PUSH,
        compression="zstd",
        force_compression=True,
        oci_mediatypes="false",
    )

    assert case_from_dict(json.loads(case.to_json())) == case
    assert "compression" not in Case().to_dict()


def test_case_rejects_unknown_compression(tmp_path: Path) -> None:
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"schema": 1, "compression": "lz4"}))

    with pytest.raises(DataFileError, match="compression must be one of .*'lz4'"):
        load_case(path)


def test_output_flag_carries_options() -> None:
    case = Case(
        output=Output.PUSH,
        compression="estargz",
        force_compression=True,
        oci_mediatypes="true",
    )

    arguments = buildx_arguments(case, None, Path("/c"), "localhost:1/r:t")

    output = arguments[arguments.index("--output") + 1]
    assert output == (
        "type=image,name=localhost:1/r:t,push=true,compression=estargz,"
        "force-compression=true,oci-mediatypes=true"
    )


def test_runner_without_registry_names_the_fix(tmp_path: Path) -> None:
    from buildfuzz.errors import EngineError

    runner = CaseRunner(object(), {}, tmp_path, timeout=1)  # type: ignore[arg-type]

    with pytest.raises(EngineError, match="give CaseRunner a push_registry"):
        runner._push_reference(Case(output=Output.PUSH))


@pytest.mark.parametrize(
    ("builder", "output", "expected"),
    [
        ("classic", Output.LOAD, ["buildfuzz-case:latest", "extra:1"]),
        ("buildx-docker", Output.LOAD, ["buildfuzz-case:latest", "extra:1"]),
        ("container-v0-34", Output.DOCKER_TAR, ["buildfuzz-case:loaded", "extra:1"]),
        ("container-v0-34", Output.TAR, ["extra:1"]),
        ("buildx-docker", Output.PUSH, ["extra:1", "localhost:5000/x:1"]),
    ],
)
def test_runner_removes_the_images_a_build_makes(
    builder: str, output: Output, expected: list[str]
) -> None:
    case = Case(builder=builder, output=output, tags=("extra:1",))
    pushed = "localhost:5000/x:1" if output is Output.PUSH else ""
    definition = load_definitions().builders[builder]

    assert image_names(case, definition, pushed) == expected


def test_profile_reads_push_pools(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[build]\noutputs = ["push"]\ncompressions = ["", "zstd"]\n'
        'force_compression = [false, true]\noci_mediatypes = ["", true, false]\n'
    )

    build = load_profile(str(path)).build

    assert build.outputs == (Output.PUSH,)
    assert build.compressions == ("", "zstd")
    assert build.force_compression == (False, True)
    assert build.oci_mediatypes == ("", "true", "false")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('compressions = ["lz4"]', "build.compressions: unknown value 'lz4'"),
        ('oci_mediatypes = ["yes"]', "build.oci_mediatypes: unknown value 'yes'"),
        ("force_compression = [1]", "build.force_compression must be a list of true"),
    ],
)
def test_profile_rejects_bad_push_options(
    tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[build]\n{line}\n")

    completed = buildfuzz("strategies", "--profile", str(path), cwd=tmp_path)

    assert completed.returncode == 2
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_push_options_only_with_push(data: st.DataObject) -> None:
    profile = load_profile("nightly")
    target = Target("26.1", "container-v0-34", outputs=(Output.TAR, Output.PUSH))

    case = data.draw(cases(profile, (target,)))

    if case.output is not Output.PUSH:
        assert (case.compression, case.force_compression) == ("", False)
        assert case.oci_mediatypes == ""


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_no_push_without_registry(data: st.DataObject) -> None:
    target = Target(
        "26.1", "container-v0-34", outputs=(Output.TAR, Output.PUSH), registry=False
    )

    case = data.draw(cases(load_profile("nightly"), (target,)))

    assert case.output is not Output.PUSH


def test_nightly_pools_push() -> None:
    build = load_profile("nightly").build

    assert Output.PUSH in build.outputs
    assert set(build.compressions) == {"", "gzip", "zstd", "estargz", "uncompressed"}
    assert build.force_compression == (False, True)


def test_minimizer_resets_push_options() -> None:
    case = Case(output=Output.PUSH, compression="zstd", force_compression=True)
    targets = (Target("26.1", "buildx-docker"),)

    steps = dict(simplifications(case, Case(), load_profile("default"), targets))

    assert steps["reset compression"].compression == ""
    assert steps["reset force_compression"].force_compression is False


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"\x1f\x8b\x08", "gzip"),
        (ZSTD_HEAD, "zstd"),
        (bytes(512), "uncompressed"),
        (b"plain text", "unknown"),
    ],
)
def test_blob_compression(data: bytes, expected: str) -> None:
    assert blob_compression(data) == expected


def test_tar_head_is_uncompressed() -> None:
    assert blob_compression(_tar_head()) == "uncompressed"
    assert blob_compression(gzip.compress(_tar_head())) == "gzip"


def test_matching_index_passes() -> None:
    index = {
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": "sha256:i"},
            {
                "mediaType": OCI_MANIFEST,
                "digest": "sha256:att",
                "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
            },
        ],
    }
    images = {"sha256:i": _image(OCI_MANIFEST, (OCI_ZSTD, "sha256:l"))}
    manifest, head = _registry(index, images, {"sha256:l": ZSTD_HEAD})
    case = Case(
        output=Output.PUSH,
        compression="zstd",
        force_compression=True,
        oci_mediatypes="true",
    )

    assert pushed_image_report(case, "tag", manifest, head) is None


def test_ignored_options_are_reported() -> None:
    top = _image(DOCKER_MANIFEST, (DOCKER_GZIP, "sha256:l"))
    manifest, head = _registry(top, {}, {"sha256:l": b"\x1f\x8b\x08"})
    case = Case(
        output=Output.PUSH,
        compression="zstd",
        force_compression=True,
        oci_mediatypes="true",
    )

    report = pushed_image_report(case, "tag", manifest, head)

    assert report is not None
    assert report.signature == Signature(
        Phase.RESULT, "pushed image: Docker media types, expected OCI"
    )
    assert "layer 0 (sha256:l) is gzip" in report.detail
    assert "but the case forces zstd" in report.detail


def test_media_type_that_lies_is_reported() -> None:
    top = _image(OCI_MANIFEST, (OCI_GZIP, "sha256:l"))
    manifest, head = _registry(top, {}, {"sha256:l": ZSTD_HEAD})

    report = pushed_image_report(Case(output=Output.PUSH), "tag", manifest, head)

    assert report is not None
    assert report.signature.message == (
        "pushed image: layer media type names gzip, but its blob is zstd"
    )


def test_unforced_compression_is_not_compared() -> None:
    top = _image(OCI_MANIFEST, (OCI_GZIP, "sha256:l"))
    manifest, head = _registry(top, {}, {"sha256:l": b"\x1f\x8b\x08"})
    case = Case(output=Output.PUSH, compression="zstd")

    assert pushed_image_report(case, "tag", manifest, head) is None


def test_forced_estargz_needs_the_toc_annotation() -> None:
    top = _image(OCI_MANIFEST, (OCI_GZIP, "sha256:l"))
    with_toc = json.loads(json.dumps(top))
    with_toc["layers"][0]["annotations"] = {STARGZ_ANNOTATION: "sha256:t"}
    case = Case(output=Output.PUSH, compression="estargz", force_compression=True)
    blobs = {"sha256:l": b"\x1f\x8b\x08"}

    plain = pushed_image_report(case, "tag", *_registry(top, {}, blobs))
    stargz = pushed_image_report(case, "tag", *_registry(with_toc, {}, blobs))

    assert plain is not None
    assert plain.signature.message == (
        "pushed image: layer compression gzip, expected estargz"
    )
    assert stargz is None


def test_repro_command_pushes(tmp_path: Path) -> None:
    case = Case(output=Output.PUSH, compression="zstd", force_compression=True)

    script = render_repro(case, Signature(Phase.SOLVE, "x"), timeout=60)
    words = build_command(case, classic=False)

    assert "set BASE_REGISTRY" in script
    output = words[words.index("--output") + 1]
    assert output.startswith("type=image,name=$BASE_REGISTRY/buildfuzz-case/pushed")
    assert output.endswith(",push=true,compression=zstd,force-compression=true")
    path = tmp_path / "repro.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0


# --- on real engines -----------------------------------------------------------


@pytest.fixture
def pushing(run_dir: Path) -> Iterator[tuple[CaseRunner, OracleSuite]]:
    """An engine 26.1, a builder pool with its registry, and a runner that pushes."""
    definitions = load_definitions()
    engine = start_engine("26.1", run_dir)
    docker = client_tools(run_dir).docker(engine.host)
    pool = BuilderPool(run_dir)
    try:
        import_busybox(docker, Path(busybox_binary()), engine.directory)
        registry = pool._ensure_registry(docker)
        runner = CaseRunner(
            docker,
            definitions.builders,
            run_dir / "cases",
            timeout=120,
            builder_name=lambda builder: pool.builder("26.1", docker, builder),
            push_registry=lambda: registry.host,
        )
        yield runner, OracleSuite(definitions, OracleSettings(tree=True))
    finally:
        pool.close()
        engine.stop()


def _judge(
    runner: CaseRunner, suite: OracleSuite, case: Case
) -> tuple[BuildResult, Evaluation]:
    checks = suite.start(case, None, runner.docker)
    result = runner.run(case, checks.inspect)
    classic = case.builder == "classic"
    evaluation = judge(
        case,
        result,
        classic=classic,
        rules=load_rules("expected"),
        reports=checks.finish(result),
    )
    return result, evaluation


def _push_case(builder: str, compression: str, force: bool, oci: str) -> Case:
    return Case(
        dockerfile=("FROM scratch", "COPY . /ctx/"),
        builder=builder,
        output=Output.PUSH,
        compression=compression,
        force_compression=force,
        oci_mediatypes=oci,
    )


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_container_builder_pushes_what_it_is_asked(
    pushing: tuple[CaseRunner, OracleSuite],
) -> None:
    runner, suite = pushing
    outcomes = {}
    for compression in ("gzip", "zstd", "estargz", "uncompressed"):
        case = _push_case("container-v0-34", compression, True, "true")
        outcomes[compression] = _judge(runner, suite, case)
    unforced = _judge(runner, suite, _push_case("container-v0-34", "zstd", False, ""))

    for compression, (result, evaluation) in outcomes.items():
        assert result.succeeded, f"{compression}: {result.log[-1500:]}"
        assert evaluation.verdict is Verdict.PASS, f"{compression}: {evaluation}"
        assert result.pushed.startswith("localhost:")
    assert unforced[1].verdict is Verdict.PASS, unforced[1]


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_docker_driver_push_leaves_no_image(
    pushing: tuple[CaseRunner, OracleSuite],
) -> None:
    # The docker driver pushes from the engine's image store, where the
    # pushed image stays unless the runner removes it.
    runner, suite = pushing

    result, evaluation = _judge(
        runner, suite, _push_case("buildx-docker", "", False, "")
    )

    assert result.succeeded, result.log[-1500:]
    assert evaluation.verdict is Verdict.PASS, evaluation
    repository = result.pushed.rpartition(":")[0]
    tags = [tag for image in runner.docker.image.list() for tag in image.repo_tags]
    assert not [tag for tag in tags if tag.startswith(repository)], tags


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    ("builder", "compression", "oci", "rule"),
    [
        ("container-v0-34", "zstd", "false", "push-attestations-docker-mediatypes"),
        ("container-v0-34", "estargz", "false", "push-estargz-docker-mediatypes"),
        ("buildx-docker", "zstd", "true", "docker-driver-push-options"),
    ],
)
def test_rejected_or_ignored_options_are_expected(
    pushing: tuple[CaseRunner, OracleSuite],
    builder: str,
    compression: str,
    oci: str,
    rule: str,
) -> None:
    runner, suite = pushing

    result, evaluation = _judge(
        runner, suite, _push_case(builder, compression, True, oci)
    )

    assert evaluation.verdict is Verdict.EXPECTED, (evaluation, result.log[-1000:])
    assert evaluation.rule == rule


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_repro_pushes_to_base_registry(run_dir: Path) -> None:
    """Without BASE_REGISTRY repro.sh says what to set; with it, the image is
    pushed there, and the failing case reproduces."""
    from buildfuzz.registry import LoopbackRegistry

    passing = _push_case("buildx-docker", "zstd", True, "")
    failing = passing.with_changes(dockerfile=("FROM scratch", "COPY missing-file /x"))
    signature = Signature(Phase.SOLVE, '"/missing-file": not found')
    scripts = {}
    for name, case in (("passing", passing), ("failing", failing)):
        scripts[name] = run_dir / f"{name}.sh"
        scripts[name].write_text(render_repro(case, signature, timeout=120))
    engine = start_engine("26.1", run_dir)
    tools = client_tools(run_dir)
    registry = LoopbackRegistry(run_dir)
    environment = {
        "PATH": f"{tools.cli.parent}:/usr/bin:/bin",
        "DOCKER_HOST": engine.host,
        "DOCKER_CONFIG": str(tools.config_dir),
        "HOME": str(run_dir),
    }
    runs = {}
    try:
        registry.start()
        runs["unset"] = subprocess.run(
            ["bash", str(scripts["passing"])], env=environment,
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        environment["BASE_REGISTRY"] = registry.host
        for name, script in scripts.items():
            runs[name] = subprocess.run(
                ["bash", str(script)], env=environment,
                capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
        catalog = registry.catalog()
    finally:
        registry.stop()
        engine.stop()

    assert runs["unset"].returncode == 2
    assert "set BASE_REGISTRY" in runs["unset"].stderr
    assert runs["passing"].returncode == 1, runs["passing"].stdout[-2000:]
    assert "buildfuzz-case/pushed" in catalog
    assert runs["failing"].returncode == 0, runs["failing"].stdout[-2000:]
    assert "buildfuzz repro: REPRODUCED" in runs["failing"].stdout


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_secret_in_pushed_layer_is_found(
    pushing: tuple[CaseRunner, OracleSuite],
) -> None:
    from buildfuzz import secrets
    from buildfuzz.strategies import BUSYBOX_IMAGE
    from buildfuzz.verdict import Oracle

    runner, suite = pushing
    leaking = _push_case("container-v0-34", "gzip", True, "true").with_changes(
        dockerfile=(
            f"FROM {BUSYBOX_IMAGE}",
            "RUN --mount=type=secret,id=token cp /run/secrets/token /k",
        ),
        build_secrets=(("token", "env"),),
    )

    result, evaluation = _judge(runner, suite, leaking)
    _, clean = _judge(
        runner,
        suite,
        leaking.with_changes(
            dockerfile=(
                f"FROM {BUSYBOX_IMAGE}",
                "RUN --mount=type=secret,id=token true",
            )
        ),
    )

    assert result.succeeded, result.log[-1500:]
    assert evaluation.oracle is Oracle.SECRET
    assert evaluation.signature == Signature(
        Phase.RESULT, "build secret value in image layer"
    )
    assert secrets.build_secret_value("token") not in evaluation.detail
    assert clean.verdict is Verdict.PASS, clean
