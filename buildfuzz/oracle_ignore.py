""".dockerignore patterns with the semantics of moby/patternmatcher.

The docker CLI, the classic builder and BuildKit's context transfer all use
moby/patternmatcher (or its predecessor in moby's pkg/fileutils). This is a
separate implementation of the same rules, written from their description,
for the tree oracle's model of what a build context holds:

* Lines are trimmed; empty lines and lines starting with ``#`` are skipped.
* A leading ``!`` makes the pattern an exception (re-include).
* Each pattern is cleaned like Go's ``filepath.Clean``: ``./a`` is ``a``,
  ``a/`` is ``a``, ``a//b/../c`` is ``a/c``; then a leading ``/`` is removed.
* ``*`` matches any run of characters but ``/``; ``?`` one character but
  ``/``; ``[...]`` a character class; ``\\`` escapes the next character;
  ``**`` matches any number of directories, including none.
* A path is excluded when the last pattern that matches it, or one of its
  parent directories, is not an exception: later patterns win.
"""

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class UnsupportedPattern(ValueError):
    """A pattern whose meaning this module does not reproduce exactly."""


class _Kind(Enum):
    EXACT = "exact"
    PREFIX = "prefix"  # "dir/**": every path that starts with "dir/"
    SUFFIX = "suffix"  # "**/a": every path that ends with "/a", and "a"
    REGEX = "regex"


@dataclass(frozen=True)
class Pattern:
    text: str  # the cleaned pattern, without its "!"
    exception: bool
    kind: _Kind
    regex: re.Pattern[str] | None = None

    def matches(self, path: str) -> bool:
        if self.kind is _Kind.EXACT:
            return path == self.text
        if self.kind is _Kind.PREFIX:
            return path.startswith(self.text[:-2])
        if self.kind is _Kind.SUFFIX:
            suffix = self.text[2:]
            if path.endswith(suffix):
                return True
            return suffix.startswith("/") and path == suffix[1:]
        assert self.regex is not None
        return self.regex.match(path) is not None


def clean_path(path: str) -> str:
    """Return ``path`` lexically cleaned, as Go's ``path.Clean`` does."""
    if path == "":
        return "."
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    cleaned = "/".join(parts)
    if rooted:
        return "/" + cleaned
    return cleaned or "."


def read_ignore_file(lines: Iterable[str]) -> list[str]:
    """Return the patterns of a .dockerignore file given as lines."""
    patterns = []
    for number, raw in enumerate(lines):
        line = raw.removeprefix("\ufeff") if number == 0 else raw
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        if exception:
            line = line[1:].strip()
        if line:
            line = clean_path(line)
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
        patterns.append("!" + line if exception else line)
    return patterns


def compile_patterns(patterns: Iterable[str]) -> list[Pattern]:
    """Compile patterns as a matcher does; raise UnsupportedPattern when unsure."""
    compiled = []
    for raw in patterns:
        text = raw.strip()
        if not text:
            continue
        text = clean_path(text)
        exception = text.startswith("!")
        if exception:
            if len(text) == 1:
                raise UnsupportedPattern('illegal exclusion pattern: "!"')
            text = text[1:]
        compiled.append(_compile(text, exception))
    return compiled


def _compile(text: str, exception: bool) -> Pattern:
    regex = "^"
    kind = _Kind.EXACT
    index = 0
    position = 0  # characters consumed so far, counting "**" as one
    while index < len(text):
        char = text[index]
        index += 1
        if char == "*":
            if index < len(text) and text[index] == "*":
                index += 1
                if index < len(text) and text[index] == "/":
                    index += 1
                if index == len(text):
                    if kind is _Kind.EXACT:
                        kind = _Kind.PREFIX
                    else:
                        regex += ".*"
                        kind = _Kind.REGEX
                else:
                    regex += "(?:.*/)?"
                    kind = _Kind.REGEX
                if position == 0:
                    kind = _Kind.SUFFIX
            else:
                regex += "[^/]*"
                kind = _Kind.REGEX
        elif char == "?":
            regex += "[^/]"
            kind = _Kind.REGEX
        elif char == "\\":
            if index == len(text):
                regex += re.escape("\\")
            else:
                escaped = text[index]
                index += 1
                if escaped.isalnum():
                    # Go's regexp reads \d, \w and friends as classes.
                    raise UnsupportedPattern(f"escaped letter in {text!r}")
                regex += re.escape(escaped)
                kind = _Kind.REGEX
        elif char == "[":
            end = text.find("]", index + 1)
            body = text[index:end] if end >= 0 else ""
            if end < 0 or not body or any(c in body for c in "[\\:/"):
                raise UnsupportedPattern(f"character class in {text!r}")
            negate = body.startswith("^")
            members = body[1:] if negate else body
            if not members:
                raise UnsupportedPattern(f"empty character class in {text!r}")
            regex += "[" + ("^" if negate else "") + _class_members(members) + "]"
            index = end + 1
            kind = _Kind.REGEX
        elif char == "]":
            raise UnsupportedPattern(f"unbalanced ] in {text!r}")
        elif char == "^":
            # Unescaped, it stays an anchor (start of text) in both regexps.
            regex += "^"
        else:
            regex += re.escape(char)
        position += 1
    if kind in (_Kind.SUFFIX, _Kind.PREFIX, _Kind.EXACT):
        return Pattern(text, exception, kind)
    return Pattern(text, exception, kind, re.compile(regex + r"\Z", re.DOTALL))


def _class_members(members: str) -> str:
    """Escape the members of a character class, keeping ranges such as a-z."""
    out = []
    for index, char in enumerate(members):
        is_range = char == "-" and 0 < index < len(members) - 1
        out.append("-" if is_range else re.escape(char))
    return "".join(out)


class IgnoreMatcher:
    """Decide which context paths a list of .dockerignore patterns excludes."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = compile_patterns(patterns)

    @property
    def has_exceptions(self) -> bool:
        return any(pattern.exception for pattern in self.patterns)

    def excluded(self, path: str) -> bool:
        """Return whether ``path`` (relative, slash-separated) is excluded."""
        path = clean_path(path)
        if path == ".":
            return False
        parents = path.split("/")[:-1]
        matched = False
        for pattern in self.patterns:
            if pattern.exception != matched:
                continue  # only a later exception can undo, only an exclusion do
            match = pattern.matches(path)
            if not match:
                match = any(
                    pattern.matches("/".join(parents[: depth + 1]))
                    for depth in range(len(parents))
                )
            if match:
                matched = not pattern.exception
        return matched

    def excluded_ancestor(self, path: str) -> bool:
        """Return whether a parent directory of ``path`` is excluded.

        A path that is included although a parent is excluded depends on how
        each tool walks the context (the docker CLI enters an excluded
        directory only when an exception pattern starts with its name), so
        the model leaves such paths out of comparisons.
        """
        parts = clean_path(path).split("/")
        return any(
            self.excluded("/".join(parts[:depth])) for depth in range(1, len(parts))
        )
