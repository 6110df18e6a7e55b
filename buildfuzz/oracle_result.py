"""Read what a build produced and judge its file tree against the model."""

import tarfile
from pathlib import Path

import structlog
from python_on_whales import DockerClient, DockerException

from buildfuzz.build import tag_for
from buildfuzz.case import Case, Output
from buildfuzz.oracle_known import KnownDifference, Side, unexplained
from buildfuzz.oracle_model import ModelOptions, Unmodelled, expected_tree
from buildfuzz.oracle_tree import (
    Tree,
    compare,
    read_directory,
    read_image,
    read_oci_layout,
    read_saved_image,
    read_tar,
    render_differences,
    tree_signature,
)
from buildfuzz.verdict import Oracle, OracleReport

log = structlog.get_logger(__name__)

READ_ERRORS = (
    DockerException,
    OSError,
    EOFError,
    KeyError,
    ValueError,
    tarfile.TarError,
)


def read_result(case: Case, case_dir: Path, docker: DockerClient) -> Tree | None:
    """Return the built root filesystem, or None when it cannot be read.

    A loaded image is read from ``docker image save``, a type=docker tar
    directly; an unreadable output is never a finding of its own (the
    build's verdict covers exporting).
    """
    try:
        if case.output is Output.TAR:
            return read_tar(case_dir / "rootfs.tar")
        if case.output is Output.LOCAL:
            return read_directory(case_dir / "rootfs")
        if case.output is Output.DOCKER_TAR:
            return read_saved_image(case_dir / "image.tar")
        if case.output is Output.OCI:
            return read_oci_layout(case_dir / "image-oci.tar")
        return read_image(docker, tag_for(case), case_dir)
    except READ_ERRORS as error:
        log.warning("cannot read the built tree", case_id=case.id, error=str(error))
        return None


def model(case: Case, notes: list[str], *, classic: bool) -> Tree | None:
    """Return the tree the case implies, or None (noted) when it is not modelled."""
    options = ModelOptions(owners=case.output is not Output.LOCAL, classic=classic)
    try:
        return expected_tree(case, options)
    except Unmodelled as error:
        notes.append(f"tree oracle: not modelled: {error}")
        return None


def side_of(case: Case) -> Side:
    return Side(case.engine, case.builder, str(case.output))


def tree_report(
    case: Case,
    expected: Tree,
    actual: Tree,
    known: tuple[KnownDifference, ...],
    notes: list[str],
) -> OracleReport | None:
    """Compare a built tree with the model; report differences no rule explains."""
    differences = compare(expected, actual)
    left, used = unexplained(differences, known, "tree", [side_of(case)])
    if used:
        notes.append(f"tree oracle: known differences: {', '.join(used)}")
    if not left:
        return None
    header = (
        f"tree oracle: {side_of(case)} against the tree the case implies\n"
        f"(differences that a rule in differences.toml explains are left out)\n\n"
    )
    return OracleReport(
        Oracle.TREE, tree_signature(left), header + render_differences(left)
    )
