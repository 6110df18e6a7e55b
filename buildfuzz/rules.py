"""Expected-failure rules: failures the builder is right to give.

Rules live in ``strategies/rules/NAME.toml``. A rule names the cases it
applies to (builders, engines, a pattern over the Dockerfile and
.dockerignore) and the message the builder must give. A failure of such a
case with such a message is an expected failure, not a finding. A rule
marked ``always`` claims more: every case it applies to fails with its
message, so such a case that builds fine is a finding about the rule.
"""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildfuzz.case import Case
from buildfuzz.definitions import Definitions
from buildfuzz.errors import DataFileError, UsageError
from buildfuzz.paths import strategies_dir


@dataclass(frozen=True)
class Rule:
    id: str
    reason: str
    message: re.Pattern[str]
    builders: tuple[str, ...] = ()
    engines: tuple[str, ...] = ()
    dockerfile: re.Pattern[str] | None = None
    dockerignore: re.Pattern[str] | None = None
    files: re.Pattern[str] | None = None
    options: re.Pattern[str] | None = None  # over the output and build flags
    always: bool = False  # every case it applies to must fail with its message

    def applies_to(self, case: Case) -> bool:
        if self.builders and case.builder not in self.builders:
            return False
        if self.engines and case.engine not in self.engines:
            return False
        if self.dockerfile and not self.dockerfile.search(case.dockerfile_text):
            return False
        if self.dockerignore:
            # Both ignore files: BuildKit reads <Dockerfile>.dockerignore first.
            patterns = (case.dockerignore or ()) + (case.dockerfile_dockerignore or ())
            text = "\n".join(patterns)
            if not self.dockerignore.search(text):
                return False
        if self.files and not self.files.search(context_listing(case)):
            return False
        if self.options and not self.options.search(option_listing(case)):
            return False
        return True

    def explains(self, case: Case, log: str) -> bool:
        return self.applies_to(case) and bool(self.message.search(log))


def load_rules(name: str) -> tuple[Rule, ...]:
    """Load the rule set ``name``; the name "none" gives no rules."""
    if name in ("", "none"):
        return ()
    path = (
        Path(name)
        if name.endswith(".toml")
        else strategies_dir() / "rules" / f"{name}.toml"
    )
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        raise DataFileError(
            path,
            f"rule set {name!r} not found; a profile's rules names a file of "
            "strategies/rules/ without .toml, or a .toml path relative to the profile",
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise DataFileError(path, f"invalid TOML: {error}") from None

    entries = data.get("rule", [])
    if not isinstance(entries, list):
        raise DataFileError(path, "rules must be [[rule]] tables")
    try:
        return tuple(_rule(entry) for entry in entries)
    except (KeyError, TypeError, ValueError, re.error) as error:
        raise DataFileError(path, f"invalid rule: {error}") from None


def _rule(entry: dict[str, Any]) -> Rule:
    allowed = {"id", "reason", "message", "builders", "engines"}
    allowed |= {"dockerfile", "dockerignore", "files", "options", "always"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in rule {entry.get('id')!r}")

    for key in ("builders", "engines"):
        names = entry.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(
                f"{key} of rule {entry.get('id')!r} must be a list of names"
            )

    always = entry.get("always", False)
    if not isinstance(always, bool):
        raise ValueError(f"always of rule {entry.get('id')!r} must be true or false")

    for key in ("id", "reason", "message"):
        if key not in entry:
            raise ValueError(f"rule {entry.get('id')!r} has no {key} key")

    def pattern(key: str) -> re.Pattern[str]:
        try:
            return re.compile(entry[key])
        except (re.error, TypeError) as error:
            raise ValueError(
                f"{key} of rule {entry.get('id')!r} is not a valid regular "
                f"expression: {error}"
            ) from None

    def optional(key: str) -> re.Pattern[str] | None:
        return pattern(key) if key in entry else None

    return Rule(
        id=str(entry["id"]),
        reason=str(entry["reason"]),
        message=pattern("message"),
        builders=tuple(entry.get("builders", ())),
        engines=tuple(entry.get("engines", ())),
        dockerfile=optional("dockerfile"),
        dockerignore=optional("dockerignore"),
        files=optional("files"),
        options=optional("options"),
        always=always,
    )


def check_rule_names(rules: tuple[Rule, ...], definitions: Definitions) -> None:
    """Raise UsageError for a rule that names an undefined builder or engine."""
    for rule in rules:
        for kind, names, known in (
            ("builder", rule.builders, definitions.builders),
            ("engine", rule.engines, definitions.engines),
        ):
            unknown = [name for name in names if name not in known]
            if unknown:
                raise UsageError(
                    f"rule {rule.id!r} names {kind} {unknown[0]!r}, which is not "
                    f"defined; defined: {', '.join(sorted(known))}"
                )


def context_listing(case: Case) -> str:
    """List the context one file a line, as ``KIND PATH -> TARGET``."""
    lines = []
    for entry in case.files:
        suffix = f" -> {entry.target}" if entry.target else ""
        lines.append(f"{entry.kind} {entry.path}{suffix}")
    return "\n".join(lines)


def option_listing(case: Case) -> str:
    """Return the case's output and build flags as one line, for rules.

    A non-root client shows as ``--client-user=NAME`` and a changing context
    as ``--context-churn=MODE``; neither is a docker flag.
    """
    words = [f"--output={case.output}", *case.option_arguments("CONTEXT")]
    if case.platform:
        words.append(f"--platform={case.platform}")
    if case.client_user:
        words.append(f"--client-user={case.client_user}")
    if case.churn:
        words.append(f"--context-churn={case.churn}")
    return " ".join(words)


def matching_rule(rules: tuple[Rule, ...], case: Case, log: str) -> Rule | None:
    return next((rule for rule in rules if rule.explains(case, log)), None)


# Of the cases that an `always` rule expects to fail, one in this many
# (chosen by case id) is built: enough to notice a rule that no longer holds.
RULE_CHECK_EVERY = 8


def worth_building(rules: tuple[Rule, ...], case: Case) -> bool:
    """Return False for most cases that an ``always`` rule expects to fail."""
    if certain_rule(rules, case) is None:
        return True
    return int(case.id[:8], 16) % RULE_CHECK_EVERY == 0


def certain_rule(rules: tuple[Rule, ...], case: Case) -> Rule | None:
    """Return an ``always`` rule that applies to ``case``, or None."""
    return next((rule for rule in rules if rule.always and rule.applies_to(case)), None)
