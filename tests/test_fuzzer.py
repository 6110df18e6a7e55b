"""The fuzzing loop's logic, driven by a purpose-made fake builder.

Real builds are covered by tests/test_run.py; here a pure function plays
the builder so that shrinking, 1-minimality and the explanation can be
checked quickly and exactly.
"""

import time
from collections.abc import Callable
from dataclasses import replace

import pytest
from hypothesis import settings

from buildfuzz.build import BuildResult
from buildfuzz.case import Case, ContextFile, FileKind, Output
from buildfuzz.errors import UsageError
from buildfuzz.fuzzer import CONFIRM_RUNS, FindingEvent, Fuzzer, ShrinkResult
from buildfuzz.minimize import default_case, one_minimal, simplifications
from buildfuzz.profile import load_profile
from buildfuzz.session import CaseRecord
from buildfuzz.shard import Shard
from buildfuzz.signature import Phase, Signature
from buildfuzz.strategies import Target, cases
from buildfuzz.verdict import Evaluation, Oracle, Verdict

PROFILE = load_profile("default")
TARGETS = (
    Target("26.1", "buildx-docker", (Output.LOAD, Output.TAR, Output.LOCAL)),
    Target("26.1", "classic", (Output.LOAD,)),
    Target("20.10", "buildx-docker", (Output.LOAD, Output.TAR, Output.LOCAL)),
)
PLANTED = Signature(Phase.SOLVE, "planted failure")


def fake_builder(fails: Callable[[Case], bool]) -> Callable[[Case], CaseRecord]:
    def execute(case: Case) -> CaseRecord:
        result = BuildResult(exit_status=1 if fails(case) else 0, log="", duration=0)
        if result.succeeded:
            return CaseRecord(case, result, Evaluation(Verdict.PASS))
        return CaseRecord(
            case, result, Evaluation(Verdict.FINDING, PLANTED, Oracle.BUILD_ERROR)
        )

    return execute


def two_axes(case: Case) -> bool:
    """Fail only for a tar output with a setuid file in the context."""
    setuid = any(f.kind is FileKind.FILE and f.mode & 0o4000 for f in case.files)
    return case.output is Output.TAR and setuid


def make_fuzzer(
    execute: Callable[[Case], CaseRecord],
    events: list[FindingEvent] | None = None,
    *,
    seed: int = 5,
    first_only: bool = False,
) -> Fuzzer:
    """Return a fuzzer of the default profile that appends findings to
    ``events``, treats the signatures seen there as known, and with ``first_only``
    stops after the first finding."""
    found = [] if events is None else events
    return Fuzzer(
        cases(PROFILE, TARGETS),
        execute,
        profile=PROFILE,
        targets=TARGETS,
        seed=seed,
        known=lambda signature: any(e.signature == signature for e in found),
        on_finding=found.append,
        may_continue=(lambda: not found) if first_only else (lambda: True),
    )


def run_fuzzer(fails: Callable[[Case], bool], seconds: float = 8) -> list[FindingEvent]:
    events: list[FindingEvent] = []
    fuzzer = make_fuzzer(fake_builder(fails), events)
    fuzzer.run(time.monotonic() + seconds, shrink_budget=seconds)
    return events


def test_planted_finding_shrinks_to_two_axes() -> None:
    events = run_fuzzer(two_axes)
    new = [event for event in events if event.new]

    assert len(new) == 1
    shrunk = new[0].shrunk
    assert shrunk is not None
    case = shrunk.case
    default = default_case(PROFILE, TARGETS)
    assert case.output is Output.TAR
    assert len(case.files) == 1
    assert case.files[0].mode == 0o4755
    assert case.files[0].size == PROFILE.context.sizes[0]
    assert case.files[0].uid == PROFILE.context.owners[0]
    assert case.dockerfile == default.dockerfile
    assert case.dockerignore is None
    assert case.platform == default.platform
    assert case.build_args == ()
    assert (case.engine, case.builder) == (default.engine, default.builder)


def test_planted_finding_reports_free_axes() -> None:
    events = run_fuzzer(two_axes)
    shrunk = next(event.shrunk for event in events if event.new)

    assert shrunk is not None
    status = {report.axis: report.status for report in shrunk.explanation}
    assert status["engine"] == "free"
    assert status["platform"] == "free"
    assert status["output"] == "needed"
    assert shrunk.rate == 1.0
    assert shrunk.complete


