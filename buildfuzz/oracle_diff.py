"""The differential oracle: one case on two builders must give the same tree.

It is opt-in (``buildfuzz run --differential A:B``), because each case it
covers is built twice. A side is a builder (``container-v0-34``) or an
engine and a builder (``20.10/buildx-docker``); a case built on side A is
built again on side B, with the case's output when B supports it, else
type=tar, else a loaded image. Both trees are normalised with the model of
the case (``oracle_model``): only the paths it predicts, and no attribute
that is set at build time (such as the mtime of a directory that COPY
creates). Attributes that the model leaves open for a builder but that do
not vary between builds (the mode of a ``COPY --chmod`` destination, for
example) are compared, so the two builders must agree on them too.
Differences that a rule in ``strategies/rules/differences.toml`` explains
are dropped; any other is a finding that names both sides.
"""

from dataclasses import dataclass, replace

from buildfuzz.case import Case, Output
from buildfuzz.definitions import Definitions
from buildfuzz.errors import UsageError
from buildfuzz.oracle_known import KnownDifference, Side, unexplained
from buildfuzz.oracle_tree import (
    Difference,
    Node,
    Tree,
    compare,
    describe,
    first_difference,
    render_differences,
)
from buildfuzz.signature import Phase, Signature
from buildfuzz.verdict import Oracle, OracleReport

SECOND = 10**9


@dataclass(frozen=True)
class Target:
    builder: str
    engine: str = ""  # "" is the case's own engine

    def matches(self, case: Case) -> bool:
        return case.builder == self.builder and self.engine in ("", case.engine)

    def __str__(self) -> str:
        return f"{self.engine}/{self.builder}" if self.engine else self.builder


@dataclass(frozen=True)
class Pair:
    first: Target
    second: Target


def parse_pairs(values: list[str], definitions: Definitions) -> tuple[Pair, ...]:
    """Parse ``A:B`` pairs, each side ``builder`` or ``engine/builder``."""
    pairs = []
    for value in values:
        sides = value.split(":")
        if len(sides) != 2 or not all(sides):
            raise UsageError(
                f"invalid --differential {value!r}; give two sides as A:B, each "
                "a builder or engine/builder, such as buildx-docker:container-v0-34"
            )
        targets = []
        for side in sides:
            engine, _, builder = side.rpartition("/")
            if builder not in definitions.builders:
                known = ", ".join(sorted(definitions.builders))
                raise UsageError(
                    f"--differential {value}: unknown builder {builder!r}; "
                    f"defined builders: {known}"
                )
            if engine and engine not in definitions.engines:
                known = ", ".join(sorted(definitions.engines))
                raise UsageError(
                    f"--differential {value}: unknown engine {engine!r}; "
                    f"defined engines: {known}"
                )
            targets.append(Target(builder, engine))
        pairs.append(Pair(targets[0], targets[1]))
    return tuple(pairs)


def counterpart(
    case: Case, pairs: tuple[Pair, ...], definitions: Definitions
) -> Case | None:
    """Return the case to build on the other side of the first matching pair."""
    for pair in pairs:
        if not pair.first.matches(case):
            continue
        other = pair.second
        engine = other.engine or case.engine
        builder = definitions.builders[other.builder]
        if case.containerd_store and not definitions.engines[engine].containerd_store:
            continue
        output = case.output
        if output not in builder.outputs:
            output = Output.TAR if Output.TAR in builder.outputs else Output.LOAD
        return case.with_changes(engine=engine, builder=other.builder, output=output)
    return None


def normalised(tree: Tree, model: Tree, *, owners: bool, whole_seconds: bool) -> Tree:
    """Keep what two builds of the case must share: the model's paths and closure.

    mtimes that the model leaves open are build times; they go, and so do
    owners when a side cannot keep them (type=local). A tar keeps whole
    seconds, so with one tar side both sides are cut to seconds.
    """
    nodes = {}
    for path, node in tree.nodes.items():
        want = model.nodes.get(path)
        if model.is_opaque(path) or (want is None and not model.is_closed(path)):
            continue
        mtime = node.mtime_ns
        if want is not None and want.mtime_ns is None:
            mtime = None
        if mtime is not None and whole_seconds:
            mtime -= mtime % SECOND
        nodes[path] = replace(
            node,
            uid=node.uid if owners else None,
            gid=node.gid if owners else None,
            mtime_ns=mtime,
            origin=want.origin if want is not None else "",
        )
    return Tree(nodes=nodes, closed=set(model.closed), opaque=set(model.opaque))


def differential_report(
    model: Tree,
    first: tuple[Case, Tree],
    second: tuple[Case, Tree],
    known: tuple[KnownDifference, ...],
    notes: list[str],
) -> OracleReport | None:
    (case_a, tree_a), (case_b, tree_b) = first, second
    owners = Output.LOCAL not in (case_a.output, case_b.output)
    seconds = tree_a.whole_seconds or tree_b.whole_seconds
    side_a = normalised(tree_a, model, owners=owners, whole_seconds=seconds)
    side_b = normalised(tree_b, model, owners=owners, whole_seconds=seconds)
    # Side A plays the expected tree: each of its paths, and nothing more
    # under the modelled closed directories.
    expected = Tree(
        nodes={path: _link_free(node) for path, node in side_a.nodes.items()},
        closed=side_a.closed,
        opaque=side_a.opaque,
    )
    actual = Tree(nodes={p: _link_free(n) for p, n in side_b.nodes.items()})
    differences = compare(expected, actual)
    differences += _link_differences(side_a, side_b)
    names = [_side(case_a), _side(case_b)]
    left, used = unexplained(differences, known, "differential", names)
    if used:
        notes.append(f"differential oracle: known differences: {', '.join(used)}")
    if not left:
        return None
    message = (
        f"builders differ: {describe(first_difference(left))}"
        f" ({_label(case_a)} vs {_label(case_b)})"
    )
    header = (
        f"differential oracle: expected is {names[0]}, got is {names[1]}\n"
        "(differences that a rule in differences.toml explains are left out)\n\n"
    )
    return OracleReport(
        Oracle.DIFFERENTIAL,
        Signature(Phase.RESULT, message),
        header + render_differences(left),
    )


def _side(case: Case) -> Side:
    return Side(case.engine, case.builder, str(case.output))


def _label(case: Case) -> str:
    return f"{case.engine}/{case.builder}"


def _link_free(node: Node) -> Node:
    return replace(node, link=None)


def _link_differences(a: Tree, b: Tree) -> list[Difference]:
    """Files that share data on one side must share it on the other."""
    found = []
    common = sorted(set(a.nodes) & set(b.nodes))
    for path in common:
        node_a, node_b = a.nodes[path], b.nodes[path]
        if node_a.link is None and node_b.link is None:
            continue
        group_a = {p for p in common if node_a.link and a.nodes[p].link == node_a.link}
        group_b = {p for p in common if node_b.link and b.nodes[p].link == node_b.link}
        if group_a != group_b and (len(group_a) > 1 or len(group_b) > 1):
            found.append(
                Difference(
                    "hardlink",
                    path,
                    ", ".join(sorted(group_a)) or "no link",
                    ", ".join(sorted(group_b)) or "no link",
                    node_a.type,
                    node_a.origin,
                )
            )
    return found
