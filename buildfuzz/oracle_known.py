"""Known differences: tree differences that a builder is known to give.

Rules live in ``strategies/rules/differences.toml``. Each names the kind of
difference, where it applies (builders, engines, outputs, node types, the
instruction that made the path) and the values it covers, with the reason
the difference is known behaviour rather than a bug. The tree and the
differential oracle drop every difference a rule explains.
"""

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildfuzz.errors import DataFileError
from buildfuzz.oracle_tree import KINDS, Difference
from buildfuzz.paths import strategies_dir

ORACLES = ("tree", "differential")


@dataclass(frozen=True)
class Side:
    """The origin of a tree: the engine, builder and output of its build."""

    engine: str
    builder: str
    output: str

    def __str__(self) -> str:
        return f"{self.engine}/{self.builder}/{self.output}"


@dataclass(frozen=True)
class KnownDifference:
    id: str
    reason: str
    kinds: tuple[str, ...]
    oracles: tuple[str, ...] = ORACLES
    builders: tuple[str, ...] = ()  # one side's builder must be listed
    except_builders: tuple[str, ...] = ()  # ...and that side's builder not these
    engines: tuple[str, ...] = ()  # that same side's engine must be listed
    outputs: tuple[str, ...] = ()
    node_types: tuple[str, ...] = ()
    origins: tuple[str, ...] = ()
    path: re.Pattern[str] | None = None
    expected: re.Pattern[str] | None = None  # the value the model or side A has
    actual: re.Pattern[str] | None = None

    def explains(self, oracle: str, difference: Difference, sides: list[Side]) -> bool:
        if oracle not in self.oracles or difference.kind not in self.kinds:
            return False
        if not any(self._side_matches(side) for side in sides):
            return False
        if self.node_types and difference.node_type not in self.node_types:
            return False
        if self.origins and difference.origin not in self.origins:
            return False
        checks = (
            (self.path, difference.path),
            (self.expected, difference.expected),
            (self.actual, difference.actual),
        )
        return all(p is None or p.search(value) for p, value in checks)

    def _side_matches(self, side: Side) -> bool:
        return (
            (not self.builders or side.builder in self.builders)
            and side.builder not in self.except_builders
            and (not self.engines or side.engine in self.engines)
            and (not self.outputs or side.output in self.outputs)
        )


def load_known_differences(path: Path | None = None) -> tuple[KnownDifference, ...]:
    path = path or strategies_dir() / "rules" / "differences.toml"
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        return ()
    except tomllib.TOMLDecodeError as error:
        raise DataFileError(path, f"invalid TOML: {error}") from None
    entries = data.get("difference", [])
    if not isinstance(entries, list):
        raise DataFileError(path, "known differences must be [[difference]] tables")
    try:
        return tuple(_known(entry) for entry in entries)
    except (KeyError, TypeError, ValueError, re.error) as error:
        raise DataFileError(path, f"invalid known difference: {error}") from None


_LISTS = (
    "kinds",
    "oracles",
    "builders",
    "except_builders",
    "engines",
    "outputs",
    "node_types",
    "origins",
)
_PATTERNS = ("path", "expected", "actual")


def _known(entry: dict[str, Any]) -> KnownDifference:
    unknown = sorted(set(entry) - {"id", "reason", *_LISTS, *_PATTERNS})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {entry.get('id')!r}")
    values: dict[str, Any] = {"id": str(entry["id"]), "reason": str(entry["reason"])}
    for key in _LISTS:
        if key in entry:
            names = entry[key]
            if not isinstance(names, list) or not all(
                isinstance(n, str) for n in names
            ):
                raise ValueError(f"{key} of {values['id']!r} must be a list of names")
            values[key] = tuple(names)
    for kind in values.get("kinds", ()):
        if kind not in KINDS:
            raise ValueError(f"{values['id']!r}: unknown kind {kind!r}")
    if "kinds" not in values:
        raise ValueError(f"{values['id']!r} needs kinds")
    for key in _PATTERNS:
        if key in entry:
            values[key] = re.compile(str(entry[key]))
    return KnownDifference(**values)


def unexplained(
    differences: list[Difference],
    known: tuple[KnownDifference, ...],
    oracle: str,
    sides: list[Side],
) -> tuple[list[Difference], list[str]]:
    """Split off the differences a rule explains; return the rest and rule ids."""
    left = []
    used: list[str] = []
    for difference in differences:
        rule = next((k for k in known if k.explains(oracle, difference, sides)), None)
        if rule is None:
            left.append(difference)
        elif rule.id not in used:
            used.append(rule.id)
    return left, used