def test_known_finding_is_not_shrunk_again() -> None:
    events = run_fuzzer(lambda case: len(case.files) >= 1, seconds=5)

    assert sum(event.new for event in events) == 1
    assert any(not event.new for event in events)
    assert all(event.shrunk is None for event in events if not event.new)


def test_flaky_finding_gets_measured_rate() -> None:
    calls = {"count": 0}

    def flaky(case: Case) -> bool:
        calls["count"] += 1
        return len(case.files) >= 1 and calls["count"] % 2 == 0

    events = run_fuzzer(flaky, seconds=5)
    shrunk = next((e.shrunk for e in events if e.new and e.shrunk), None)

    assert shrunk is not None
    assert shrunk.attempts >= 3
    assert shrunk.rate < 1.0
    assert shrunk.flaky


def test_seed_gives_same_case_sequence() -> None:
    sequences = []
    for _ in range(2):
        seen: list[str] = []

        def record(case: Case, seen: list[str] = seen) -> CaseRecord:
            seen.append(case.id)
            return fake_builder(lambda _: False)(case)

        fuzzer = make_fuzzer(record, seed=99)
        fuzzer.run(time.monotonic() + 2, shrink_budget=1)
        sequences.append(seen)

    length = min(map(len, sequences))
    assert length > 20
    assert sequences[0][:length] == sequences[1][:length]


def case_ids(shard: Shard, stop_index: int) -> list[str]:
    seen: list[str] = []

    def record(case: Case) -> CaseRecord:
        seen.append(case.id)
        return fake_builder(lambda _: False)(case)

    fuzzer = make_fuzzer(record, seed=42)
    fuzzer.run(time.monotonic() + 60, 1, shard, stop_index=stop_index)
    return seen


def test_shards_split_campaign_disjointly() -> None:
    whole = case_ids(Shard(1, 1), 90)
    shards = [case_ids(Shard(k, 3), 90) for k in (1, 2, 3)]
    merged = [case for shard in shards for case in shard]

    assert len(whole) > 60
    assert sorted(merged) == sorted(whole)
    assert len(set(shards[0]) & set(shards[1])) == 0
    assert len(set(shards[1]) & set(shards[2])) == 0
    assert len(set(shards[0]) & set(shards[2])) == 0


@pytest.mark.parametrize("text", ["0/3", "4/3", "1", "a/b", "1/0", ""])
def test_shard_rejects_bad_value(text: str) -> None:
    with pytest.raises(UsageError, match="--shard"):
        Shard.parse(text)


def test_shard_of_none_names_a_valid_example() -> None:
    with pytest.raises(UsageError, match="N must be 1 or more, as in 1/4"):
        Shard.parse("0/0")


def test_hypothesis_ci_profile_changes_nothing() -> None:
    """Hypothesis loads a derandomized "ci" profile when CI is set; no effect here."""
    default = case_ids(Shard(1, 1), 40)
    settings.load_profile("ci")
    try:
        under_ci = case_ids(Shard(1, 1), 40)
    finally:
        settings.load_profile("default")

    assert under_ci == default


def test_shrinking_builds_no_case_twice() -> None:
    built: list[str] = []
    events: list[FindingEvent] = []
    execute = fake_builder(two_axes)

    def record(case: Case) -> CaseRecord:
        if fuzzer.phase == "shrink":
            built.append(case.to_json())
        return execute(case)

    fuzzer = make_fuzzer(record, events, first_only=True)
    fuzzer.run(time.monotonic() + 30, shrink_budget=30)
    shrunk = next(event.shrunk for event in events if event.new)

    assert shrunk is not None
    final = shrunk.case.to_json()
    repeated = {key for key in built if key != final and built.count(key) > 1}
    assert repeated == set()
    assert built.count(final) == 1 + CONFIRM_RUNS


def test_finding_and_run_count_the_same_shrink_builds() -> None:
    events: list[FindingEvent] = []
    fuzzer = make_fuzzer(fake_builder(two_axes), events, first_only=True)
    fuzzer.run(time.monotonic() + 30, shrink_budget=30)
    shrunk = next(event.shrunk for event in events if event.new)

    assert shrunk is not None
    assert shrunk.explanation  # the explanation's builds are part of the count
    assert shrunk.builds == fuzzer.stats.shrink_builds
    assert 0 < shrunk.explain_builds < shrunk.builds


