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
    RESULT = "result"  # the build succeeded, but its result is wrong (an oracle)
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
# Path characters: anything up to whitespace, a colon, a quote or punctuation.
_PATH_PART = r"[^\s:\"',;()\[\]]+"
# Order matters: digests before ids before numbers, quoted text before paths.
_REPLACEMENTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"^(Error response from daemon: )+"), ""),
    (re.compile(r"\b\d{4}-\d\d-\d\dT[\d:.]+(?:Z|[+-]\d\d:\d\d)?"), "<time>"),
    # Image references with a registry host, as in localhost:5000/name:tag. The
    # look-behind skips a dotted directory inside a path (/etc/conf.d/x), which
    # the path rules below replace.
    (
        re.compile(
            r"(?<![/.-])\b(?:localhost|[\w-]+(?:\.[\w-]+)+)(?::\d+)?/[\w./-]+"
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
    # A quote right after a letter is an apostrophe (can't), not an opening quote.
    (re.compile(r"(?<!\w)'(?:[^'\\]|\\.)*'"), "'<q>'"),
    # Absolute paths. Dockerfile names such as Prod.Dockerfile or Dockerfile.dev
    # all become <path>/Dockerfile, so a missing -f file gives one signature
    # whatever it is called.
    (
        re.compile(
            rf"(?<![\w<])/(?:{_PATH_PART}/)?(?:[\w-]+\.)?Dockerfile(?:\.[\w-]+)?"
            r"(?=[\s:\"',;)]|$)"
        ),
        "<path>/Dockerfile",
    ),
    # The basename stays where it is a fixed name of an image or build layout,
    # because it tells causes apart ("manifest.json" missing is not "json"
    # missing). Other basenames are the case's own file names.
    (
        re.compile(
            rf"(?<![\w<])/(?:{_PATH_PART}/)?(json|manifest\.json|"
            r"repositories|index\.json|oci-layout|VERSION|layer\.tar|"
            r"\.dockerignore)(?=[\s:\"',;)]|$)"
        ),
        r"<path>/\1",
    ),
    (re.compile(rf"(?<![\w<>])/{_PATH_PART}"), "<path>"),
    # Relative paths after a file operation, as Go's os.PathError prints them.
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
    # A cut must not leave half a placeholder such as "<pa" behind.
    return re.sub(r"<\w*$", "", text[:MAX_MESSAGE]).strip()


def _any_of(*alternatives: str) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{alternative})" for alternative in alternatives))


# Names of BuildKit vertices, and the phase a failure in each belongs to. A
# vertex that matches none of them is a build step, so its phase is solve.
_VERTEX_PHASES: tuple[tuple[re.Pattern[str], Phase], ...] = (
    (
        _any_of(
            r"\[internal\] load (?:remote )?build context",
            # The Dockerfile frontend unpacks a context tar sent on stdin here.
            r"^copy /context /$",
        ),
        Phase.CONTEXT,
    ),
    (
        re.compile(r"\[internal\] load (build definition|\.dockerignore)"),
        Phase.DOCKERFILE,
    ),
    (
        _any_of(
            r"\[internal\] load metadata for", r"\] FROM ", r"resolve image config"
        ),
        Phase.PULL,
    ),
    (
        _any_of(r"^export", r"^sending tarball", r"^writing image", r"^pushing "),
        Phase.EXPORT,
    ),
)

# Message patterns for logs without a failing vertex: the classic builder, the
# docker CLI, and errors that buildx reports before or after solving. The
# first match wins, so more specific phases come first.
_MESSAGE_PHASES: tuple[tuple[re.Pattern[str], Phase], ...] = (
    (
        _any_of(
            r"cannot parse platform specifier",  # --platform
            r"^invalid tag ",  # buildx -t
            r"^unknown (?:shorthand )?flag: ",  # any CLI flag the command lacks
            r"^invalid argument .* for .* flag",  # a flag value the CLI rejects
        ),
        Phase.OPTIONS,
    ),
    (
        _any_of(
            r"unable to prepare context",
            r"error checking context",
            r"Error processing tar file",
            r"error from sender",
            r"can't stat",
            r"failed to (?:read|walk|get) .*context",
            r"context canceled.*sender",
            # A context tar on stdin that buildx cannot unpack. The Dockerfile
            # is read from that tar, so the error names the Dockerfile.
            r"^failed to read dockerfile: "
            r"(?:archive/tar: |unexpected EOF|link |open \S+: file name too long)",
            # The classic daemon unpacks the context tar before it responds to
            # the build request, so a rejected request that names a tar or file
            # error concerns the context.
            r"^Error response from daemon: "
            r"(?:archive/tar: |unexpected EOF|link |open )",
            # buildx resolves the directory of the -f Dockerfile in the client.
            r"^resolve : l?stat ",
        ),
        Phase.CONTEXT,
    ),
    (
        _any_of(
            r"(?i:dockerfile parse error)",
            r"unknown instruction",
            r"(?i:failed to (?:read|parse) dockerfile)",
            r"(?i:cannot locate specified dockerfile)",
            r"failed to solve with frontend dockerfile",
            r"file with no instructions",
            r"no build stage in current context",
            r"target stage .* could not be found",
            # A malformed image name in FROM. Tags given with -t fail earlier,
            # with "invalid tag" or "invalid argument", as build options.
            r"invalid reference format",
        ),
        Phase.DOCKERFILE,
    ),
    (
        _any_of(
            r"pull access denied",
            r"manifest unknown",
            r"repository does not exist",
            r"failed to resolve source metadata",
            r"failed to do request",
            r"no match for platform in manifest",
            r"connection refused",
        ),
        Phase.PULL,
    ),
    (
        _any_of(
            r"(?i:export)",
            r"failed to write",
            r"error writing",
            # --output checks in the buildx client: a local exporter needs a
            # directory, and a tar exporter opens its file before the build.
            r"^destination directory .* is a file",
            r"^failed to open open ",
        ),
        Phase.EXPORT,
    ),
    (
        _any_of(
            r"(?i:cannot connect to the docker daemon)",
            r"(?i:is the docker daemon running)",
            r"error during connect",
            # A dropped API connection. A truncated context tar also ends in
            # "unexpected EOF", but the context patterns above match it first.
            r"EOF$",
        ),
        Phase.ENGINE,
    ),
)

_BUILDX_ERROR = re.compile(r"^ERROR: (.*)$", re.MULTILINE)
_VERTEX_ERROR = re.compile(r"^#(\d+) ERROR: ", re.MULTILINE)
# A RUN step whose process failed. The exit code alone does not distinguish a
# failing command from a container that could not start, so the runtime's
# output line is added to the message when the step printed one.
_PROCESS_FAILED = re.compile(r"did not complete successfully")
# Vertex output lines start with the seconds since the step began.
_RUNTIME_ERROR = re.compile(r"^\d+\.\d+ ((?:runc \w+ failed|exec): .*)$")
# Vertex lines that are not its name: its status, or its output.
_VERTEX_STATUS = re.compile(r"^(?:ERROR|DONE|CACHED|CANCELED)\b|^\d+\.\d+ ")
_CLASSIC_NOISE = re.compile(
    r"^(DEPRECATED|Sending build context|Step \d+/\d+|\s*--->|Removing intermediate|"
    r"\s+Install the buildx|\s+BuildKit is currently|\s+environment-variable|"
    r"\s+https?://|Successfully|See '.*--help'\.$)"
)
_CLASSIC_STEP = re.compile(r"^Step \d+/\d+ : ")
# The docker CLI logs a file it cannot add to the context tar (a socket, for
# example) and sends the context without it. The build then fails later with
# an error that reads like a missing file.
_CLIENT_TAR_ERROR = re.compile(r"archive/tar: [^\"\n]*")


def buildx_signature(log: str) -> Signature:
    """Return the signature of a failed ``docker buildx build`` log."""
    errors = _BUILDX_ERROR.findall(log)
    message = _strip_prefixes(errors[-1] if errors else _last_line(log))
    vertex = _failing_vertex(log)
    phase = None
    if vertex is not None:
        phase = _vertex_phase(log, vertex)
        if _PROCESS_FAILED.search(message):
            detail = _runtime_error(log, vertex)
            if detail:
                message = f"{message}: {detail}"
    if phase is None:
        phase = _phase_from_message(message)
    return Signature(phase, normalise(message))


def classic_signature(log: str) -> Signature:
    """Return the signature of a failed classic ``docker build`` log."""
    lines = [_ANSI.sub("", line) for line in log.splitlines()]
    messages = [
        line for line in lines if line.strip() and not _CLASSIC_NOISE.match(line)
    ]
    message = messages[-1] if messages else "no output"
    client_error = _client_tar_error(lines, message)
    if client_error:
        message = f"{message} (context tar: {client_error})"
        return Signature(Phase.CONTEXT, normalise(message))
    return Signature(_phase_from_message(message), normalise(message))


def load_signature(log: str) -> Signature:
    return Signature(Phase.LOAD, normalise(_last_line(log)))


def timeout_signature() -> Signature:
    return Signature(Phase.HANG, "build did not finish within its timeout")


def engine_signature(daemon_log_tail: str) -> Signature:
    panic = re.search(r"(panic: .*|fatal error: .*)", daemon_log_tail)
    detail = normalise(panic.group(1)) if panic else "daemon stopped answering"
    return Signature(Phase.ENGINE, detail)


def _failing_vertex(log: str) -> str | None:
    """Return the number of the last vertex that printed an error, if any."""
    failing = _VERTEX_ERROR.findall(log)
    return failing[-1] if failing else None


def _vertex_lines(log: str, vertex: str) -> list[str]:
    return re.findall(rf"^#{vertex} (.*)$", log, re.MULTILINE)


def _vertex_phase(log: str, vertex: str) -> Phase | None:
    name = _vertex_name(log, vertex)
    if name is None:
        return None
    for pattern, phase in _VERTEX_PHASES:
        if pattern.search(name):
            return phase
    return Phase.SOLVE


def _vertex_name(log: str, vertex: str) -> str | None:
    # The name is the vertex's first line. Status lines that follow it, such
    # as "writing image sha256:... done", could match another vertex's name.
    for line in _vertex_lines(log, vertex):
        if not _VERTEX_STATUS.match(line):
            return line
    return None


def _runtime_error(log: str, vertex: str) -> str | None:
    """Return the last line of the vertex's output that the runtime printed."""
    found = None
    for line in _vertex_lines(log, vertex):
        output = _RUNTIME_ERROR.match(line)
        if output:
            found = output.group(1)
    return found


def _client_tar_error(lines: list[str], message: str) -> str | None:
    """Return an archive/tar error that the CLI logged before the build began."""
    for line in lines:
        if line == message or _CLASSIC_STEP.match(line):
            break
        found = _CLIENT_TAR_ERROR.search(line)
        if found:
            return found.group(0)
    return None


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
