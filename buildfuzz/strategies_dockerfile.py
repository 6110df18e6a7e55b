"""Strategies for a case's Dockerfile: stages, instructions and layers.

Each element of a case's ``dockerfile`` tuple is one instruction. Heredocs
and the block of extra layers span several lines in one element, so that
removing an element removes a whole instruction.

There is no ``# syntax=`` line: it makes BuildKit pull a frontend image
from a registry, and no local frontend image exists for the sandbox.
"""

import json
import os
import re

from hypothesis import strategies as st

from buildfuzz.base_formats import BASE_FORMATS
from buildfuzz.case import DOCKERFILE, ContextFile, FileKind
from buildfuzz.profile import Profile

# A reference whose registry is "localhost": if the engine ever looks for it
# in a registry, it asks 127.0.0.1, never a public host.
BUSYBOX_IMAGE = "localhost/buildfuzz/busybox:1"
# Registry bases use the same registry name "localhost" (see base_formats).
BASE_IMAGES = {
    "scratch": "scratch",
    "busybox": BUSYBOX_IMAGE,
    **{base.name: base.image for base in BASE_FORMATS},
}
# Kinds that run a command in the image, which a scratch base cannot do.
SHELL_INSTRUCTIONS = frozenset(
    {
        "run",
        "run-heredoc",
        "run-mount-cache",
        "run-mount-tmpfs",
        "run-mount-bind",
        "run-mount-secret",
    }
)
STAGE_PREFIX = "stage"
FIRST_STAGE = f"{STAGE_PREFIX}0"

# Instructions that need no context file, by kind.
FIXED_INSTRUCTIONS = {
    "copy-all": "COPY . /ctx/",
    "copy-root": "COPY . /",
    "run": "RUN ls -lan / > /listing.txt",
    "workdir": "WORKDIR /work/dir",
    "env": "ENV BUILDFUZZ_ENV=value",
    "arg": "ARG BUILDFUZZ_ARG=default",
    "user": "USER 1000:1000",
    "run-heredoc": "RUN <<EOF\necho heredoc > /tmp/heredoc.txt\nEOF",
    "copy-heredoc": "COPY <<EOF /heredoc.txt\nheredoc\nEOF",
    "run-mount-cache": "RUN --mount=type=cache,target=/cache"
    " ls -lan /cache > /tmp/cache.txt",
    "run-mount-tmpfs": "RUN --mount=type=tmpfs,target=/scratch"
    " ls -lan /scratch > /tmp/tmpfs.txt",
    "run-mount-bind": "RUN --mount=type=bind,target=/mnt/context"
    " ls -lanR /mnt/context > /tmp/context.txt",
    # The form for a case without build secrets: a secret mount is optional
    # by default, so the step passes without one. See secret_run for the other.
    "run-mount-secret": "RUN --mount=type=secret,id=token"
    " cat /run/secrets/token || true",
    "copy-exclude": "COPY --exclude=*.txt . /excluded/",
}
# The RUN step that reads a build secret the case passes (see secret_run).
SECRET_RUN_PATTERN = re.compile(
    r"RUN --mount=type=secret,id=(\w+),required=true cat /run/secrets/\1 > /dev/null\Z"
)
# Instructions about one context file: instruction, flags, destination.
FILE_INSTRUCTIONS = {
    "copy-file": ("COPY", (), "/picked/"),
    "copy-dir": ("COPY", (), "/picked/"),
    "add-file": ("ADD", (), "/added/"),
    "add-archive": ("ADD", (), "/extracted/"),
    "copy-chown-id": ("COPY", ("--chown=1000:1000",), "/owned/"),
    "copy-chown-name": ("COPY", ("--chown=nobody:nogroup",), "/owned/"),
    "copy-chmod": ("COPY", ("--chmod=0750",), "/modes/"),
    "copy-link": ("COPY", ("--link",), "/linked/"),
    "copy-parents": ("COPY", ("--parents",), "/parents/"),
}
# Kinds that copy one kind of context entry, or "." when there is none.
SOURCE_KINDS = {"copy-dir": FileKind.DIR, "add-archive": FileKind.ARCHIVE}


