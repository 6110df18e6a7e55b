"""Build sequences: steps, the state machine, its shrinking, findings and repro.sh.

Fast tests drive the state machine with a purpose-made runner that builds
nothing. Tests marked ``engine`` run sequences on the buildx docker driver
of a real sandbox engine, healthy and with a planted fault.
"""

import json
import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from buildfuzz import sequences
from buildfuzz.build import BuildResult
from buildfuzz.case import Case, ContextFile, FileKind, Output
from buildfuzz.definitions import load_definitions
from buildfuzz.errors import DataFileError
from buildfuzz.finding_writer import FindingWriter
from buildfuzz.oracle_sequence import BuildOutcome, Mismatch, compare_outcomes
from buildfuzz.oracle_suite import OracleSettings, OracleSuite
from buildfuzz.oracle_tree import Node, NodeType, Tree
from buildfuzz.profile import load_profile
from buildfuzz.regression import check_known_findings
from buildfuzz.replay import load_steps
from buildfuzz.results import ResultsStore
from buildfuzz.rules import load_rules
from buildfuzz.sequence_repro import render_sequence_repro
from buildfuzz.sequences import (
    BUILD,
    PRUNE,
    START,
    SequenceFinding,
    SequenceRunner,
    Step,
    replay_steps,
    sequence_profile,
    steps_from_json,
    steps_json,
)
from buildfuzz.session import Session
from buildfuzz.signature import Phase, Signature
from buildfuzz.strategies import Target
from tests.conftest import PROFILES, REPO, buildfuzz, client_tools

PROFILE = load_profile(str(PROFILES / "sequences.toml"))
DEFINITIONS = load_definitions()
TARGETS = (
    Target("26.1", "buildx-docker", DEFINITIONS.builders["buildx-docker"].outputs),
)
T = 1_700_000_000 * 10**9
PLANTED = Mismatch(Signature(Phase.RESULT, "planted mismatch"), "planted\n", "tree")
CASE = Case(
    files=(ContextFile("a", size=3, mode=0o755, mtime_ns=T, seed=1),),
    dockerfile=("FROM scratch", "COPY . /ctx/"),
    output=Output.TAR,
)


def passed(case: Case, tree: Tree | None = None) -> BuildOutcome:
    return BuildOutcome(case, BuildResult(exit_status=0, log="", duration=0.1), tree)


def failed(case: Case, message: str) -> BuildOutcome:
    result = BuildResult(exit_status=1, log=f"ERROR: {message}\n", duration=0.1)
    return BuildOutcome(case, result, None, Signature(Phase.SOLVE, message))


# --- steps and settings -----------------------------------------------------


def test_steps_round_trip_through_json() -> None:
    odd = CASE.with_changes(files=(ContextFile("non-\udcffutf8", size=1),))
    steps = [
        Step(START, "start from an empty build cache", CASE),
        Step(BUILD, "build with the cache, then with --no-cache", CASE),
        Step("add", "add file 'non-\\xffutf8'", odd),
        Step(PRUNE, "prune the builder's build cache", odd),
    ]

    assert steps_from_json(steps_json(steps)) == steps


