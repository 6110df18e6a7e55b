"""Tests of SBOM attestations: the case axis, rules, repro.sh and real builds.

The builds that make an SBOM need syft, which buildfuzz compiles from the
Go module proxy into its generator image. They are skipped only when the
download of syft's module fails.
"""

import json
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from buildfuzz.build import BuildResult
from buildfuzz.case import ATTESTATIONS, Case, ContextFile, Output, case_from_dict
from buildfuzz.errors import DataFileError, SetupError
from buildfuzz.install import BUSYBOX_TREE, busybox_binary
from buildfuzz.oracle_model import expected_tree
from buildfuzz.oracle_push import MANIFEST_FAMILIES, PushedImage
from buildfuzz.packages import tree_path
from buildfuzz.profile import load_profile
from buildfuzz.repro import render_repro
from buildfuzz.rules import load_rules, matching_rule, option_listing
from buildfuzz.sbom_scanner import (
    GENERATOR,
    GENERATOR_SCRIPT,
    MARKER,
    SCANNER_CHANGES,
    SCANNER_IMAGE,
    ensure_scanner_binary,
    needs_scanner,
    scanner_dir,
    scanner_rootfs_tar,
)
from buildfuzz.session import EngineUnavailable, Session
from buildfuzz.signature import Phase, Signature
from buildfuzz.strategies import BUSYBOX_IMAGE
from buildfuzz.verdict import Verdict

T = 1_700_000_000_000_000_000
SPDX_PREDICATE = "https://spdx.dev/Document"
ATTESTATION_MANIFEST = "attestation-manifest"  # vnd.docker.reference.type
# Reads the JSON of a manifest or blob descriptor.
Fetch = Callable[[dict[str, Any]], Any]


def _case(**changes: Any) -> Case:
    return Case(
        files=(ContextFile("hello.txt", size=7, mtime_ns=T, seed=1),),
        dockerfile=(f"FROM {BUSYBOX_IMAGE}", "COPY . /ctx/"),
        **changes,
    )


# The case axis --------------------------------------------------------------


@pytest.mark.parametrize(
    ("attest", "expected"),
    [
        ("", []),
        ("provenance-min", ["--provenance=mode=min"]),
        ("provenance-max", ["--provenance=mode=max"]),
        ("sbom", [f"--sbom=generator={SCANNER_IMAGE}"]),
        (
            "sbom-provenance-max",
            [f"--sbom=generator={SCANNER_IMAGE}", "--provenance=mode=max"],
        ),
    ],
)
def test_attest_option_arguments(attest: str, expected: list[str]) -> None:
    assert Case(attest=attest).option_arguments("/ctx") == expected


def test_sbom_generator_can_be_named() -> None:
    arguments = Case(attest="sbom").option_arguments("/ctx", sbom_generator="$G")

    assert arguments == ["--sbom=generator=$G"]


def test_scanner_image_is_on_the_mirrored_registry() -> None:
    # Builders mirror "localhost" to the loopback registry, and no other name
    # may be pulled.
    assert SCANNER_IMAGE.startswith("localhost/buildfuzz/")


def test_needs_scanner_only_for_sbom_values() -> None:
    sbom_values = {value for value in ATTESTATIONS if needs_scanner(value)}

    assert sbom_values == {"sbom", "sbom-provenance-max"}


@pytest.mark.parametrize("attest", ["sbom", "sbom-provenance-max"])
def test_sbom_case_round_trips(attest: str) -> None:
    case = _case(attest=attest, output=Output.OCI)

    loaded = case_from_dict(json.loads(case.to_json()))

    assert loaded == case
    assert json.loads(case.to_json())["attest"] == attest


def test_case_without_attest_keeps_its_json() -> None:
    case = _case()
    data = json.loads(case.to_json())

    assert "attest" not in data
    assert case_from_dict(data).attest == ""
    assert case_from_dict(data).id == case.id


def test_unknown_attest_value_is_rejected() -> None:
    data = _case().to_dict() | {"attest": "sbom-min"}

    with pytest.raises(DataFileError, match="attest must be one of .*'sbom'"):
        case_from_dict(data)