@st.composite
def dockerfiles(
    draw: st.DrawFn,
    profile: Profile,
    files: tuple[ContextFile, ...],
    *,
    name_stages: bool = False,
    dockerfile_name: str = DOCKERFILE,
    excluded_bases: frozenset[str] = frozenset(),
    secret_ids: tuple[str, ...] = (),
) -> tuple[str, ...]:
    """Draw a Dockerfile of one or more stages over the context ``files``.

    Stages are named ``stage0``, ``stage1`` and so on when there are several
    or when ``name_stages`` is set (for ``--target``). Bases in
    ``excluded_bases`` are never drawn. A secret mount reads one of the
    build secrets ``secret_ids`` when the case passes any.
    """
    axes = profile.dockerfile
    bases = tuple(b for b in axes.bases if b not in excluded_bases) or ("scratch",)
    stages = draw(st.sampled_from(axes.stages))
    named = stages > 1 or name_stages
    lines: list[str] = []
    roots: list[str] = []  # the base image each stage's file system starts from

    for stage in range(stages):
        base = draw(st.sampled_from(bases))
        if base == "stage" and stage == 0:
            base = next((b for b in bases if b != "stage"), "scratch")
        flag = ""
        if base == "stage":
            image, root = f"{STAGE_PREFIX}{stage - 1}", roots[-1]
        else:
            image, root = BASE_IMAGES[base], base
            platform = draw(st.sampled_from(axes.from_platforms))
            flag = f"--platform={platform} " if platform else ""
        roots.append(root)
        alias = f" AS {STAGE_PREFIX}{stage}" if named else ""
        lines.append(f"FROM {flag}{image}{alias}")

        kinds = axes.instructions
        if root == "scratch":
            kinds = tuple(kind for kind in kinds if kind not in SHELL_INSTRUCTIONS)
        if not kinds:
            kinds = ("copy-all",)
        count = draw(st.integers(min_value=1, max_value=max(1, axes.max_instructions)))
        for _ in range(count):
            kind = draw(st.sampled_from(kinds))
            index = draw(st.integers(min_value=0, max_value=255))
            lines.append(
                render_instruction(
                    kind, files, index, stage=stage, secret_ids=secret_ids
                )
            )

    layers = draw(st.sampled_from(axes.layers))
    if layers:
        lines.append(render_layers(layers, dockerfile_name))

    return tuple(lines)


def render_instruction(
    kind: str,
    files: tuple[ContextFile, ...],
    index: int,
    *,
    stage: int = 0,
    secret_ids: tuple[str, ...] = (),
) -> str:
    """Render one Dockerfile instruction of ``kind`` about a chosen file.

    ``index`` picks the file (or the earlier stage, for copy-from-stage, or
    the build secret of ``secret_ids``, for run-mount-secret); ``stage`` is
    the number of the stage the instruction is in.
    """
    if kind == "run-mount-secret" and secret_ids:
        return secret_run(secret_ids[index % len(secret_ids)])
    if kind in FIXED_INSTRUCTIONS:
        return FIXED_INSTRUCTIONS[kind]
    if kind == "copy-from-stage":
        if stage == 0:
            return FIXED_INSTRUCTIONS["copy-all"]  # no earlier stage to copy from
        source = f"{STAGE_PREFIX}{index % stage}"
        return f"COPY --from={source} / /from-{source}/"
    if kind in FILE_INSTRUCTIONS:
        instruction, flags, destination = FILE_INSTRUCTIONS[kind]
        source = _pick_source(kind, files, index)
        return _copy(instruction, list(flags), source, destination)
    raise ValueError(f"unknown instruction kind {kind!r}")


def secret_run(secret_id: str) -> str:
    """Render a RUN step that reads build secret ``secret_id`` and fails without it."""
    return (
        f"RUN --mount=type=secret,id={secret_id},required=true"
        f" cat /run/secrets/{secret_id} > /dev/null"
    )


