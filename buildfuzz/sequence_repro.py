"""Write ``repro.sh`` for a sequence finding: its steps in order, with docker only.

Each build step writes the context of that step's case into a new
directory (as buildfuzz did), builds it with the builder's cache, then
with ``--no-cache``, and unpacks both outputs. Prune steps run
``docker buildx prune --all --force``. After the last build step the
script checks the finding. For a tree mismatch it compares the type,
mode, owner, size, content digest and symlink target of each differing
path in the two outputs. For a build that failed alone it checks the exit
status and log of that build.

Pruning removes the whole build cache of the builder that docker uses, so
the script runs only with BUILDFUZZ_REPRO_PRUNE=1 in its environment.
"""

import shlex

from buildfuzz.case import Case, Output
from buildfuzz.definitions import load_definitions
from buildfuzz.oracle_sequence import Mismatch
from buildfuzz.repro import (
    FILL_FUNCTION,
    _builder_commands,
    _busybox_import,
    _busybox_payload,
    _context_commands,
    _dockerfile_commands,
    _secret_commands,
    _shell_word,
    _tool_checks,
    ansi_quote,
    build_command,
    signature_pattern,
)
from buildfuzz.sequences import BUILD, PRUNE, START, Step
from buildfuzz.strategies import BUSYBOX_IMAGE

LISTING_FUNCTION = (
    "listing() {  # listing ROOT PATH...: what the sequence oracle compares",
    "  root=$1; shift",
    '  for p in "$@"; do',
    '    f="$root$p"',
    '    if [ -L "$f" ]; then',
    '      echo "$p symlink $(stat -c \'%u:%g\' "$f") -> $(readlink "$f")"',
    '    elif [ -f "$f" ]; then',
    '      echo "$p file $(stat -c \'%a %u:%g %s\' "$f") $(sha256sum < "$f")"',
    '    elif [ -e "$f" ]; then',
    '      echo "$p $(stat -c \'%F %a %u:%g\' "$f")"',
    "    else",
    '      echo "$p missing"',
    "    fi",
    "  done",
    "}",
)


def render_sequence_repro(
    steps: list[Step], mismatch: Mismatch, *, timeout: float
) -> str:
    """Return the text of ``repro.sh`` that runs ``steps`` and checks ``mismatch``."""
    first = steps[0].case
    definition = load_definitions().builders[first.builder]
    builder_lines = _builder_commands(definition, first)
    builder_flag = ' --builder "$builder"' if builder_lines else ""
    uses_busybox = any(
        BUSYBOX_IMAGE in line for step in steps for line in step.case.dockerfile
    )

    lines = [
        "#!/usr/bin/env bash",
        "# Reproduction of a build sequence, written by buildfuzz; it needs only",
        "# docker and the buildx plugin. It uses the daemon that docker talks to",
        "# (DOCKER_HOST or the current context) and PRUNES THE WHOLE BUILD CACHE",
        "# of the builder it uses, so run it on a throw-away daemon (see",
        "# `buildfuzz sandbox`) with BUILDFUZZ_REPRO_PRUNE=1. It exits 0 when the",
        "# finding reproduced, 1 when not, 2 when it could not run.",
        f"# Signature ({mismatch.signature.phase}): {mismatch.signature.message}",
        "set -u",
        'if [ "${BUILDFUZZ_REPRO_PRUNE:-}" != 1 ]; then',
        "  echo 'repro.sh: this script prunes the whole build cache of the builder",
        "that docker uses; set BUILDFUZZ_REPRO_PRUNE=1 to allow it' >&2",
        "  exit 2",
        "fi",
        'work=$(mktemp -d "${TMPDIR:-/tmp}/buildfuzz-repro.XXXXXX")',
        "image=buildfuzz-case-repro:latest",
        "cleanup() {",
        '  docker image rm -f "$image" >/dev/null 2>&1',
        '  rm -rf "$work"',
        "}",
        "trap cleanup EXIT",
        "",
        *FILL_FUNCTION,
        "",
        *LISTING_FUNCTION,
        "",
        *_tool_checks_of(steps),
        *(_busybox_import() if uses_busybox else []),
        *builder_lines,
        f"prune() {{ docker buildx prune --all --force{builder_flag} >/dev/null"
        " || exit 2; }",
    ]

    number = 0
    for index, step in enumerate(steps, start=1):
        lines += ["", f"# step {index}: {step.description}"]
        if step.action in (START, PRUNE):
            lines.append("prune")
        elif step.action == BUILD:
            number += 1
            lines += _build_step(step.case, number, builder_flag, timeout)
    lines += ["", *_verdict(mismatch, number)]

    script = "\n".join(lines) + "\n"
    if uses_busybox:
        script += _busybox_payload()
    return script


