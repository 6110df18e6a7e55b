"""The fuzzing loop: generate cases, judge builds, shrink new findings.

Generation calls a Hypothesis test through ``fuzz_one_input`` with byte
buffers from a seeded random generator, so one seed and profile give the
same cases on every machine with the same builders. Each new signature is
then shrunk by a second Hypothesis test that fails only when a build
reproduces that signature, with the ``reuse`` and ``shrink`` phases only.

Hypothesis settings are always given in full: its ``ci`` profile, loaded
when a CI variable is set, would otherwise switch the database off and
derandomize, and its 200 ms deadline would fail every build.
"""

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from hypothesis import HealthCheck, Verbosity, given, reject, settings
from hypothesis import Phase as HypothesisPhase
from hypothesis.database import InMemoryExampleDatabase
from hypothesis.errors import HypothesisException
from hypothesis.strategies import SearchStrategy

from buildfuzz.case import Case
from buildfuzz.minimize import AxisReport, explain, one_minimal
from buildfuzz.profile import Profile
from buildfuzz.session import CaseRecord, EngineUnavailable
from buildfuzz.shard import Shard
from buildfuzz.signature import Signature
from buildfuzz.strategies import Target
from buildfuzz.verdict import Verdict

log = structlog.get_logger(__name__)

# Bytes handed to one generated case; Hypothesis stops drawing at 8 KiB.
BUFFER_SIZE = 8192
CONFIRM_RUNS = 2  # re-runs of the shrunk case that measure its reproduction rate
RERUNS = 3  # tries to reproduce a new finding before shrinking it
# Builds that Hypothesis' shrink phase may use for one finding. Its later
# passes try many cases that change several choices at once, and most of
# those pass. The 1-minimal pass that follows costs fewer builds per step,
# and it makes the result 1-minimal whatever Hypothesis left.
HYPOTHESIS_SHRINK_BUILDS = 20
FLAKY_BELOW = 0.8  # a finding reproducing less often than this is labelled flaky


class SignatureReproduced(Exception):
    """Raised inside the shrink test when a build gives the target signature."""


class _ShrinkStopped(BaseException):
    """Raised inside the shrink test to end Hypothesis' search at once.

    Hypothesis records an ``Exception`` as a failure of the test and goes on
    shrinking it, but lets other ``BaseException`` types through, as it
    does ``KeyboardInterrupt``.
    """


@dataclass
class ShrinkResult:
    case: Case
    record: CaseRecord
    builds: int
    complete: bool
    reproduced: int = 0
    attempts: int = 0
    explanation: list[AxisReport] = field(default_factory=list)
    explain_builds: int = 0  # the part of ``builds`` that explained the axes
    shrunk: bool = True  # false when no re-run reproduced the finding
    tries: int = 1  # builds a simplification may take to reproduce
    interrupted: bool = False  # Ctrl-C or SIGTERM cut shrinking short
    # Every case built while shrinking, by its JSON: the record that
    # reproduced the signature, or None. Later steps reuse these outcomes
    # instead of building the same case again.
    outcomes: dict[str, CaseRecord | None] = field(default_factory=dict, repr=False)

    @property
    def rate(self) -> float:
        """How often re-runs reproduced the signature, from 0 to 1."""
        return self.reproduced / self.attempts if self.attempts else 0.0

    @property
    def flaky(self) -> bool:
        return self.rate < FLAKY_BELOW


@dataclass
class FindingEvent:
    """A finding as the loop reports it to the results store."""

    signature: Signature
    original: CaseRecord
    shrunk: ShrinkResult | None
    new: bool


@dataclass
class Stats:
    cases: int = 0
    passes: int = 0
    expected: int = 0
    findings: int = 0
    shrink_builds: int = 0
    skipped: int = 0  # cases whose engine could not start
    per_target: dict[str, int] = field(default_factory=dict)
    per_verdict_target: dict[str, dict[str, int]] = field(default_factory=dict)

    def count(self, record: CaseRecord) -> None:
        self.cases += 1
        verdict = record.evaluation.verdict
        if verdict is Verdict.PASS:
            self.passes += 1
        elif verdict is Verdict.EXPECTED:
            self.expected += 1
        else:
            self.findings += 1
        target = f"{record.case.engine_label}/{record.case.builder}"
        self.per_target[target] = self.per_target.get(target, 0) + 1
        by_verdict = self.per_verdict_target.setdefault(target, {})
        by_verdict[verdict] = by_verdict.get(verdict, 0) + 1


def _settings(
    database: InMemoryExampleDatabase | None, **overrides: object
) -> settings:
    values: dict[str, object] = {
        "database": database,
        "deadline": None,
        "derandomize": False,
        "max_examples": 1_000_000,
        "suppress_health_check": list(HealthCheck),
        "report_multiple_bugs": False,
        "print_blob": False,
        "verbosity": Verbosity.quiet,
        "phases": [HypothesisPhase.reuse, HypothesisPhase.shrink],
    }
    values.update(overrides)
    return settings(**values)  # type: ignore[arg-type]


