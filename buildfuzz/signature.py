"""Failure signatures: the phase of a failure and its normalised message.

Two builds that fail for the same reason must get the same signature even
when digests, paths, step numbers, temporary names or exit codes differ;
failures with different causes must get different ones.
"""

import hashlib
import re
from dataclasses import dataclass
from enum import StrEnum


class Phase(StrEnum):
    """Where in a build a failure happened."""

    CONTEXT = "context"  # reading or sending the build context
    OPTIONS = "options"  # the client rejected a build option before building
    DOCKERFILE = "dockerfile"  # reading or parsing the Dockerfile
    PULL = "pull"  # resolving or pulling a base image
    SOLVE = "solve"  # running a build step
    EXPORT = "export"  # exporting the result
    LOAD = "load"  # `docker load` of an exported image
    ENGINE = "engine"  # the daemon crashed or stopped answering
    HANG = "hang"  # the build did not finish within its timeout


@dataclass(frozen=True)
class Signature:
    phase: Phase
    message: str

    @property
    def id(self) -> str:
        """A stable 12-character id, used as the finding's directory name."""
        digest = hashlib.sha256(f"{self.phase}\n{self.message}".encode()).hexdigest()
        return digest[:12]

    def __str__(self) -> str:
        return f"{self.phase}: {self.message}"


MAX_MESSAGE = 300

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Order matters: digests before ids before numbers, quoted text before paths.
_REPLACEMENTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(Error response from daemon: )+"), ""),
    (re.compile(r"\b\d{4}-\d\d-\d\dT[\d:.]+(?:Z|[+-]\d\d:\d\d)?"), "<time>"),
    # Image references with a registry host, as in localhost:5000/name:tag.
    (
        re.compile(
            r"\b(?:localhost|[\w-]+(?:\.[\w-]+)+)(?::\d+)?/[\w./-]+"
            r"(?::[\w.-]+)?(?:@sha256:[0-9a-f]+)?"
        ),
        "<image>",
    ),
    (re.compile(r"\b(for (?:user|group)) [^\s:]+"), r"\1 <name>"),
    (
        re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"),
        "<uuid>",
    ),
    (re.compile(r"\bsha(?:256|512):[0-9a-f]{12,}"), "<digest>"),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<digest>"),
    (re.compile(r"\b(?=[0-9a-z]*\d)[0-9a-z]{25}\b"), "<ref>"),  # BuildKit refs
    (re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{12,}\b"), "<id>"),
    (re.compile(r"\"(?:[^\"\\]|\\.)*\""), '"<q>"'),
    (re.compile(r"'(?:[^'\\]|\\.)*'"), "'<q>'"),
    # Absolute paths. The basename stays where it is a fixed name of an image
    # or build layout, because it tells causes apart ("manifest.json" missing
    # is not "json" missing); other basenames are the case's own file names.
    (
        re.compile(
            r"(?<![\w<])/(?:[^\s:\"',;()\[\]]+/)?(json|manifest\.json|"
            r"repositories|index\.json|oci-layout|VERSION|layer\.tar|"
            r"Dockerfile|\.dockerignore)(?=[\s:\"',;)]|$)"
        ),
        r"<path>/\1",
    ),
    (re.compile(r"(?<![\w<>])/(?:[^\s:\"',;()\[\]]+)"), "<path>"),
    (
        re.compile(r"\b(l?stat|open|readlink|lchown|chown|mkdir) (?!<)[^\s:]+:"),
        r"\1 <path>:",
    ),
    (re.compile(r"\b\d+(?:\.\d+)?(?:ms|s|m)\b"), "<dur>"),
    (re.compile(r"\d+"), "<n>"),
    (re.compile(r"\s+"), " "),
)


def normalise(message: str) -> str:
    """Remove the parts of an error message that vary between runs."""
    text = _ANSI.sub("", message).strip()
    for pattern, replacement in _REPLACEMENTS:
        text = pattern.sub(replacement, text)
    return text[:MAX_MESSAGE].strip()


