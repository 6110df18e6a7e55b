"""The sequence oracle: a step's cached build must agree with its build from scratch.

A build step of a sequence (``buildfuzz.sequences``) builds its case with
the builder's cache and again with ``--no-cache``. Both must fail, or both
must pass with the same file tree on the paths that the case's model
predicts (``oracle_model``), normalised as the differential oracle
normalises two builders' trees. mtimes are not compared: Docker documents
that the cache checksum of COPY and ADD leaves out a file's mtime, so a
cached COPY keeps the mtime of the build that filled the cache
(https://docs.docker.com/build/cache/invalidation/).
"""

from dataclasses import dataclass, replace

from buildfuzz.build import BuildResult
from buildfuzz.case import Case, Output
from buildfuzz.oracle_diff import normalised
from buildfuzz.oracle_tree import (
    Difference,
    Tree,
    compare,
    describe,
    first_difference,
    render_differences,
)
from buildfuzz.signature import Phase, Signature

DIFFERENCE_PATHS = 20  # differing paths that repro.sh compares


@dataclass
class BuildOutcome:
    """One build of a sequence step: its result, tree and failure signature."""

    case: Case
    result: BuildResult
    tree: Tree | None = None
    signature: Signature | None = None  # of a failed build


@dataclass
class Mismatch:
    """A disagreement between a step's cached build and its build from scratch."""

    signature: Signature
    detail: str
    # "tree", "cached-fails" or "scratch-fails"; repro.sh checks accordingly.
    kind: str
    build_signature: Signature | None = None  # of the build that failed alone
    paths: tuple[str, ...] = ()  # differing paths, for a tree mismatch


def compare_outcomes(
    cached: BuildOutcome, scratch: BuildOutcome, expected: Tree | None
) -> Mismatch | None:
    """Compare a step's cached build with its build from scratch.

    Hangs are left to the plain fuzzer, which judges every case's build
    time, and so are failures of both builds.
    """
    if cached.result.timed_out or scratch.result.timed_out:
        return None
    if not cached.result.succeeded and not scratch.result.succeeded:
        return None
    for alone, kind, text in (
        (cached, "cached-fails", "only the cached build fails"),
        (scratch, "scratch-fails", "only the build from scratch fails"),
    ):
        if not alone.result.succeeded:
            failed = alone.signature or Signature(Phase.SOLVE, "unknown error")
            return Mismatch(
                Signature(failed.phase, f"{text}: {failed.message}"),
                f"{text}; its log ends with:\n\n"
                + "\n".join(alone.result.log.splitlines()[-40:])
                + "\n",
                kind,
                build_signature=failed,
            )
    if expected is None or cached.tree is None or scratch.tree is None:
        return None
    owners = cached.case.output is not Output.LOCAL
    differences = tree_differences(expected, cached.tree, scratch.tree, owners=owners)
    if not differences:
        return None
    header = (
        "sequence oracle: expected is the build from scratch (--no-cache), got is\n"
        "the build with the cache; mtimes are not compared\n\n"
    )
    paths = tuple(dict.fromkeys(d.path for d in differences))[:DIFFERENCE_PATHS]
    return Mismatch(
        Signature(
            Phase.RESULT,
            "cached build differs from a build from scratch: "
            + describe(first_difference(differences)),
        ),
        header + render_differences(differences),
        "tree",
        paths=paths,
    )


def tree_differences(
    expected: Tree, cached: Tree, scratch: Tree, *, owners: bool
) -> list[Difference]:
    """List how the cached tree differs from the scratch one, on modelled paths."""
    reference = _without_mtimes(
        normalised(scratch, expected, owners=owners, whole_seconds=False)
    )
    actual = _without_mtimes(
        normalised(cached, expected, owners=owners, whole_seconds=False)
    )
    return compare(reference, Tree(nodes=actual.nodes))


def _without_mtimes(tree: Tree) -> Tree:
    nodes = {path: replace(node, mtime_ns=None) for path, node in tree.nodes.items()}
    return Tree(nodes=nodes, closed=tree.closed, opaque=tree.opaque)