class Fuzzer:
    """Run cases from ``strategy`` until the budget is spent."""

    def __init__(
        self,
        strategy: SearchStrategy[Case],
        execute: Callable[[Case], CaseRecord],
        *,
        profile: Profile,
        targets: tuple[Target, ...],
        seed: int,
        known: Callable[[Signature], bool],
        on_finding: Callable[[FindingEvent], None],
        may_continue: Callable[[], bool] = lambda: True,
    ) -> None:
        self.strategy = strategy
        self.execute = execute
        self.profile = profile
        self.targets = targets
        self.seed = seed
        self.known = known
        self.on_finding = on_finding
        self.may_continue = may_continue  # checked before every new case
        self.stats = Stats()
        self.stopped = False
        self.interrupted = False
        self.phase = "fuzz"  # "shrink" while a new finding is being shrunk
        self.next_index = 0  # the input a later run continues from
        self._generate = self._generation_test()

    def _generation_test(self) -> Callable[[bytes], object]:
        captured = self._captured = []  # type: list[CaseRecord]

        @_settings(None)
        @given(self.strategy)
        def generate(case: Case) -> None:
            try:
                captured.append(self.execute(case))
            except EngineUnavailable:
                self.stats.skipped += 1
                reject()  # an invalid input, as far as Hypothesis is concerned

        return generate.hypothesis.fuzz_one_input  # type: ignore[attr-defined]

    def buffer(self, index: int) -> bytes:
        """Return the input bytes of case ``index``: a pure function of the seed."""
        return random.Random(f"{self.seed}:{index}").randbytes(BUFFER_SIZE)

    def run(
        self,
        deadline: float,
        shrink_budget: float,
        shard: Shard | None = None,
        *,
        stop_index: int | None = None,
        start_index: int = 0,
    ) -> Stats:
        """Run cases until ``deadline``; a shard runs only its share of them.

        ``stop_index`` ends the run before the input of that index instead.
        """
        shard = shard or Shard(1, 1)
        index = shard.index - 1
        while index < start_index:  # the first input of this shard from there
            index += shard.count
        self.next_index = index
        while not self.stopped and time.monotonic() < deadline:
            if stop_index is not None and index >= stop_index:
                break
            if not self.may_continue():
                break
            buffer = self.buffer(index)
            index += shard.count
            self.next_index = index
            self._captured.clear()
            self._generate(buffer)
            if not self._captured:
                continue  # the buffer did not describe a valid case

            record = self._captured[0]
            self.stats.count(record)
            if record.evaluation.verdict is Verdict.FINDING:
                self._handle_finding(buffer, record, deadline, shrink_budget)

        return self.stats

    def _handle_finding(
        self, buffer: bytes, record: CaseRecord, deadline: float, shrink_budget: float
    ) -> None:
        signature = record.evaluation.signature
        assert signature is not None
        if self.known(signature):
            self.on_finding(FindingEvent(signature, record, None, new=False))
            return

        shrink_deadline = min(deadline, time.monotonic() + shrink_budget)
        shrunk = None
        self.phase = "shrink"
        try:
            if time.monotonic() < shrink_deadline:
                log.info(
                    "shrinking new finding", signature=str(signature), id=signature.id
                )
                shrunk = self.shrink(buffer, record, signature, shrink_deadline)
            else:
                log.info("budget spent; writing the finding unshrunk", id=signature.id)
            if shrunk is not None and shrunk.shrunk and not self.interrupted:
                self.minimize(shrunk, signature, shrink_deadline)
                self.confirm(shrunk, signature, shrink_deadline)
        except KeyboardInterrupt:
            log.warning("interrupted; writing the finding as it is", id=signature.id)
            self.interrupted = self.stopped = True
            if shrunk is not None:
                shrunk.interrupted = True
                shrunk.complete = False
        finally:
            self.phase = "fuzz"
        self.on_finding(FindingEvent(signature, record, shrunk, new=True))

    def shrink(
        self,
        buffer: bytes,
        original: CaseRecord,
        signature: Signature,
        deadline: float,
    ) -> ShrinkResult:
        """Shrink the case of ``buffer`` while it reproduces ``signature``.

        A case that does not fail the same way on any re-run comes back
        unshrunk, with ``shrunk`` false and its measured rate.
        """
        best: list[CaseRecord] = []
        outcomes: dict[str, CaseRecord | None] = {}
        builds = 0
        budget_spent = False
        tries = 1  # builds a shrink step may take to reproduce; see below
        build_limit: int | None = None  # set when the re-runs are done

        @_settings(InMemoryExampleDatabase())
        @given(self.strategy)
        def reproduces(case: Case) -> None:
            nonlocal builds, budget_spent
            key = case.to_json()
            if key in outcomes:
                record = outcomes[key]
            elif time.monotonic() >= deadline:
                budget_spent = True
                raise _ShrinkStopped
            elif build_limit is not None and builds >= build_limit:
                # The 1-minimal pass goes on from the best case so far.
                raise _ShrinkStopped
            else:
                record, used = self._try(case, signature, tries)
                builds += used
                outcomes[key] = record
                if record is not None:
                    best.append(record)
            if record is not None:
                raise SignatureReproduced(signature.id)

        # Re-running the original case stores it in the database, and only a
        # case that fails again is worth shrinking. A flaky one gets a few
        # tries; the ones that did not reproduce count against its rate.
        reruns = 0
        while not best and reruns < RERUNS and time.monotonic() < deadline:
            reruns += 1
            outcomes.clear()
            try:
                reproduces.hypothesis.fuzz_one_input(buffer)  # type: ignore[attr-defined]
            except (SignatureReproduced, _ShrinkStopped):
                pass
        # A finding that needed n tries to reproduce has a rate of about 1/n;
        # a shrink step is accepted when it reproduces within n tries, that is
        # at the rate of the original, so flakiness cannot pass for progress.
        tries = max(1, reruns)
        if not best:
            log.info("finding did not reproduce; not shrinking", id=signature.id)
            self.stats.shrink_builds += builds
            return ShrinkResult(
                case=original.case,
                record=original,
                builds=builds,
                complete=False,
                attempts=reruns,
                shrunk=False,
            )
        log.info("finding reproduced", id=signature.id, tries=reruns)
        build_limit = builds + HYPOTHESIS_SHRINK_BUILDS

        try:
            reproduces()
        except (
            SignatureReproduced,
            HypothesisException,
            ExceptionGroup,
            _ShrinkStopped,
        ):
            pass  # the minimal case is in ``best``; Hypothesis' report is not used
        except KeyboardInterrupt:
            # Keep the smallest case so far; the run stops after writing it.
            log.warning("shrinking interrupted; keeping the best case so far")
            self.interrupted = self.stopped = True
            budget_spent = True
        self.stats.shrink_builds += builds

        return ShrinkResult(
            case=best[-1].case,
            record=best[-1],
            builds=builds,
            complete=not budget_spent,
            reproduced=1,
            attempts=reruns,
            tries=tries,
            interrupted=self.interrupted,
            outcomes=outcomes,
        )

    def _try(
        self, case: Case, signature: Signature, tries: int
    ) -> tuple[CaseRecord | None, int]:
        """Build ``case`` up to ``tries`` times; return the reproducing record."""
        for attempt in range(1, tries + 1):
            try:
                record = self.execute(case)
            except EngineUnavailable:
                reject()
            # A rule-explained failure with the same text is not the finding;
            # shrinking must not drift into it.
            if self._is_target(record, signature):
                return record, attempt
        return None, tries

    def minimize(
        self, shrunk: ShrinkResult, signature: Signature, deadline: float
    ) -> None:
        """Make the shrunk case 1-minimal, then explain which axes matter."""
        outcomes = shrunk.outcomes
        builds = 0

        def reproduces(case: Case) -> bool:
            nonlocal builds
            key = case.to_json()
            if key in outcomes:
                return outcomes[key] is not None
            for _ in range(shrunk.tries):
                try:
                    record = self.execute(case)
                except EngineUnavailable:
                    return False  # not stored: the engine failed, not the case
                builds += 1
                self.stats.shrink_builds += 1
                if self._is_target(record, signature):
                    outcomes[key] = record
                    return True
            outcomes[key] = None
            return False

        minimal = one_minimal(
            shrunk.case,
            reproduces,
            profile=self.profile,
            targets=self.targets,
            deadline=deadline,
        )
        shrunk.complete = shrunk.complete and minimal.complete
        minimizing = builds
        if minimal.case != shrunk.case:
            record = outcomes[minimal.case.to_json()]
            assert record is not None  # one_minimal keeps only reproducing cases
            shrunk.case = minimal.case
            shrunk.record = record
        shrunk.explanation = explain(
            shrunk.case,
            reproduces,
            profile=self.profile,
            targets=self.targets,
            deadline=deadline,
        )
        # The explanation's builds count too, as they do in the run's stats.
        shrunk.builds += builds
        shrunk.explain_builds = builds - minimizing

    @staticmethod
    def _is_target(record: CaseRecord, signature: Signature) -> bool:
        evaluation = record.evaluation
        return (
            evaluation.verdict is Verdict.FINDING and evaluation.signature == signature
        )

    def confirm(
        self, shrunk: ShrinkResult, signature: Signature, deadline: float
    ) -> None:
        """Re-run the shrunk case to measure how often it reproduces.

        No run starts after ``deadline``: the rate then rests on the runs
        made while shrinking.
        """
        for _ in range(CONFIRM_RUNS):
            if time.monotonic() >= deadline:
                log.info("budget spent; not confirming the shrunk case")
                break
            try:
                record = self.execute(shrunk.case)
            except EngineUnavailable:
                break
            shrunk.attempts += 1
            if self._is_target(record, signature):
                shrunk.reproduced += 1