def _tool_checks_of(steps: list[Step]) -> list[str]:
    for step in steps:
        checks = _tool_checks(step.case)
        if checks:
            return checks
    return []


def _build_step(
    case: Case, number: int, builder_flag: str, timeout: float
) -> list[str]:
    lines = [
        f'ctx="$work/context-{number}"',
        'mkdir "$ctx"',
        *_context_commands(case),
        *_dockerfile_commands(case),
        *_secret_commands(case),
    ]
    for side, variant in (
        ("cached", case),
        ("scratch", case.with_changes(no_cache=True)),
    ):
        words = [
            _shell_word(word.replace("$work/", "$out/"))
            for word in build_command(variant, classic=False)
        ]
        if builder_flag:
            words[3:3] = ["--builder", '"$builder"']
        lines += [
            f'out="$work/{side}-{number}"',
            'mkdir "$out"',
            f'timeout {int(timeout)} {" ".join(words)} > "$out/build.log" 2>&1',
            f"{side}=$?",
            f'[ "${side}" -eq 0 ] && {_unpack(case.output)}',
        ]
    return lines


def _unpack(output: Output) -> str:
    """Return a command that puts the build's file tree in "$out/tree"."""
    if output is Output.LOCAL:
        return 'mv "$out/rootfs" "$out/tree"'
    if output is Output.TAR:
        return (
            'mkdir "$out/tree" && tar -xpf "$out/rootfs.tar" --numeric-owner '
            '-C "$out/tree"'
        )
    return (
        'mkdir "$out/tree" && id=$(docker create "$image" /none) && '
        '{ docker export "$id" | tar -xp --numeric-owner -C "$out/tree"; '
        'docker rm "$id" >/dev/null; }'
    )


def _verdict(mismatch: Mismatch, number: int) -> list[str]:
    cached, scratch = f'"$work/cached-{number}"', f'"$work/scratch-{number}"'
    if mismatch.kind == "tree":
        paths = " ".join(ansi_quote(path) for path in mismatch.paths)
        lines = [
            'if [ "$cached" -eq 0 ] && [ "$scratch" -eq 0 ]; then',
            f'  listing {scratch}/tree {paths} > "$work/scratch.txt"',
            f'  listing {cached}/tree {paths} > "$work/cached.txt"',
            '  if ! diff "$work/scratch.txt" "$work/cached.txt"; then',
            '    echo "buildfuzz repro: REPRODUCED (< from scratch, > cached)"',
            "    exit 0",
            "  fi",
            "fi",
        ]
    else:
        alone, other = ("cached", "scratch")
        log = f"{cached}/build.log"
        if mismatch.kind == "scratch-fails":
            alone, other = ("scratch", "cached")
            log = f"{scratch}/build.log"
        assert mismatch.build_signature is not None
        pattern = shlex.quote(signature_pattern(mismatch.build_signature))
        lines = [
            f"cat {log}",
            f'if [ "${alone}" -ne 0 ] && [ "${other}" -eq 0 ] && '
            f"grep -Eq -- {pattern} {log}; then",
            '  echo "buildfuzz repro: REPRODUCED"',
            "  exit 0",
            "fi",
        ]
    return [
        *lines,
        'echo "buildfuzz repro: did not reproduce (exit status of the cached build'
        ' $cached, from scratch $scratch)"',
        "exit 1",
    ]
