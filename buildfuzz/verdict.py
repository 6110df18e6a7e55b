"""Judge a build: pass, expected failure or finding.

A build's own outcome decides first: a failure is a finding unless a rule
explains it. Oracles then judge what a build left behind (its file tree,
its image, the daemon's health); their reports turn a pass or an expected
failure into a finding, unless an expected-failure rule explains the
report's message too.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from buildfuzz.build import BuildResult
from buildfuzz.case import Case
from buildfuzz.rules import Rule, certain_rule, matching_rule
from buildfuzz.signature import (
    Phase,
    Signature,
    buildx_signature,
    classic_signature,
    engine_signature,
    load_signature,
    timeout_signature,
)


class Verdict(StrEnum):
    PASS = "pass"
    EXPECTED = "expected"
    FINDING = "finding"


class Oracle(StrEnum):
    """What decided that a build is a finding."""

    BUILD_ERROR = "build-error"  # the build failed and no rule explains it
    ENGINE_HEALTH = "engine-health"  # the daemon died, panicked or leaked
    TIMEOUT = "timeout"  # the build hung
    TREE = "tree"  # the built file tree is not the one the case implies
    DIFFERENTIAL = "differential"  # two builders gave different trees
    SECRET = "secret"  # a secret value is in the image or its output
    RULE = "rule"  # an `always` rule's case built, or failed another way


# The order in which oracle reports win when several fire for one build.
ORACLE_ORDER = (
    Oracle.ENGINE_HEALTH,
    Oracle.SECRET,
    Oracle.TREE,
    Oracle.DIFFERENTIAL,
)


@dataclass(frozen=True)
class Evaluation:
    verdict: Verdict
    signature: Signature | None = None
    oracle: Oracle | None = None
    rule: str | None = None
    detail: str = ""  # what the oracle saw, such as a tree diff (diff.txt)


@dataclass(frozen=True)
class OracleReport:
    """An oracle's objection to a build, with the text that explains it."""

    oracle: Oracle
    signature: Signature
    detail: str = ""


def judge(
    case: Case,
    result: BuildResult,
    *,
    classic: bool,
    rules: tuple[Rule, ...],
    strict: bool = False,
    daemon_log_tail: str = "",
    reports: Sequence[OracleReport] = (),
) -> Evaluation:
    """Decide the verdict of ``result``, the build of ``case``.

    ``reports`` come from the oracles that inspected the build; the first
    one in ``ORACLE_ORDER`` that no rule explains makes a pass or an
    expected failure a finding.
    """
    evaluation = _judge_build(
        case,
        result,
        classic=classic,
        rules=rules,
        strict=strict,
        daemon_log_tail=daemon_log_tail,
    )
    if evaluation.verdict is Verdict.FINDING:
        return evaluation
    for report in sorted(reports, key=lambda r: ORACLE_ORDER.index(r.oracle)):
        text = f"{report.signature.message}\n{report.detail}"
        rule = None if strict else matching_rule(rules, case, text)
        if rule is None:
            return Evaluation(
                Verdict.FINDING, report.signature, report.oracle, detail=report.detail
            )
        if evaluation.verdict is Verdict.PASS:
            evaluation = Evaluation(Verdict.EXPECTED, report.signature, rule=rule.id)
    return evaluation


def _judge_build(
    case: Case,
    result: BuildResult,
    *,
    classic: bool,
    rules: tuple[Rule, ...],
    strict: bool,
    daemon_log_tail: str,
) -> Evaluation:
    if not result.engine_alive:
        return Evaluation(
            Verdict.FINDING, engine_signature(daemon_log_tail), Oracle.ENGINE_HEALTH
        )
    if result.timed_out:
        signature = timeout_signature()
        rule = None if strict else matching_rule(rules, case, signature.message)
        if rule is not None:
            return Evaluation(Verdict.EXPECTED, signature, rule=rule.id)
        return Evaluation(Verdict.FINDING, signature, Oracle.TIMEOUT)
    certain = None if strict else certain_rule(rules, case)
    if result.succeeded:
        if certain is not None:
            return Evaluation(
                Verdict.FINDING,
                Signature(Phase.RESULT, f"rule {certain.id}: the build passed"),
                Oracle.RULE,
                detail=f"Rule {certain.id} says that every case it applies to "
                f"fails ({certain.reason}), but this one built.",
            )
        return Evaluation(Verdict.PASS)

    if result.load_log:
        signature = load_signature(result.load_log)
    elif classic:
        signature = classic_signature(result.log)
    else:
        signature = buildx_signature(result.log)

    rule = None if strict else matching_rule(rules, case, result.log + result.load_log)
    if rule is not None:
        return Evaluation(Verdict.EXPECTED, signature, rule=rule.id)

    if certain is not None:
        return Evaluation(
            Verdict.FINDING,
            signature,
            Oracle.RULE,
            detail=f"Rule {certain.id} applies to this case, but the build "
            f"failed with another message than /{certain.message.pattern}/.",
        )
    return Evaluation(Verdict.FINDING, signature, Oracle.BUILD_ERROR)