def render_layers(count: int, dockerfile_name: str) -> str:
    """Render ``count`` COPY instructions, each making one more image layer.

    Each copies the Dockerfile itself: the one file every context has
    (unless a .dockerignore pattern excludes it).
    """
    return "\n".join(
        _copy("COPY", [], dockerfile_name, f"/layers/{number}")
        for number in range(count)
    )


def _pick_source(kind: str, files: tuple[ContextFile, ...], index: int) -> str:
    wanted = SOURCE_KINDS.get(kind)
    candidates = [f.path for f in files if wanted is None or f.kind is wanted]
    if not candidates:
        return "."
    return candidates[index % len(candidates)]


def _copy(instruction: str, flags: list[str], source: str, dest: str) -> str:
    prefix = " ".join([instruction, *flags])
    if _needs_json_form(source):
        # The JSON form takes any file name; surrogate escapes stay escaped.
        arguments = json.dumps([source, dest], ensure_ascii=False)
        return f"{prefix} {arguments}"
    return f"{prefix} {source} {dest}"


def _needs_json_form(path: str) -> bool:
    try:
        os.fsencode(path).decode("utf-8")
    except UnicodeDecodeError:
        return True
    return any(char.isspace() or char in "\"'\\$" for char in path)


# The first line of a block of extra layers, in plain or JSON form.
LAYERS_PATTERN = re.compile(r'COPY .*/layers/0"?\]?(\n|\Z)')
# Patterns that tell each instruction kind from its rendered text, most
# specific first; run logs record kinds with ``instruction_kinds``.
_KIND_PATTERNS = [
    (kind, re.compile(re.escape(text) + r"\Z"))
    for kind, text in FIXED_INSTRUCTIONS.items()
] + [
    ("run-mount-secret", SECRET_RUN_PATTERN),
    ("copy-from-stage", re.compile(r"COPY --from=")),
    ("copy-chown-id", re.compile(r"COPY --chown=1000:1000 ")),
    ("copy-chown-name", re.compile(r"COPY --chown=nobody:nogroup ")),
    ("copy-chmod", re.compile(r"COPY --chmod=0750 ")),
    ("copy-link", re.compile(r"COPY --link ")),
    ("copy-parents", re.compile(r"COPY --parents ")),
    ("layers", LAYERS_PATTERN),
    ("add-archive", re.compile(r'ADD .*/extracted/"?\]?\Z')),
    ("add-file", re.compile(r"ADD ")),
    ("copy-file", re.compile(r"COPY .*/picked/")),
]


def instruction_kinds(
    dockerfile: tuple[str, ...], files: tuple[ContextFile, ...] = ()
) -> list[str]:
    """Return the kind of every element that is not a FROM line.

    A COPY to /picked/ is "copy-dir" when its source is a directory entry of
    ``files``. Elements that no kind renders give "other".
    """
    directories = {entry.path for entry in files if entry.kind is FileKind.DIR}
    kinds = []
    for element in dockerfile:
        if element.startswith("FROM "):
            continue
        kind = next(
            (kind for kind, pattern in _KIND_PATTERNS if pattern.match(element)),
            "other",
        )
        if kind == "copy-file" and _copy_source(element) in directories | {"."}:
            kind = "copy-dir"
        kinds.append(kind)
    return kinds


def _copy_source(element: str) -> str:
    arguments = element.split(" ", 1)[1]
    if arguments.startswith('["'):
        try:
            return str(json.loads(arguments)[0])
        except (ValueError, IndexError):
            pass  # a plain source whose name starts with [" after all
    return arguments.rsplit(" ", 1)[0]


def stage_count(dockerfile: tuple[str, ...]) -> int:
    return sum(1 for element in dockerfile if element.startswith("FROM "))


def layer_count(dockerfile: tuple[str, ...]) -> int:
    return sum(
        element.count("\n") + 1
        for element in dockerfile
        if LAYERS_PATTERN.match(element)
    )