def test_steps_reject_unknown_action() -> None:
    text = steps_json([Step(BUILD, "build", CASE)]).replace('"build"', '"rebuild"', 1)

    with pytest.raises(DataFileError) as error:
        steps_from_json(text, source="steps.json")

    assert "unknown step action 'rebuild'" in str(error.value)
    assert "known actions: start, build" in str(error.value)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("share = 1.5", "sequences.share: 1.5 is not a fraction of the budget"),
        ("share = -0.1", "use a number from 0 (no sequences) to 1"),
        ('share = "half"', "sequences.share: 'half' is not a fraction"),
        ("share = true", "sequences.share: True is not a fraction"),
        ("max_steps = 1", "sequences.max_steps: 1 is out of range; use 2"),
        ("max_steps = 51", "sequences.max_steps: 51 is out of range"),
        ("max_steps = 2.5", "sequences.max_steps: 2.5 is not an integer"),
        ("steps = 4", "unknown key 'steps' in [sequences]; known keys: max_steps"),
    ],
)
def test_profile_rejects_bad_sequence_settings(
    tmp_path: Path, table: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[sequences]\n{table}\n")

    with pytest.raises(DataFileError) as error:
        load_profile(str(path))

    assert message in str(error.value)


def test_profiles_turn_sequences_on_in_nightly_only() -> None:
    assert load_profile("default").sequences.share == 0
    assert 0 < load_profile("nightly").sequences.share < 0.5
    assert load_profile("nightly").sequences.max_steps >= 4


def test_sequence_profile_keeps_contexts_small() -> None:
    profile = sequence_profile(load_profile("nightly"))

    assert profile.context.max_files <= sequences.MAX_FILES
    assert FileKind.FIFO not in profile.context.kinds
    assert FileKind.SOCKET not in profile.context.kinds
    assert max(profile.context.sizes) <= sequences.MAX_SIZE
    assert max(profile.context.sparse_sizes) <= sequences.MAX_SPARSE_SIZE
    assert profile.context.bulk_files == (0,)
    assert profile.dockerfile.layers == (0,)
    assert set(profile.dockerfile.bases) <= {"scratch", "busybox", "stage"}
    assert set(profile.build.outputs) <= set(sequences.SEQUENCE_OUTPUTS)
    assert profile.build.no_cache == (False,)


# --- the comparison -------------------------------------------------------------


def tree(mode: int = 0o755, content: str = "x", mtime: int = T) -> Tree:
    return Tree(
        nodes={
            "/": Node(NodeType.DIR, mode=0o755, uid=0, gid=0),
            "/ctx": Node(NodeType.DIR, mode=0o755, uid=0, gid=0, mtime_ns=mtime),
            "/ctx/a": Node(
                NodeType.FILE,
                mode=mode,
                uid=0,
                gid=0,
                size=3,
                digest=content,
                mtime_ns=mtime,
            ),
        },
        whole_seconds=True,
    )


MODEL = Tree(
    nodes={
        "/ctx": Node(NodeType.DIR, mode=0o755, origin="copy-all"),
        "/ctx/a": Node(NodeType.FILE, mode=0o755, mtime_ns=T, origin="copy-all"),
    },
    closed={"/ctx"},
)


def test_same_trees_match_whatever_their_mtimes() -> None:
    found = compare_outcomes(
        passed(CASE, tree(mtime=T)), passed(CASE, tree(mtime=T + 10**9)), MODEL
    )

    assert found is None


def test_tree_mismatch_names_the_kind_and_paths() -> None:
    found = compare_outcomes(
        passed(CASE, tree(mode=0o700, content="y")), passed(CASE, tree()), MODEL
    )

    assert found is not None
    assert found.kind == "tree"
    assert found.signature == Signature(
        Phase.RESULT,
        "cached build differs from a build from scratch: content of a file from COPY",
    )
    assert found.paths == ("/ctx/a",)
    assert "mode     /ctx/a (copy-all): expected 0755, got 0700" in found.detail


def test_build_failing_alone_is_a_mismatch() -> None:
    cached_alone = compare_outcomes(failed(CASE, "boom"), passed(CASE), MODEL)
    scratch_alone = compare_outcomes(passed(CASE), failed(CASE, "boom"), MODEL)
    both = compare_outcomes(failed(CASE, "boom"), failed(CASE, "bang"), MODEL)

    assert cached_alone is not None
    assert cached_alone.signature == Signature(
        Phase.SOLVE, "only the cached build fails: boom"
    )
    assert scratch_alone is not None
    assert scratch_alone.kind == "scratch-fails"
    assert both is None


def test_unmodelled_case_compares_no_tree() -> None:
    found = compare_outcomes(passed(CASE, tree(mode=0o700)), passed(CASE, tree()), None)

    assert found is None


# --- the state machine, with a runner that builds nothing ---------------------------


class PlantedRunner(SequenceRunner):
    """Build nothing; ``mismatch_when`` decides which build pairs mismatch."""

    def __init__(self, profile: Any = PROFILE, **options: Any) -> None:
        session: Any = SimpleNamespace(
            definitions=DEFINITIONS, oracles=SimpleNamespace(compares_content=True)
        )
        self.found: list[SequenceFinding] = []
        self.since_prune = 0
        self.built: list[Case] = []
        super().__init__(
            session,
            profile,
            TARGETS,
            seed=7,
            known=options.pop("known", self.seen),
            on_finding=self.found.append,
            **options,
        )

    def seen(self, signature: Signature) -> bool:
        return any(finding.signature == signature for finding in self.found)

    def mismatch_when(self, case: Case) -> bool:
        return self.since_prune >= 2  # the second build since a prune

    def prune(self, case: Case) -> None:
        self.since_prune = 0

    def build_pair(
        self, case: Case
    ) -> tuple[Mismatch | None, BuildOutcome, BuildOutcome]:
        self.since_prune += 1
        self.built.append(case)
        self.stats.builds += 2
        outcome = passed(case)
        return (PLANTED if self.mismatch_when(case) else None), outcome, outcome


class HealthyRunner(PlantedRunner):
    def mismatch_when(self, case: Case) -> bool:
        return False


def test_healthy_sequences_report_nothing() -> None:
    runner = HealthyRunner()

    runner.run(time.monotonic() + 3, shrink_budget=3)

    assert runner.found == []
    assert runner.stats.sequences >= 3
    assert runner.stats.steps >= runner.stats.sequences
    assert runner.built


def test_planted_mismatch_shrinks_to_two_builds() -> None:
    runner = PlantedRunner()

    runner.run(time.monotonic() + 8, shrink_budget=8)

    finding = runner.found[0]
    assert finding.new
    assert [step.action for step in finding.steps] == [START, BUILD, BUILD]
    assert len(finding.original_steps) >= len(finding.steps)
    assert finding.complete
    assert (finding.reproduced, finding.attempts) == (2, 2)
    assert not finding.flaky


def test_known_mismatch_is_not_shrunk() -> None:
    runner = PlantedRunner(known=lambda signature: True)

    runner.run(time.monotonic() + 5, shrink_budget=5)

    assert runner.found
    assert all(not finding.new for finding in runner.found)
    assert runner.stats.shrink_builds == 0


def test_every_state_is_a_valid_case() -> None:
    runner = HealthyRunner(load_profile("default"))

    runner.run(time.monotonic() + 5, shrink_budget=5)

    assert len(runner.built) > 20
    for case in runner.built:
        paths = [entry.path for entry in case.files]
        kinds = {entry.path: entry.kind for entry in case.files}
        assert len(paths) == len(set(paths)), paths
        for entry in case.files:
            parent = entry.path.rpartition("/")[0]
            assert kinds.get(parent, FileKind.DIR) is FileKind.DIR, entry.path
            if entry.kind is FileKind.HARDLINK:
                assert kinds.get(entry.target) is FileKind.FILE, entry.target
        for element in case.dockerfile:
            source = _copy_source(element)
            assert source is None or source == "." or source in kinds, element


def _copy_source(element: str) -> str | None:
    for path in ("/picked/", "/added/", "/owned/", "/modes/", "/linked/"):
        if element.endswith(f" {path}") and not element.startswith("COPY --from"):
            return element.rsplit(" ", 2)[-2].removeprefix("[").strip('",')
    return None


# --- repro.sh -------------------------------------------------------------------


def test_repro_runs_steps_in_order_and_parses(tmp_path: Path) -> None:
    edited = CASE.with_changes(files=(replace(CASE.files[0], mode=0o600),))
    steps = [
        Step(START, "start from an empty build cache", CASE),
        Step(BUILD, "build with the cache, then with --no-cache", CASE),
        Step("edit", "chmod 0600 of 'a'", edited),
        Step(PRUNE, "prune the builder's build cache", edited),
        Step(BUILD, "build with the cache, then with --no-cache", edited),
    ]
    mismatch = replace(PLANTED, paths=("/ctx/a",))

    script = render_sequence_repro(steps, mismatch, timeout=60)
    (tmp_path / "repro.sh").write_text(script)
    syntax = subprocess.run(["bash", "-n", str(tmp_path / "repro.sh")], check=False)

    assert syntax.returncode == 0
    assert script.index("# step 1:") < script.index("# step 2:")
    assert script.count("\nprune\n") == 2
    assert script.count('--no-cache "$ctx"') == 2
    assert "listing \"$work/scratch-2\"/tree $'/ctx/a'" in script


def test_repro_refuses_to_prune_without_consent(tmp_path: Path) -> None:
    steps = [Step(START, "start", CASE), Step(BUILD, "build", CASE)]
    (tmp_path / "repro.sh").write_text(
        render_sequence_repro(steps, PLANTED, timeout=60)
    )
    environment = {**os.environ, "TMPDIR": str(tmp_path)}
    environment.pop("BUILDFUZZ_REPRO_PRUNE", None)

    completed = subprocess.run(
        ["bash", str(tmp_path / "repro.sh")],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
    )

    assert completed.returncode == 2
    assert "set BUILDFUZZ_REPRO_PRUNE=1" in completed.stderr


def test_repro_of_a_failure_checks_the_log() -> None:
    mismatch = Mismatch(
        Signature(Phase.SOLVE, "only the cached build fails: no such file"),
        "",
        "cached-fails",
        build_signature=Signature(Phase.SOLVE, "no such file"),
    )
    steps = [Step(START, "start", CASE), Step(BUILD, "build", CASE)]

    script = render_sequence_repro(steps, mismatch, timeout=60)

    assert '[ "$cached" -ne 0 ] && [ "$scratch" -eq 0 ]' in script
    assert "grep -Eq -- 'no[[:space:]]+such[[:space:]]+file'" in script


# --- on a real engine -----------------------------------------------------------


@pytest.fixture
def session(run_dir: Path) -> Iterator[Session]:
    made = Session(
        DEFINITIONS,
        client_tools(run_dir),
        run_dir,
        rules=load_rules("none"),
        build_timeout=120,
        oracles=OracleSuite(DEFINITIONS, OracleSettings(tree=True)),
    )
    yield made
    made.close()


def engine_runner(session: Session, found: list[SequenceFinding]) -> SequenceRunner:
    """Return a runner that stops after its first new finding."""
    return SequenceRunner(
        session,
        PROFILE,
        TARGETS,
        seed=11,
        known=lambda signature: any(f.signature == signature for f in found),
        on_finding=found.append,
        may_continue=lambda: not any(finding.new for finding in found),
    )


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_sequences_pass_on_a_healthy_engine(session: Session) -> None:
    found: list[SequenceFinding] = []
    runner = engine_runner(session, found)

    runner.run(time.monotonic() + 90, shrink_budget=60)

    assert found == []
    assert runner.stats.sequences >= 3
    assert runner.stats.builds >= 10


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_planted_fault_is_shrunk_and_written(
    session: Session, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fault: from the second cached build after a prune on, every mode
    # in the built tree loses its owner-execute bit or gains it.
    builds_since_prune = {"count": 0}
    real_prune, real_read = SequenceRunner.prune, sequences.read_tree

    def prune(self: SequenceRunner, case: Case) -> None:
        builds_since_prune["count"] = 0
        real_prune(self, case)

    def read_tree(case: Case, case_dir: Path, docker: Any) -> Tree | None:
        built = real_read(case, case_dir, docker)
        if built is None or case.no_cache:
            return built
        builds_since_prune["count"] += 1
        if builds_since_prune["count"] < 2:
            return built
        return Tree(
            nodes={
                path: replace(node, mode=(node.mode or 0) ^ 0o100)
                for path, node in built.nodes.items()
            },
            whole_seconds=built.whole_seconds,
        )

    monkeypatch.setattr(SequenceRunner, "prune", prune)
    monkeypatch.setattr(sequences, "read_tree", read_tree)
    found: list[SequenceFinding] = []
    runner = engine_runner(session, found)

    runner.run(time.monotonic() + 400, shrink_budget=300)

    finding = next(f for f in found if f.new)
    assert [step.action for step in finding.steps] == [START, BUILD, BUILD]
    assert finding.signature.message.startswith(
        "cached build differs from a build from scratch: mode of a"
    )
    assert finding.reproduced == finding.attempts == 2

    store = ResultsStore(tmp_path / "results").open()
    tools = client_tools(session.run_dir)
    writer = FindingWriter(
        store,
        session,
        tools,
        profile=PROFILE,
        targets=TARGETS,
        seed=11,
        build_timeout=120,
    )
    writer.write_sequence(finding)
    store.close()
    directory = tmp_path / "results" / finding.signature.id
    record = (directory / "finding.json").read_text()
    readme = (directory / "README.md").read_text()

    assert '"oracle": "sequence"' in record
    assert "1. start from an empty build cache" in readme
    assert "3. build with the cache, then with --no-cache" in readme
    assert len(steps_from_json((directory / "steps.json").read_text())) == 3
    replayed = replay_steps(session, finding.steps, PROFILE)
    assert replayed is not None
    assert replayed.signature == finding.signature

    # `run --ci` replays the steps, not the last case alone.
    assert load_steps(directory) is not None
    reopened = ResultsStore(tmp_path / "results").open()
    try:
        reports = check_known_findings(reopened, session)
    finally:
        reopened.close()
    assert [report.reproduced for report in reports] == [1]

    # The fault is in buildfuzz's reader, so the engine itself builds the
    # steps correctly: repro.sh runs them all and reports no reproduction.
    engine = session.engine(finding.steps[0].case)
    environment = {
        **os.environ,
        "PATH": f"{tools.cli.parent}:{os.environ['PATH']}",
        "DOCKER_CONFIG": str(tools.config_dir),
        "DOCKER_HOST": engine.host,
        "BUILDFUZZ_REPRO_PRUNE": "1",
        "TMPDIR": str(tmp_path),
    }
    completed = subprocess.run(
        ["bash", str(directory / "repro.sh")],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )

    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "did not reproduce (exit status of the cached build 0, from scratch 0)" in (
        completed.stdout
    )


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_run_spends_its_share_on_sequences(tmp_path: Path, workdir: Path) -> None:
    results = tmp_path / "results"

    completed = buildfuzz(
        "run", "--budget", "60s", "--seed", "3",
        "--profile", str(PROFILES / "sequences.toml"),
        "--results", str(results), "--workdir", str(workdir),
        cwd=REPO,
    )  # fmt: skip
    summary = json.loads(next((results / "runs").glob("*.json")).read_text())

    assert completed.returncode == 0, completed.stderr[-3000:]
    assert summary["cases"] > 0
    assert summary["sequences"]["sequences"] > 0
    assert summary["sequences"]["steps"] > summary["sequences"]["sequences"]
    assert "  sequences          " in completed.stdout


# A docker stand-in for repro.sh: buildx prune succeeds, and buildx build
# writes a tar whose /ctx has mode 0755, or $CACHED_MODE without --no-cache,
# or fails with $CACHED_ERROR without --no-cache.
FAKE_DOCKER = r"""#!/usr/bin/env bash
[ "$1 $2" = "buildx prune" ] && exit 0
dest=$(printf '%s\n' "$@" | sed -n 's/^type=tar,dest=//p')
root=$(mktemp -d)
mkdir "$root/ctx"
chmod 755 "$root/ctx"
if [[ " $* " != *" --no-cache "* ]]; then
  if [ -n "${CACHED_ERROR:-}" ]; then echo "ERROR: $CACHED_ERROR"; exit 1; fi
  chmod "$CACHED_MODE" "$root/ctx"
fi
tar -cf "$dest" -C "$root" .
"""


def run_fake_repro(
    tmp_path: Path, mismatch: Mismatch, **variables: str
) -> subprocess.CompletedProcess[str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    steps = [Step(START, "start", CASE), Step(BUILD, "build", CASE)]
    (tmp_path / "repro.sh").write_text(
        render_sequence_repro(steps, mismatch, timeout=60)
    )
    environment = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "TMPDIR": str(tmp_path),
        "BUILDFUZZ_REPRO_PRUNE": "1",
        "CACHED_MODE": "755",
        **variables,
    }
    return subprocess.run(
        ["bash", str(tmp_path / "repro.sh")],
        env=environment,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_repro_detects_a_tree_mismatch(tmp_path: Path) -> None:
    mismatch = replace(PLANTED, paths=("/ctx",))

    completed = run_fake_repro(tmp_path, mismatch, CACHED_MODE="700")

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "REPRODUCED" in completed.stdout
    assert "> /ctx directory 700 0:0" in completed.stdout


def test_repro_passes_equal_trees(tmp_path: Path) -> None:
    mismatch = replace(PLANTED, paths=("/ctx",))

    completed = run_fake_repro(tmp_path, mismatch)

    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "did not reproduce" in completed.stdout


def test_repro_detects_a_cached_failure(tmp_path: Path) -> None:
    mismatch = Mismatch(
        Signature(Phase.SOLVE, "only the cached build fails: no such file"),
        "",
        "cached-fails",
        build_signature=Signature(Phase.SOLVE, "no such file"),
    )

    completed = run_fake_repro(tmp_path, mismatch, CACHED_ERROR="no such file")

    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "REPRODUCED" in completed.stdout
