"""Oracles: the tree, differential, secret and engine-health checks.

Fast tests use hand-made trees and patterns; tests marked ``engine`` build
purpose-made cases on real sandbox engines and check that each oracle
reports what it must and stays quiet on correct builds.
"""

import os
import random
import subprocess
import tarfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from python_on_whales import DockerClient

from buildfuzz import build, oracle_suite
from buildfuzz.build import BuildResult, CaseRunner
from buildfuzz.case import Case, ContextFile, FileKind, Output
from buildfuzz.definitions import load_definitions
from buildfuzz.oracle_diff import Pair, Target, differential_report, parse_pairs
from buildfuzz.oracle_health import EngineHealth
from buildfuzz.oracle_ignore import IgnoreMatcher, read_ignore_file
from buildfuzz.oracle_known import Side, load_known_differences, unexplained
from buildfuzz.oracle_model import ModelOptions, Unmodelled, expected_tree
from buildfuzz.oracle_secret import Leak, _scan_directory, _scan_tar_file, secret_report
from buildfuzz.oracle_suite import OracleSettings, OracleSuite
from buildfuzz.oracle_tree import (
    Node,
    NodeType,
    Tree,
    compare,
    read_directory,
    read_saved_image,
    read_tar,
    tree_signature,
)
from buildfuzz.profile import load_profile
from buildfuzz.rules import load_rules
from buildfuzz.session import CaseRecord, Session
from buildfuzz.signature import Phase, Signature
from buildfuzz.strategies import BUSYBOX_IMAGE, cases
from buildfuzz.strategies import Target as CaseTarget
from buildfuzz.verdict import Evaluation, Oracle, OracleReport, Verdict, judge
from tests.conftest import client_tools

SECOND = 10**9
T = 1_700_000_000 * SECOND

# --- .dockerignore patterns -------------------------------------------------

# (patterns, path, excluded), checked against moby/patternmatcher's rules.
IGNORE_TABLE = [
    (["*"], "a", True),
    (["*"], "dir/a", True),  # its parent matches
    (["*", "!a"], "a", False),
    (["*", "!a"], "a/x", False),  # the exception matches the parent
    (["*", "!a"], "b/a", True),
    (["!a", "*"], "a", True),  # later patterns win
    (["*.txt"], "b.txt", True),
    (["*.txt"], "dir/b.txt", False),  # * does not cross /
    (["**/*.txt"], "dir/sub/b.txt", True),
    (["**/*.txt"], "b.txt", True),  # ** matches no directory too
    (["*.txt", "!b.txt"], "b.txt", False),
    (["*.txt", "!b.txt"], "c.txt", True),
    (["**/a"], "a", True),
    (["**/a"], "x/y/a", True),
    (["**/a"], "xa", False),
    (["**/a"], "x/a/inner", True),
    (["dir/"], "dir", True),  # a trailing slash is cleaned away
    (["dir/"], "dir/file", True),
    (["dir/"], "dirt", False),
    (["/dir"], "dir/x", True),  # a leading slash is removed
    (["./dir"], "dir", True),
    (["dir/**"], "dir/x/y", True),
    (["dir/**"], "dir", False),
    (["bulk/**/d1/"], "bulk/d1/f", True),
    (["bulk/**/d1/"], "bulk/d0/d1", True),
    (["bulk/**/d1/"], "bulk/d0/d2", False),
    (["sub dir"], "sub dir/x", True),
    (["#comment"], "#comment", False),  # a comment line, not a pattern
    (["a?c"], "abc", True),
    (["a?c"], "a/c", False),
    (["[glob]"], "g", True),  # a character class
    (["[glob]"], "[glob]", False),
    (["\\[glob\\]"], "[glob]", True),
    (["x\\*y\\?"], "x*y?", True),
    (["b.txt"], "bxtxt", False),  # . is literal
    (["a/../b"], "b", True),
    (["  spaced  "], "spaced", True),  # lines are trimmed
    (["!"], "a", False),
]


@pytest.mark.parametrize(("patterns", "path", "excluded"), IGNORE_TABLE)
def test_ignore_patterns(patterns: list[str], path: str, excluded: bool) -> None:
    lines = [p for p in patterns if p != "!"]
    matcher = IgnoreMatcher(read_ignore_file(lines))
    assert matcher.excluded(path) is excluded


