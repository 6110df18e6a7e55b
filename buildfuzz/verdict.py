"""Judge a build: pass, expected failure or finding."""

from dataclasses import dataclass
from enum import StrEnum

from buildfuzz.build import BuildResult
from buildfuzz.case import Case
from buildfuzz.rules import Rule, matching_rule
from buildfuzz.signature import (
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
    ENGINE_HEALTH = "engine-health"  # the daemon died or stopped answering
    TIMEOUT = "timeout"  # the build hung


@dataclass(frozen=True)
class Evaluation:
    verdict: Verdict
    signature: Signature | None = None
    oracle: Oracle | None = None
    rule: str | None = None


def judge(
    case: Case,
    result: BuildResult,
    *,
    classic: bool,
    rules: tuple[Rule, ...],
    strict: bool = False,
    daemon_log_tail: str = "",
) -> Evaluation:
    """Decide the verdict of ``result``, the build of ``case``."""
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
    if result.succeeded:
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

    return Evaluation(Verdict.FINDING, signature, Oracle.BUILD_ERROR)