@pytest.mark.parametrize("name", ["nightly", "images"])
def test_profiles_draw_sbom_attestations(name: str) -> None:
    pool = load_profile(name).build.attestations

    assert "sbom" in pool
    assert "sbom-provenance-max" in pool


def test_default_profile_draws_no_sbom() -> None:
    assert not any(map(needs_scanner, load_profile("default").build.attestations))


# Model, rules and repro.sh ----------------------------------------------------


@pytest.mark.parametrize("output", [Output.TAR, Output.LOCAL])
def test_model_leaves_the_sbom_file_to_the_builder(output: Output) -> None:
    case = _case(output=output).with_changes(dockerfile=("FROM scratch", "COPY . /"))

    assert expected_tree(case.with_changes(attest="sbom")).is_opaque("/sbom.spdx.json")
    assert not expected_tree(case).is_opaque("/sbom.spdx.json")


@pytest.mark.parametrize(
    ("builder", "output", "log", "rule"),
    [
        ("classic", Output.LOAD, "unknown flag: --sbom\n", "classic-sbom-flag"),
        (
            "buildx-docker",
            Output.TAR,
            "ERROR: Attestation is not supported for the docker driver.\n",
            "docker-driver-sbom",
        ),
        (
            "buildx-docker-v0-38",
            Output.LOAD,
            '#9 ERROR: process "/bin/buildkit-sbom" did not complete successfully: '
            "network bridge not found\n",
            "docker-driver-sbom-network",
        ),
        (
            "container-v0-12",
            Output.LOAD,
            "ERROR: docker exporter does not currently support exporting "
            "manifest lists\n",
            "docker-exporter-attestations",
        ),
        (
            "container-v0-34",
            Output.DOCKER_TAR,
            "ERROR: docker exporter does not support exporting manifest lists, "
            "use the oci exporter instead\n",
            "docker-exporter-attestations",
        ),
    ],
)
def test_sbom_failures_are_explained(
    builder: str, output: Output, log: str, rule: str
) -> None:
    case = _case(builder=builder, output=output, attest="sbom")

    matched = matching_rule(load_rules("expected"), case, log)

    assert "--sbom=generator=" in option_listing(case)
    assert matched is not None
    assert matched.id == rule


def test_sbom_on_oci_output_is_not_explained() -> None:
    case = _case(builder="container-v0-34", output=Output.OCI, attest="sbom")
    log = "ERROR: docker exporter does not support exporting manifest lists\n"

    assert matching_rule(load_rules("expected"), case, log) is None


def _repro(case: Case, tmp_path: Path) -> Path:
    script = tmp_path / "repro.sh"
    script.write_text(render_repro(case, Signature(Phase.SOLVE, "boom"), timeout=60))
    return script


def test_repro_names_the_generator_variable(tmp_path: Path) -> None:
    case = Case(builder="container-v0-34", output=Output.TAR, attest="sbom")

    text = _repro(case, tmp_path).read_text()

    assert '"--sbom=generator=$SBOM_GENERATOR"' in text
    assert SCANNER_IMAGE not in text


def test_repro_without_generator_exits_2(tmp_path: Path) -> None:
    case = Case(builder="container-v0-34", output=Output.TAR, attest="sbom")
    environment = {k: v for k, v in os.environ.items() if k != "SBOM_GENERATOR"}
    # No docker: the script must stop before it runs one.
    environment["PATH"] = "/usr/bin:/bin"
    environment["DOCKER_HOST"] = "unix:///nonexistent.sock"

    completed = subprocess.run(
        ["bash", str(_repro(case, tmp_path))],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
        check=False,
    )

    assert completed.returncode == 2
    assert "set SBOM_GENERATOR" in completed.stderr


def test_repro_without_sbom_needs_no_generator(tmp_path: Path) -> None:
    case = Case(builder="container-v0-34", output=Output.TAR, attest="provenance-min")

    assert "SBOM_GENERATOR" not in _repro(case, tmp_path).read_text()


# Real builds ----------------------------------------------------------------


@pytest.fixture
def scanner() -> Path:
    """The compiled scanner; the test is skipped when its download fails."""
    try:
        return ensure_scanner_binary()
    except SetupError as error:
        if "failed to download" in str(error):
            pytest.skip(f"the SBOM scanner cannot be downloaded: {error}")
        raise