def test_ignore_file_cleaning() -> None:
    assert read_ignore_file(["\ufeff*.txt", "# c", "", " !./a/ ", "/x//y"]) == [
        "*.txt",
        "!a",
        "x/y",
    ]


def test_excluded_ancestor_marks_uncertain_paths() -> None:
    matcher = IgnoreMatcher(["dir", "!dir/keep"])

    assert not matcher.excluded("dir/keep")
    assert matcher.excluded_ancestor("dir/keep")
    assert not matcher.excluded_ancestor("other/keep")


# --- tree comparison ---------------------------------------------------------


def _file(mode: int = 0o644, mtime: int | None = T, **changes: object) -> Node:
    values: dict[str, object] = {
        "mode": mode,
        "uid": 0,
        "gid": 0,
        "size": 3,
        "digest": "d" * 64,
        "mtime_ns": mtime,
        "origin": "copy-all",
    }
    values.update(changes)
    return Node(NodeType.FILE, **values)  # type: ignore[arg-type]


def _dir(mode: int | None = 0o755) -> Node:
    return Node(NodeType.DIR, mode=mode, uid=0, gid=0, origin="copy-all")


def _expected() -> Tree:
    return Tree(
        nodes={"/ctx": _dir(), "/ctx/a": _file(), "/ctx/b": _file(0o4755)},
        closed={"/"},
        opaque={"/listing.txt"},
    )


def test_identical_trees_have_no_differences() -> None:
    actual = Tree(nodes=dict(_expected().nodes))
    actual.nodes["/listing.txt"] = _file()  # opaque: never compared

    assert compare(_expected(), actual) == []


def test_each_kind_of_difference_is_found() -> None:
    actual = Tree(
        nodes={
            "/ctx": _dir(0o700),
            "/ctx/a": _file(mtime=T + 5, uid=1000, digest="e" * 64),
            "/extra": _file(),
        }
    )

    kinds = {(d.kind, d.path) for d in compare(_expected(), actual)}

    assert kinds == {
        ("missing", "/ctx/b"),
        ("extra", "/extra"),
        ("content", "/ctx/a"),
        ("owner", "/ctx/a"),
        ("mtime", "/ctx/a"),
        ("mode", "/ctx"),
    }


def test_signature_names_the_kind_not_the_path() -> None:
    one = Tree(nodes={**_expected().nodes, "/ctx/b": _file(0o755)})
    other = Tree(nodes={**_expected().nodes, "/ctx/b": _file(0o755, size=3)})

    first = tree_signature(compare(_expected(), one))
    second = tree_signature(compare(_expected(), other))

    assert first == second
    assert first == Signature(
        Phase.RESULT, "tree differs: mode of a file from COPY: special bits lost"
    )


def test_whole_second_tar_times_match_cut_or_rounded() -> None:
    expected = Tree(nodes={"/a": _file(mtime=T + 123_456_789)})
    cut = Tree(nodes={"/a": _file(mtime=T)}, whole_seconds=True)
    exact = Tree(nodes={"/a": _file(mtime=T)}, whole_seconds=False)

    assert compare(expected, cut) == []
    assert [d.kind for d in compare(expected, exact)] == ["mtime"]


def test_hardlink_groups_must_match() -> None:
    expected = Tree(
        nodes={"/a": _file(link="1:a"), "/b": _file(link="1:a"), "/c": _file(link="c")}
    )
    linked = Tree(nodes={"/a": _file(link="/a"), "/b": _file(link="/a"), "/c": _file()})
    unlinked = Tree(nodes={"/a": _file(), "/b": _file(), "/c": _file()})

    assert compare(expected, linked) == []
    assert {d.kind for d in compare(expected, unlinked)} == {"hardlink"}