def test_one_minimal_leaves_no_reproducing_step() -> None:
    default = default_case(PROFILE, TARGETS)
    case = replace(
        default,
        files=(
            ContextFile("a", size=1, mode=0o4755, uid=1000),
            ContextFile("b", size=513, mode=0o600, gid=65534),
            ContextFile("c", FileKind.DIR, mode=0o700),
        ),
        dockerfile=("FROM scratch", "COPY . /ctx/", "COPY a /a", "COPY b /b"),
        output=Output.TAR,
        platform="linux/amd64",
    )

    def reproduces(candidate: Case) -> bool:
        # Needs the tar output, and a setuid file or the line that copies b.
        setuid = any(f.mode & 0o4000 for f in candidate.files)
        return candidate.output is Output.TAR and (
            setuid or "COPY b /b" in candidate.dockerfile
        )

    minimal = one_minimal(
        case,
        reproduces,
        profile=PROFILE,
        targets=TARGETS,
        deadline=time.monotonic() + 60,
    )

    assert minimal.complete
    assert reproduces(minimal.case)
    steps = list(simplifications(minimal.case, default, PROFILE, TARGETS))
    assert steps
    for label, candidate in steps:
        assert not reproduces(candidate), label


def test_explanation_offers_base_platforms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Other platforms are offered where the base has them and RUN can run."""
    from buildfuzz.base_formats import FORMATS_BY_NAME
    from buildfuzz.minimize import _axis_variants

    monkeypatch.setattr(
        "buildfuzz.strategies.runnable_platforms", lambda: frozenset({"linux/amd64"})
    )
    profile = replace(
        PROFILE,
        build=replace(PROFILE.build, platforms=("", "linux/amd64", "linux/arm64")),
    )
    image = FORMATS_BY_NAME["busybox-multi"].image

    def offered(dockerfile: tuple[str, ...]) -> list[str]:
        case = Case(dockerfile=dockerfile)
        variants = {
            report.axis: choices
            for report, choices in _axis_variants(case, profile, ())
        }
        return [label for label, _ in variants["platform"]]

    assert offered((f"FROM {image}", "COPY . /")) == ["linux/amd64", "linux/arm64"]
    assert offered((f"FROM {image}", "RUN true")) == ["linux/amd64"]


def test_engine_alone_is_reset() -> None:
    """The 1-minimal pass tries the default engine with the case's own builder."""
    from buildfuzz.minimize import simplifications

    targets = (
        Target("26.1", "buildx-docker"),
        Target("20.10", "classic"),
        Target("26.1", "classic"),
    )
    default = default_case(PROFILE, targets)
    case = replace(default, engine="20.10", builder="classic")
    labels = dict(simplifications(case, default, PROFILE, targets))
    assert labels["reset engine"].engine == "26.1"
    assert labels["reset engine"].builder == "classic"
    assert "reset builder" not in labels  # the profile has no 20.10/buildx-docker


def test_finding_page_lists_every_option() -> None:
    from buildfuzz.finding_page import needed_axes

    default = Case()
    case = replace(default, client_user="buildfuzz", churn="append", no_cache=True)
    rows = {axis: value for axis, value, _ in needed_axes(case, default)}
    assert rows["client_user"] == "buildfuzz"
    assert rows["churn"] == "append"
    assert rows["no_cache"] == "True"


def test_confirmation_stops_at_the_deadline() -> None:
    built: list[Case] = []
    execute = fake_builder(two_axes)

    def record(case: Case) -> CaseRecord:
        built.append(case)
        return execute(case)

    fuzzer = make_fuzzer(record)
    case = Case(output=Output.TAR, files=(ContextFile("a", mode=0o4755),))
    shrunk = ShrinkResult(case=case, record=execute(case), builds=0, complete=True)

    fuzzer.confirm(shrunk, PLANTED, time.monotonic() - 1)
    assert built == []
    fuzzer.confirm(shrunk, PLANTED, time.monotonic() + 60)
    assert len(built) == CONFIRM_RUNS
    assert shrunk.reproduced == CONFIRM_RUNS