# Names of BuildKit vertices, and the phase a failure in each belongs to.
_VERTEX_PHASES: tuple[tuple[re.Pattern[str], Phase], ...] = (
    (re.compile(r"\[internal\] load build context"), Phase.CONTEXT),
    (
        re.compile(r"\[internal\] load (build definition|\.dockerignore)"),
        Phase.DOCKERFILE,
    ),
    (re.compile(r"\[internal\] load metadata for"), Phase.PULL),
    (re.compile(r"\] FROM |resolve image config|\[internal\] load remote"), Phase.PULL),
    (re.compile(r"^export|^exporting|^sending tarball|^writing image"), Phase.EXPORT),
)
# Message patterns for logs without a failing vertex (the classic builder,
# or errors that buildx reports before or after solving).
_MESSAGE_PHASES: tuple[tuple[re.Pattern[str], Phase], ...] = (
    (re.compile(r"unable to prepare context|error checking context|"
                r"Error processing tar file|error from sender|can't stat|"
                r"failed to (read|walk|get) .*context|context canceled.*sender|"
                r"archive/tar"), Phase.CONTEXT),
    (re.compile(r"(?i)dockerfile parse error|unknown instruction|failed to "
                r"(read|parse) dockerfile|cannot locate specified dockerfile|"
                r"failed to solve with frontend dockerfile"), Phase.DOCKERFILE),
    (re.compile(r"pull access denied|manifest unknown|repository does not exist|"
                r"failed to resolve source metadata|failed to do request|"
                r"no match for platform in manifest|connection refused"), Phase.PULL),
    (re.compile(r"(?i)export|exporter|failed to write|error writing"), Phase.EXPORT),
    (re.compile(r"(?i)cannot connect to the docker daemon|is the docker daemon "
                r"running|EOF$"), Phase.ENGINE),
)  # fmt: skip

_BUILDX_ERROR = re.compile(r"^ERROR: (.*)$", re.MULTILINE)
_VERTEX_ERROR = re.compile(r"^#(\d+) ERROR: ", re.MULTILINE)
_CLASSIC_NOISE = re.compile(
    r"^(DEPRECATED|Sending build context|Step \d+/\d+|\s*--->|Removing intermediate|"
    r"\s+Install the buildx|\s+BuildKit is currently|\s+environment-variable|"
    r"\s+https?://|Successfully)"
)


def buildx_signature(log: str) -> Signature:
    """Return the signature of a failed ``docker buildx build`` log."""
    errors = _BUILDX_ERROR.findall(log)
    message = errors[-1] if errors else _last_line(log)
    phase = _failing_vertex_phase(log) or _phase_from_message(message)
    return Signature(phase, normalise(_strip_prefixes(message)))


def classic_signature(log: str) -> Signature:
    """Return the signature of a failed classic ``docker build`` log."""
    lines = [
        line
        for line in log.splitlines()
        if line.strip() and not _CLASSIC_NOISE.match(line)
    ]
    message = lines[-1] if lines else "no output"
    return Signature(_phase_from_message(message), normalise(message))


def load_signature(log: str) -> Signature:
    return Signature(Phase.LOAD, normalise(_last_line(log)))


def timeout_signature() -> Signature:
    return Signature(Phase.HANG, "build did not finish within its timeout")


def engine_signature(daemon_log_tail: str) -> Signature:
    panic = re.search(r"(panic: .*|fatal error: .*)", daemon_log_tail)
    detail = normalise(panic.group(1)) if panic else "daemon stopped answering"
    return Signature(Phase.ENGINE, detail)


def _failing_vertex_phase(log: str) -> Phase | None:
    failing = _VERTEX_ERROR.findall(log)
    if not failing:
        return None
    number = failing[-1]
    names = re.findall(rf"^#{number} (?!ERROR|DONE|CACHED|\d)(.*)$", log, re.MULTILINE)
    for name in names:
        for pattern, phase in _VERTEX_PHASES:
            if pattern.search(name):
                return phase
    return Phase.SOLVE if names else None


def _phase_from_message(message: str) -> Phase:
    for pattern, phase in _MESSAGE_PHASES:
        if pattern.search(message):
            return phase
    return Phase.SOLVE


def _strip_prefixes(message: str) -> str:
    # buildx wraps the cause in prefixes that every failure shares.
    return re.sub(r"^(failed to build: )?(failed to solve: )?", "", message)


def _last_line(log: str) -> str:
    lines = [line for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"