def test_tar_and_directory_readers_agree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_bytes(b"abc")
    os.link(root / "d" / "f", root / "d" / "h")
    os.symlink("f", root / "d" / "s")
    os.chmod(root / "d" / "f", 0o4750)
    os.utime(root / "d" / "f", ns=(T, T))
    with tarfile.open(tmp_path / "t.tar", "w", format=tarfile.PAX_FORMAT) as tar:
        tar.add(root / "d", arcname="d")

    from_dir = read_directory(root)
    from_tar = read_tar(tmp_path / "t.tar")

    for path in ("/d", "/d/f", "/d/h", "/d/s"):
        a, b = from_dir.nodes[path], from_tar.nodes[path]
        assert (a.type, a.size, a.digest, a.target) == (
            b.type,
            b.size,
            b.digest,
            b.target,
        )
    assert from_tar.nodes["/d/f"].mode == 0o4750
    assert from_tar.nodes["/d/f"].mtime_ns == T
    assert from_tar.nodes["/d/h"].link == from_tar.nodes["/d/f"].link == "/d/f"
    assert from_dir.nodes["/d/h"].link == from_dir.nodes["/d/f"].link


# --- the model -----------------------------------------------------------------


def _model_case(**changes: object) -> Case:
    case = Case(
        files=(
            ContextFile("a", size=513, mode=0o4755, uid=1000, mtime_ns=T, seed=1),
            ContextFile("d", FileKind.DIR, mode=0o700, mtime_ns=0),
            ContextFile("d/f", size=7, mode=0o600, mtime_ns=T, seed=2),
            ContextFile("d/h", FileKind.HARDLINK, size=7, mode=0o600, target="d/f"),
            ContextFile("d/s", FileKind.SYMLINK, target="../a", mtime_ns=T),
            ContextFile("b.txt", size=1, mtime_ns=T),
        ),
        dockerignore=("*.txt",),
        dockerfile=(
            "FROM scratch",
            "COPY . /ctx/",
            "COPY --chown=1000:1000 d /owned/",
            "COPY --chmod=0750 a /modes/",
            "WORKDIR /work/dir",
        ),
        output=Output.TAR,
    )
    return case.with_changes(**changes)


def test_model_of_copies_chown_chmod_workdir_and_ignore() -> None:
    tree = expected_tree(_model_case())
    nodes = tree.nodes

    assert "/ctx/b.txt" not in nodes  # excluded by .dockerignore
    assert nodes["/ctx/a"].mode == 0o4755 and nodes["/ctx/a"].uid == 0
    assert nodes["/ctx/a"].mtime_ns == T
    assert nodes["/ctx/d"].mode == 0o700 and nodes["/ctx/d"].mtime_ns == 0
    assert nodes["/ctx/d/s"].target == "../a"
    assert nodes["/ctx/d/f"].link == nodes["/ctx/d/h"].link
    assert nodes["/ctx/.dockerignore"].size == len("*.txt\n")
    assert "/ctx/Dockerfile" in nodes and nodes["/ctx/Dockerfile"].mtime_ns is None
    assert nodes["/owned/f"].uid == 1000 and nodes["/owned"].uid == 1000
    assert nodes["/owned"].mtime_ns is None  # set at build time
    assert nodes["/modes/a"].mode == 0o750
    assert nodes["/modes"].mode is None  # differs between BuildKit releases
    assert nodes["/work/dir"].type is NodeType.DIR
    assert tree.closed >= {"/"}


def test_model_reads_the_ignore_file_each_builder_reads() -> None:
    case = _model_case(
        dockerignore=("a",),
        dockerfile_dockerignore=("b.txt",),
        dockerfile=("FROM scratch", "COPY . /ctx/"),
    )

    buildkit = expected_tree(case).nodes
    classic = expected_tree(case, ModelOptions(classic=True)).nodes

    assert "/ctx/a" in buildkit
    assert "/ctx/b.txt" not in buildkit
    assert "/ctx/a" not in classic
    assert "/ctx/b.txt" in classic
    assert "/ctx/Dockerfile.dockerignore" in buildkit


def test_model_leaves_out_the_classic_excluded_dockerfile_directory() -> None:
    case = Case(
        dockerignore=("*",),
        dockerfile=("FROM scratch", "ADD . /extracted/"),
        dockerfile_name="docker/Dockerfile",
    )

    classic = expected_tree(case, ModelOptions(classic=True))
    buildkit = expected_tree(case)

    assert "/extracted/docker" in classic.opaque
    assert "/extracted/docker" not in buildkit.opaque
    assert "/extracted/docker" not in buildkit.nodes