@pytest.mark.usefixtures("installed")
def test_generator_follows_the_protocol(scanner: Path, tmp_path: Path) -> None:
    # The script alone, with the host's cat and basename: a statement for the
    # main file system and one for each directory of extras, nothing else.
    source = tmp_path / "src" / "core"
    shutil.copytree(tree_path(BUSYBOX_TREE), source, symlinks=True)
    extras = tmp_path / "src" / "extras"
    (extras / "extra-stage" / "etc").mkdir(parents=True)
    (extras / "stray-file").write_text("not a file system")
    destination = tmp_path / "out"
    destination.mkdir()
    script = tmp_path / GENERATOR
    script.write_text(GENERATOR_SCRIPT)
    environment = {
        "PATH": f"{scanner.parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "BUILDKIT_SCAN_SOURCE": str(source),
        "BUILDKIT_SCAN_SOURCE_EXTRAS": str(extras),
        "BUILDKIT_SCAN_DESTINATION": str(destination),
    }

    subprocess.run(["sh", str(script)], env=environment, check=True, timeout=300)

    written = sorted(path.name for path in destination.iterdir())
    assert written == ["core.spdx.json", "extra-stage.spdx.json"]
    statement = json.loads((destination / "core.spdx.json").read_text())
    assert statement["_type"] == "https://in-toto.io/Statement/v0.1"
    assert statement["predicateType"] == SPDX_PREDICATE
    assert "busybox" in _names(statement["predicate"])


def test_generator_without_extras(scanner: Path, tmp_path: Path) -> None:
    source = tmp_path / "core"
    (source / "etc").mkdir(parents=True)
    destination = tmp_path / "out"
    destination.mkdir()
    environment = {
        "PATH": f"{scanner.parent}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "BUILDKIT_SCAN_SOURCE": str(source),
        "BUILDKIT_SCAN_DESTINATION": str(destination),
    }

    subprocess.run(
        ["sh", "-c", GENERATOR_SCRIPT], env=environment, check=True, timeout=300
    )

    assert [path.name for path in destination.iterdir()] == ["core.spdx.json"]


@pytest.mark.usefixtures("installed")
def test_generator_image_holds_syft_busybox_and_script(
    scanner: Path, tmp_path: Path
) -> None:
    tar_path = scanner_rootfs_tar(tmp_path / "rootfs.tar", Path(busybox_binary()))

    with tarfile.open(tar_path) as archive:
        members = {member.name: member for member in archive.getmembers()}
        script = archive.extractfile(f"bin/{GENERATOR}")
        assert script is not None
        assert script.read().decode() == GENERATOR_SCRIPT
    assert members["bin/syft"].size == scanner.stat().st_size
    assert members["bin/sh"].linkname == "busybox"
    assert members["tmp"].mode == 0o1777
    assert f'ENTRYPOINT ["/bin/{GENERATOR}"]' in SCANNER_CHANGES
    assert "ENV SYFT_CHECK_FOR_APP_UPDATE=false" in SCANNER_CHANGES


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize(
    ("builder", "output", "rule"),
    [
        ("classic", Output.LOAD, "classic-sbom-flag"),
        ("buildx-docker", Output.TAR, "docker-driver-sbom"),
        ("buildx-docker", Output.LOAD, "docker-driver-sbom"),
    ],
)
def test_builders_without_sboms_fail_as_expected(
    session: Session, builder: str, output: Output, rule: str
) -> None:
    record = session.execute(_case(builder=builder, output=output, attest="sbom"))

    assert record.evaluation.verdict is Verdict.EXPECTED, record.result.log
    assert record.evaluation.rule == rule


def _spdx_in_tree(directory: Path) -> dict[str, Any]:
    statement = json.loads((directory / "sbom.spdx.json").read_text())
    assert statement["predicateType"] == SPDX_PREDICATE
    document: dict[str, Any] = statement["predicate"]
    return document