def test_model_leaves_the_attestation_file_to_the_builder() -> None:
    case = _model_case(output=Output.TAR)

    attested = expected_tree(case.with_changes(attest="provenance-min"))

    assert attested.is_opaque("/provenance.json")
    assert not expected_tree(case).is_opaque("/provenance.json")


def test_model_of_local_output_leaves_owners_out() -> None:
    nodes = expected_tree(_model_case(output=Output.LOCAL)).nodes

    assert nodes["/owned/f"].uid is None


def test_model_makes_run_outputs_and_unmodelled_copies_opaque() -> None:
    case = _model_case(
        dockerfile=(
            f"FROM {BUSYBOX_IMAGE}",
            "COPY . /ctx/",
            "RUN ls -lan / > /listing.txt",
            "COPY --link a /linked/",
            "COPY d/s /picked/",
        )
    )
    tree = expected_tree(case)

    assert {"/listing.txt", "/linked", "/picked", "/bin"} <= tree.opaque
    assert "/" not in tree.closed  # the base's own files are not modelled
    assert "/ctx" in tree.closed


@pytest.mark.parametrize(
    "line", ["RUN echo unknown", "HEALTHCHECK NONE", "COPY missing /x/"]
)
def test_model_refuses_what_it_cannot_predict(line: str) -> None:
    with pytest.raises(Unmodelled):
        expected_tree(_model_case(dockerfile=("FROM scratch", line)))


# --- known differences, verdicts and reports ------------------------------------


def test_known_difference_rules_load_and_explain() -> None:
    known = load_known_differences()
    expected = Tree(nodes={"/ctx/z": _file(mtime=-SECOND)})
    actual = Tree(nodes={"/ctx/z": _file(mtime=0)})
    differences = compare(expected, actual)

    classic, _ = unexplained(
        differences, known, "tree", [Side("26.1", "classic", "load")]
    )
    buildkit, _ = unexplained(
        differences, known, "tree", [Side("26.1", "buildx-docker", "tar")]
    )

    assert classic == []
    assert [d.kind for d in buildkit] == ["mtime"]


def _report() -> OracleReport:
    return OracleReport(Oracle.TREE, Signature(Phase.RESULT, "tree differs: x"), "diff")


def test_judge_turns_a_pass_with_a_report_into_a_finding() -> None:
    result = BuildResult(exit_status=0, log="", duration=1)

    evaluation = judge(Case(), result, classic=False, rules=(), reports=[_report()])

    assert evaluation.verdict is Verdict.FINDING
    assert evaluation.oracle is Oracle.TREE
    assert evaluation.detail == "diff"


def test_judge_lets_a_rule_explain_a_secret_in_history() -> None:
    case = Case(dockerfile=("FROM x", "ARG A=1", "RUN true"))
    report = OracleReport(
        Oracle.SECRET, Signature(Phase.RESULT, "secret value in image history"), "d"
    )
    result = BuildResult(exit_status=0, log="", duration=1)

    evaluation = judge(
        case, result, classic=False, rules=load_rules("expected"), reports=[report]
    )

    assert evaluation.verdict is Verdict.EXPECTED
    assert evaluation.rule == "build-arg-in-history"


def test_secret_scans_find_values_and_never_report_them(tmp_path: Path) -> None:
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "f").write_text("xx-hunter2-xx")
    (root / "clean").write_text("nothing")
    with tarfile.open(tmp_path / "r.tar", "w") as tar:
        tar.add(root, arcname=".")
    values = {"PASS": "hunter2"}

    leaks = list(_scan_directory(root, values)) + list(
        _scan_tar_file(tmp_path / "r.tar", values, "output files")
    )
    report = secret_report(leaks)

    assert {leak.source for leak in leaks} == {"PASS"}
    assert report is not None and "hunter2" not in report.detail
    assert report.signature.message == "secret value in output files"
    assert secret_report([Leak("image config", "A", "x")]) is not None


def test_health_reads_only_new_log_lines(tmp_path: Path) -> None:
    class Engine:
        log_path = tmp_path / "dockerd.log"

    health = EngineHealth()
    Engine.log_path.write_text(
        'time="t" level=warning msg="cleanup warnings time=x level=fatal msg=y"\n'
    )
    first = health.new_log_problems(Engine())  # type: ignore[arg-type]
    with Engine.log_path.open("a") as stream:
        stream.write("panic: runtime error: index out of range [3]\ngoroutine 1\n")
        stream.write('time="t" level=fatal msg="boom"\n')
    second = health.new_log_problems(Engine())  # type: ignore[arg-type]
    third = health.new_log_problems(Engine())  # type: ignore[arg-type]

    assert first == []  # a nested level= is not the line's level
    assert second == [
        "panic: runtime error: index out of range [3]",
        'time="t" level=fatal msg="boom"',
    ]
    assert third == []


def test_differential_pairs_parse_and_compare() -> None:
    definitions = load_definitions()
    pairs = parse_pairs(["buildx-docker:20.10/classic"], definitions)
    model = Tree(nodes={"/ctx": _dir(), "/ctx/a": _file()}, closed={"/"})
    side_a = Tree(nodes={"/ctx": _dir(), "/ctx/a": _file(0o755)})
    side_b = Tree(nodes={"/ctx": _dir(), "/ctx/a": _file(0o700)})
    case_a = Case(output=Output.TAR)
    case_b = Case(engine="20.10", builder="classic")

    report = differential_report(model, (case_a, side_a), (case_b, side_b), (), [])
    same = differential_report(model, (case_a, side_a), (case_b, side_a), (), [])

    assert pairs == (Pair(Target("buildx-docker"), Target("classic", "20.10")),)
    assert report is not None and same is None
    assert report.signature.message == (
        "builders differ: mode of a file from COPY: permission bits differ "
        "(26.1/buildx-docker vs 20.10/classic)"
    )


# --- on real engines -----------------------------------------------------------


def _context_case(
    output: Output = Output.LOCAL, builder: str = "buildx-docker"
) -> Case:
    return Case(
        files=(
            ContextFile("a", size=513, mode=0o755, mtime_ns=T, seed=1),
            ContextFile("d", FileKind.DIR, mode=0o750, mtime_ns=T),
            ContextFile("d/f", size=3, mtime_ns=T, seed=2),
            ContextFile("d/g", size=5, mtime_ns=T, seed=3),
        ),
        dockerfile=("FROM scratch", "COPY . /ctx/", "COPY --chown=1000:1000 a /owned/"),
        builder=builder,
        output=output,
    )