def _spdx_in_index(top: dict[str, Any], fetch: Fetch) -> dict[str, Any]:
    """Return the SPDX document of the attestation manifest in index ``top``.

    ``fetch`` reads the JSON of a manifest or blob descriptor.
    """
    manifests = top["manifests"]
    while len(manifests) == 1 and "index" in manifests[0]["mediaType"]:
        manifests = fetch(manifests[0])["manifests"]
    attestations = [
        manifest
        for manifest in manifests
        if manifest.get("annotations", {}).get("vnd.docker.reference.type")
        == ATTESTATION_MANIFEST
    ]
    assert attestations, f"no attestation manifest in {manifests}"
    layers = fetch(attestations[0])["layers"]
    spdx = [
        layer
        for layer in layers
        if layer.get("annotations", {}).get("in-toto.io/predicate-type")
        == SPDX_PREDICATE
    ]
    assert spdx, f"no SPDX layer in {layers}"
    document: dict[str, Any] = fetch(spdx[0])["predicate"]
    return document


def _spdx_in_oci(path: Path) -> dict[str, Any]:
    """Return the SPDX document of an OCI layout tar."""
    with tarfile.open(path) as archive:

        def read(name: str) -> Any:
            member = archive.extractfile(name)
            assert member is not None, name
            return json.loads(member.read())

        def fetch(descriptor: dict[str, Any]) -> Any:
            return read("blobs/" + descriptor["digest"].replace(":", "/"))

        return _spdx_in_index(read("index.json"), fetch)


def _spdx_in_pushed(reference: str) -> dict[str, Any]:
    """Return the SPDX document of an image pushed to a loopback registry."""
    image = PushedImage(reference)

    def fetch(descriptor: dict[str, Any]) -> Any:
        if descriptor["mediaType"] in MANIFEST_FAMILIES:
            return image.manifest(descriptor["digest"])
        return json.loads(image.blob(descriptor["digest"]))

    return _spdx_in_index(image.manifest(image.tag), fetch)


def _names(document: dict[str, Any]) -> set[str]:
    packages = {package.get("name", "") for package in document.get("packages", [])}
    files = {entry.get("fileName", "") for entry in document.get("files", [])}
    return packages | files


@pytest.mark.engine
@pytest.mark.usefixtures("installed", "scanner")
@pytest.mark.parametrize("builder", ["container-v0-34", "container-v0-15"])
@pytest.mark.parametrize("output", [Output.LOCAL, Output.TAR, Output.OCI, Output.PUSH])
def test_container_builder_makes_real_sbom(
    session: Session, builder: str, output: Output
) -> None:
    case = _case(builder=builder, output=output, attest="sbom")
    documents: list[dict[str, Any]] = []

    def inspect(result: BuildResult, case_dir: Path) -> None:
        if not result.succeeded:
            return
        if output is Output.LOCAL:
            documents.append(_spdx_in_tree(case_dir / "rootfs"))
        elif output is Output.TAR:
            tree = case_dir / "tree"
            with tarfile.open(case_dir / "rootfs.tar") as archive:
                archive.extract("sbom.spdx.json", tree, filter="data")
            documents.append(_spdx_in_tree(tree))
        elif output is Output.OCI:
            documents.append(_spdx_in_oci(case_dir / "image-oci.tar"))
        else:
            documents.append(_spdx_in_pushed(result.pushed))

    result = session._rebuild(case, inspect)
    record = session.execute(case)

    assert result.succeeded, result.log[-2000:]
    assert documents[0]["spdxVersion"].startswith("SPDX-")
    names = _names(documents[0])
    assert any("busybox" in name for name in names), sorted(names)[:50]
    assert record.evaluation.verdict is Verdict.PASS, record.evaluation.detail


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_cases_without_scanner_are_skipped(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    if (scanner_dir() / MARKER).is_file():
        pytest.skip("the SBOM scanner is cached, so no download can fail")
    # GOPROXY=off makes the module download fail at once, as a refusal would.
    monkeypatch.setenv("GOPROXY", "off")
    case = _case(builder="container-v0-34", output=Output.TAR, attest="sbom")

    with pytest.raises(EngineUnavailable, match="GOPROXY=off"):
        session.execute(case)
    with pytest.raises(EngineUnavailable, match="GOPROXY=off"):
        session.execute(case.with_changes(output=Output.OCI))
    record = session.execute(case.with_changes(attest=""))

    assert record.evaluation.verdict is Verdict.PASS, record.evaluation.detail