@pytest.mark.parametrize(
    ("builder", "output"),
    [
        ("buildx-docker", Output.TAR),
        ("buildx-docker", Output.LOCAL),
        ("buildx-docker", Output.LOAD),
        ("classic", Output.LOAD),
    ],
)
@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_tree_oracle_passes_correct_builds(
    session: Session, builder: str, output: Output
) -> None:
    record = session.execute(_context_case(output, builder))

    assert record.evaluation.verdict is Verdict.PASS, record.evaluation.detail
    assert not any("not modelled" in note for note in record.result.notes)


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_tree_oracle_reports_a_tampered_tree(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = oracle_suite.read_result

    def tampered(case: Case, case_dir: Path, docker: object) -> Tree | None:
        os.chmod(case_dir / "rootfs" / "ctx" / "a", 0o700)  # the exported file
        return real(case, case_dir, docker)  # type: ignore[arg-type]

    monkeypatch.setattr(oracle_suite, "read_result", tampered)
    record = session.execute(_context_case())

    assert record.evaluation.verdict is Verdict.FINDING
    assert record.evaluation.oracle is Oracle.TREE
    assert record.evaluation.signature == Signature(
        Phase.RESULT, "tree differs: mode of a file from COPY: permission bits differ"
    )
    assert "/ctx/a (copy-all): expected 0755, got 0700" in record.evaluation.detail


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("builder", ["buildx-docker", "container-v0-34"])
def test_tree_oracle_cases_share_no_context(session: Session, builder: str) -> None:
    def case(seed: int) -> Case:
        files = (ContextFile("a", size=1, mtime_ns=T, seed=seed),)
        return Case(
            files=files,
            dockerfile=("FROM scratch", "COPY . /ctx/"),
            builder=builder,
            output=Output.TAR,
        )

    # Same path, size, mtime and mode, other content: unless the runner
    # prunes each case's context, BuildKit sends the first content again.
    records = [session.execute(case(seed)) for seed in (2, 3, 4)]

    assert [r.evaluation.verdict for r in records] == [Verdict.PASS] * 3, [
        r.evaluation.detail for r in records
    ]


SECRET = "s3cr3t-value-4711"


def _secret_case(*lines: str, output: Output = Output.LOAD) -> Case:
    return Case(
        dockerfile=(f"FROM {BUSYBOX_IMAGE}", "ARG TOKEN", *lines),
        build_args=(("TOKEN", "env:BUILDFUZZ_TEST_TOKEN"),),
        output=output,
    )


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_secret_oracle(session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BUILDFUZZ_TEST_TOKEN", SECRET)

    baked = session.execute(_secret_case("RUN echo $TOKEN > /baked.txt"))
    env = session.execute(_secret_case("ENV LEAKED=$TOKEN"))
    in_tar = session.execute(
        _secret_case("RUN echo $TOKEN > /baked.txt", output=Output.TAR)
    )
    history = session.execute(_secret_case("RUN true"))
    unused = session.execute(_secret_case("COPY . /ctx/"))

    assert baked.evaluation.verdict is Verdict.FINDING
    assert baked.evaluation.oracle is Oracle.SECRET
    assert "image layer" in baked.evaluation.signature.message  # type: ignore[union-attr]
    assert env.evaluation.oracle is Oracle.SECRET
    assert "image config" in env.evaluation.signature.message  # type: ignore[union-attr]
    assert in_tar.evaluation.signature == Signature(
        Phase.RESULT, "secret value in output files"
    )
    assert SECRET not in baked.evaluation.detail
    # Documented: build arguments that RUN consumes are in the history.
    assert history.evaluation.verdict is Verdict.EXPECTED
    assert history.evaluation.rule == "build-arg-in-history"
    assert unused.evaluation.verdict is Verdict.PASS


def _command_lines() -> list[bytes]:
    lines = []
    for entry in Path("/proc").iterdir():
        try:
            lines.append((entry / "cmdline").read_bytes())
        except OSError:
            pass  # not a process, or it ended
    return lines


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("builder", ["buildx-docker", "classic"])
def test_secret_never_on_a_command_line(
    session: Session, monkeypatch: pytest.MonkeyPatch, builder: str
) -> None:
    monkeypatch.setenv("BUILDFUZZ_TEST_TOKEN", SECRET)
    case = _secret_case(f"RUN test ${{#TOKEN}} -eq {len(SECRET)} && sleep 2")
    seen: list[bytes] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.extend(line for line in _command_lines() if b"TOKEN" in line)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        record = session.execute(case.with_changes(builder=builder))
    finally:
        done.set()
        watcher.join()

    # The build got the value (RUN checked its length); no command line held it.
    assert record.result.succeeded, record.result.log[-2000:]
    assert any(b"--build-arg\x00TOKEN\x00" in line for line in seen)
    assert not [line for line in seen if SECRET.encode() in line]


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_engine_health_oracle(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = _context_case(Output.TAR)
    quiet = session.execute(case)
    engine = session.engine(case)
    real = oracle_suite.read_result
    leftovers: list[subprocess.Popen[bytes]] = []
    mount = engine.directory / "leak-test"

    def panic_in_log(case: Case, case_dir: Path, docker: object) -> Tree | None:
        with engine.log_path.open("a") as stream:
            stream.write("panic: buildfuzz test panic\n")
        return real(case, case_dir, docker)  # type: ignore[arg-type]

    def leak_mount(case: Case, case_dir: Path, docker: object) -> Tree | None:
        mount.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "none", str(mount)], check=True)
        return real(case, case_dir, docker)  # type: ignore[arg-type]

    def leak_process(case: Case, case_dir: Path, docker: object) -> Tree | None:
        command = ["/bin/sh", "-c", "sleep 60", str(engine.directory)]
        leftovers.append(subprocess.Popen(command))
        return real(case, case_dir, docker)  # type: ignore[arg-type]

    try:
        records = {}
        for name, hook in [
            ("log", panic_in_log),
            ("mount", leak_mount),
            ("process", leak_process),
        ]:
            monkeypatch.setattr(oracle_suite, "read_result", hook)
            records[name] = session.execute(case.with_changes(no_cache=True))
            monkeypatch.setattr(oracle_suite, "read_result", real)
            # Once reported, a leak is part of the next case's baseline.
        after = session.execute(case)
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        for process in leftovers:
            process.kill()
            process.wait()

    assert quiet.evaluation.verdict is Verdict.PASS
    for name, message in [
        ("log", "daemon log: panic: buildfuzz test panic"),
        ("mount", "mount left behind by a finished build"),
        ("process", "process left behind by a finished build"),
    ]:
        evaluation = records[name].evaluation
        assert evaluation.oracle is Oracle.ENGINE_HEALTH, (name, evaluation)
        assert evaluation.signature == Signature(Phase.ENGINE, message)
    assert after.evaluation.verdict is Verdict.PASS


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_differential_oracle(run_dir: Path) -> None:
    definitions = load_definitions()
    pairs = parse_pairs(["buildx-docker:container-v0-34"], definitions)

    def run(known: tuple[()] | None) -> Evaluation:
        suite = OracleSuite(
            definitions, OracleSettings(differential=pairs), known=known
        )
        directory = run_dir / ("known" if known is None else "none")
        session = Session(
            definitions,
            client_tools(directory),
            directory,
            rules=(),
            build_timeout=300,
            oracles=suite,
        )
        try:
            case = _context_case(Output.TAR).with_changes(
                dockerfile=(
                    "FROM scratch",
                    "COPY . /ctx/",
                    "COPY --chmod=0750 d /modes/",
                )
            )
            return session.execute(case).evaluation
        finally:
            session.close()

    explained = run(None)
    unexplained_ = run(())

    # BuildKit v0.13 leaves the created /modes 0755, v0.34 gives it 0750: a
    # known difference with the rules, a finding naming both sides without.
    assert explained.verdict is Verdict.PASS, explained.detail
    assert unexplained_.oracle is Oracle.DIFFERENTIAL
    assert unexplained_.signature == Signature(
        Phase.RESULT,
        "builders differ: mode of a dir from COPY --chmod: permission bits differ "
        "(26.1/buildx-docker vs 26.1/container-v0-34)",
    )


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_tree_oracle_is_quiet_on_generated_cases(session: Session) -> None:
    """About 50 default-profile cases on three builders, every output.

    Contexts from stdin are left out: the oracle does not model them.
    """
    default = load_profile("default")
    profile = replace(default, build=replace(default.build, context_from=("",)))
    every = (Output.TAR, Output.LOCAL, Output.LOAD)
    targets = [
        CaseTarget("26.1", "buildx-docker", every),
        CaseTarget("26.1", "classic", (Output.LOAD,)),
        CaseTarget("26.1", "container-v0-34", every),
    ]
    drawn: list[Case] = []

    @settings(database=None, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cases(profile, targets))
    def draw(case: Case) -> None:
        drawn.append(case)

    fuzz = draw.hypothesis.fuzz_one_input  # type: ignore[attr-defined]
    records: list[CaseRecord] = []
    index = 0
    while len(records) < 50:
        drawn.clear()
        fuzz(random.Random(f"oracles:{index}").randbytes(8192))
        index += 1
        if drawn:
            records.append(session.execute(drawn[0].with_changes(no_cache=False)))

    oracles = [r.evaluation.oracle for r in records]
    compared = [
        r
        for r in records
        if r.result.succeeded and not any("not modelled" in n for n in r.result.notes)
    ]
    assert Oracle.TREE not in oracles, [
        r.evaluation.detail for r in records if r.evaluation.oracle is Oracle.TREE
    ]
    assert Oracle.ENGINE_HEALTH not in oracles
    assert len(compared) >= 10  # the oracle did look at a good share of them


def test_next_build_waits_for_the_prune(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []

    def slow_prune(host: str, command: list[str]) -> str:
        events.append("prune started")
        time.sleep(0.5)
        events.append("prune ended")
        return ""

    def fake_build(runner: CaseRunner, case: Case, *_: object) -> BuildResult:
        events.append("build")
        return BuildResult(exit_status=0, log="", duration=0.0)

    monkeypatch.setattr(build, "_prune_engine_contexts", slow_prune)
    monkeypatch.setattr(CaseRunner, "_build", fake_build)
    monkeypatch.setattr(CaseRunner, "_remove_image", lambda *_: None)
    docker = DockerClient(host=f"unix://{tmp_path}/docker.sock")
    runner = CaseRunner(
        docker,
        load_definitions().builders,
        tmp_path / "cases",
        timeout=10,
        forget_contexts=True,
    )

    runner.run(Case())
    runner.run(Case())

    # The second case's prune starts after its build, in the background.
    assert events[:4] == ["build", "prune started", "prune ended", "build"]


def test_saved_image_without_layers_is_empty(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.json"
    manifest.write_text('[{"Config": "c.json", "RepoTags": null, "Layers": null}]')
    with tarfile.open(tmp_path / "save.tar", "w") as tar:
        tar.add(manifest, arcname="manifest.json")

    assert read_saved_image(tmp_path / "save.tar").nodes == {}


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_cache_attestation_and_oci_axes(session: Session) -> None:
    base = _context_case(Output.TAR)

    def verdict(**changes: object) -> tuple[Verdict, str | None, list[str]]:
        record = session.execute(base.with_changes(**changes))
        assert record.evaluation.oracle is None, record.evaluation.detail
        return record.evaluation.verdict, record.evaluation.rule, record.result.notes

    inline = verdict(cache="inline", output=Output.LOAD)
    local = verdict(cache="local")
    provenance = verdict(attest="provenance-min")
    classic = verdict(cache="inline", builder="classic", output=Output.LOAD)
    container = verdict(
        builder="container-v0-34",
        output=Output.OCI,
        cache="local",
        attest="provenance-max",
    )

    assert inline[0] is Verdict.PASS
    assert local[:2] == (Verdict.EXPECTED, "docker-driver-cache-export")
    assert provenance[:2] == (Verdict.EXPECTED, "docker-driver-attestations")
    assert classic[:2] == (Verdict.EXPECTED, "classic-buildx-flags")
    # The OCI layout (an index with the image and its attestation) was read
    # and compared with the model: nothing noted that it could not be.
    assert container[0] is Verdict.PASS
    assert not [note for note in container[2] if "oracle" in note], container[2]


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("builder", ["buildx-docker", "classic"])
def test_failed_build_whose_log_is_not_utf8(session: Session, builder: str) -> None:
    name = os.fsdecode(b"non-\xffutf8")  # a surrogate escape, as cases hold it
    case = Case(
        files=(ContextFile(name, size=3, mtime_ns=T),),
        dockerfile=(
            f"FROM {BUSYBOX_IMAGE}",
            "COPY . /ctx/",
            "RUN printf 'non-\\377utf8\\n' && false",  # a raw byte, then a failure
        ),
        builder=builder,
    )

    record = session.execute(case)

    assert record.evaluation.verdict is Verdict.FINDING
    assert "\ufffd" in record.result.log  # the byte, replaced; no crash


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_secret_in_provenance_is_the_documented_kind(
    session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUILDFUZZ_TEST_TOKEN", SECRET)

    def judged(output: Output, attest: str) -> tuple[Verdict, str | None]:
        case = _secret_case("RUN true", output=output)
        record = session.execute(
            case.with_changes(builder="container-v0-34", attest=attest)
        )
        return record.evaluation.verdict, record.evaluation.rule

    expected = (Verdict.EXPECTED, "build-arg-in-provenance")
    assert judged(Output.TAR, "provenance-max") == expected
    assert judged(Output.OCI, "provenance-max") == expected
    # mode=min records no build arguments.
    assert judged(Output.TAR, "provenance-min") == (Verdict.PASS, None)
