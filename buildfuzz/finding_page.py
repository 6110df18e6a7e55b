"""The README.md of a finding directory: the finding explained for people."""

from typing import Any

from buildfuzz.case import Case
from buildfuzz.minimize import CASE_OPTIONS, default_case
from buildfuzz.profile import Profile
from buildfuzz.results import FindingRecord
from buildfuzz.rules import context_listing
from buildfuzz.signature import Phase
from buildfuzz.strategies import Target

LOG_LINES = 25


def needed_axes(case: Case, default: Case) -> list[tuple[str, str, str]]:
    """Return (axis, value, default) for every axis where the case differs."""
    rows = []
    axes = ("engine", "storage_driver", "containerd_store", "data_root_mib")
    for axis in (*axes, "memory_mib", "builder", "platform", "output"):
        value, base = getattr(case, axis), getattr(default, axis)
        if value != base:
            rows.append((axis, str(value) or "(default)", str(base) or "(default)"))
    if case.build_args:
        arguments = " ".join(f"{name}={value}" for name, value in case.build_args)
        rows.append(("build args", arguments, "none"))
    if case.dockerignore is not None:
        rows.append((".dockerignore", " ".join(case.dockerignore), "none"))
    if case.dockerfile != default.dockerfile:
        rows.append(("Dockerfile", " / ".join(case.dockerfile), default.dockerfile[0]))
    for axis in CASE_OPTIONS:
        value, base = getattr(case, axis), getattr(default, axis)
        if value != base:
            rows.append((axis, _option_text(value), _option_text(base)))
    for entry in case.files:
        rows.append(("context file", _describe_file(entry), "no file"))
    return rows


def _option_text(value: Any) -> str:
    if value is None or value == "" or value == ():
        return "(default)"
    if isinstance(value, tuple):
        return ", ".join(
            "=".join(map(str, item)) if isinstance(item, tuple) else str(item)
            for item in value
        )
    return str(value)


def _describe_file(entry: Any) -> str:
    owner = f"{entry.uid}:{entry.gid}"
    text = f"{entry.kind} {entry.path!r} mode {entry.mode:04o} owner {owner}"
    if entry.kind == "file":
        text += f" size {entry.size}"
    if entry.target:
        text += f" -> {entry.target!r}"
    return text + f" mtime_ns {entry.mtime_ns}"


def render_finding_readme(
    record: FindingRecord,
    case: Case,
    *,
    profile: Profile,
    targets: tuple[Target, ...],
    environment: dict[str, Any],
    log: str,
    results_name: str = "results",
) -> str:
    default = default_case(profile, targets)
    rate = f"{record.reproduced}/{record.attempts} re-runs"
    flaky = " (flaky)" if record.flaky else ""
    lines = [
        f"# Finding {record.id}",
        "",
        f"**{record.phase}**: `{record.message}`",
        "",
        f"- oracle: {record.oracle}",
        f"- reproduced: {rate}{flaky}",
        f"- shrunk: {'yes' if record.shrunk else 'no'}{_shrink_note(record)}",
        f"- first seen: {record.first_seen}, last seen: {record.last_seen}, "
        f"seen {_times(record.count)}",
        f"- found with profile `{record.profile}`, seed {record.seed}",
        "",
        "## What the failure needs",
        "",
        "Each row differs from the profile's default case; undoing any one of "
        "them made the failure go away (unless shrinking was cut short).",
        "",
        "| axis | value | default |",
        "|---|---|---|",
        *[
            f"| {a} | `{_cell(v)}` | `{_cell(d)}` |"
            for a, v, d in needed_axes(case, default)
        ],
        "",
    ]
    tried = [r for r in record.explanation if r["failing"] or r["passing"]]
    if tried:
        lines += [
            "## Other values tried",
            "",
            "| axis | value in the case | fails with | passes with | so it is |",
            "|---|---|---|---|---|",
        ]
        for report in tried:
            lines.append(
                f"| {report['axis']} | {report['value']} "
                f"| {', '.join(report['failing']) or '-'} "
                f"| {', '.join(report['passing']) or '-'} | {report['status']} |"
            )
        lines.append("")

    engine = environment.get("engine", {})
    lines += [
        "## Versions",
        "",
        f"- engine {engine.get('version', '?')} ({engine.get('storage_driver', '?')}), "
        f"containerd {engine.get('containerd', '?')}",
        f"- docker CLI {environment.get('docker_cli', '?')}, "
        f"buildx {environment.get('buildx', '?')}, "
        f"BuildKit {environment.get('buildkit', '?')}",
        f"- kernel {environment.get('kernel', '?')}, "
        f"buildfuzz {environment.get('buildfuzz', '?')}",
        "",
        "## Reproduce",
        "",
        "From the directory that holds the results directory (use",
        "`./dev.sh replay ...` in a clone of buildfuzz, which sets it up first):",
        "",
        "```sh",
        f"buildfuzz replay {results_name}/{record.id}   # on a fresh sandbox engine",
        "```",
        "",
        "With docker alone, against the daemon that DOCKER_HOST names (for a",
        "throw-away one, see `buildfuzz sandbox`):",
        "",
        "```sh",
        f"{results_name}/{record.id}/repro.sh",
        "```",
        "",
        *_result_caveat(record),
        "Dockerfile:",
        "",
        "```dockerfile",
        case.dockerfile_text.rstrip(),
        "```",
        "",
        "Context:",
        "",
        "```",
        context_listing(case) or "(empty)",
        "```",
        "",
        "End of the build log:",
        "",
        "```",
        *log.rstrip().splitlines()[-LOG_LINES:],
        "```",
        "",
    ]
    return "\n".join(lines)


def _shrink_note(record: FindingRecord) -> str:
    if record.shrink_complete:
        return ""
    if record.shrink_interrupted:
        return " (not fully: the run was interrupted)"
    return " (not fully: the shrink budget ran out)"


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def _cell(text: str) -> str:
    """Return ``text`` fit for one Markdown table cell: one line, no bar."""
    return text.replace("\n", "\\n").replace("|", "\\|")


def render_sequence_readme(
    record: FindingRecord,
    steps: list[str],
    case: Case,
    *,
    environment: dict[str, Any],
    detail: str,
    log: str,
    results_name: str = "results",
) -> str:
    """Return the README.md of a sequence finding; ``steps`` describe its steps."""
    rate = f"{record.reproduced}/{record.attempts} replays"
    flaky = " (flaky)" if record.flaky else ""
    engine = environment.get("engine", {})
    directory = f"{results_name}/{record.id}"
    lines = [
        f"# Finding {record.id}",
        "",
        f"**{record.phase}**: `{record.message}`",
        "",
        "A build sequence: each build step built the case with the builder's",
        "cache, then with `--no-cache` (from scratch), and the two disagreed at",
        "the last build step.",
        "",
        f"- oracle: {record.oracle}",
        f"- reproduced: {rate}{flaky}",
        f"- shrunk: {'yes' if record.shrunk else 'no'}{_shrink_note(record)}",
        f"- first seen: {record.first_seen}, last seen: {record.last_seen}, "
        f"seen {_times(record.count)}",
        f"- found with profile `{record.profile}`, seed {record.seed}",
        f"- engine {record.engine}, builder {record.builder}",
        "",
        "## Steps",
        "",
        *[f"{number}. {text}" for number, text in enumerate(steps, start=1)],
        "",
        "`steps.json` holds every step with the case after it.",
        "",
        "## Versions",
        "",
        f"- engine {engine.get('version', '?')} ({engine.get('storage_driver', '?')}), "
        f"containerd {engine.get('containerd', '?')}",
        f"- docker CLI {environment.get('docker_cli', '?')}, "
        f"buildx {environment.get('buildx', '?')}, "
        f"BuildKit {environment.get('buildkit', '?')}",
        "",
        "## Reproduce",
        "",
        "`repro.sh` runs the steps in order with docker alone. It prunes the",
        "whole build cache of the builder, so run it against a throw-away daemon",
        "(see `buildfuzz sandbox`):",
        "",
        "```sh",
        f"BUILDFUZZ_REPRO_PRUNE=1 {directory}/repro.sh",
        "```",
        "",
        "`buildfuzz replay` builds single cases and does not replay sequences.",
        "",
        "Dockerfile at the last step:",
        "",
        "```dockerfile",
        case.dockerfile_text.rstrip(),
        "```",
        "",
        "Context at the last step:",
        "",
        "```",
        context_listing(case) or "(empty)",
        "```",
        "",
        "What differed:",
        "",
        "```",
        *detail.rstrip().splitlines()[:60],
        "```",
        "",
        "End of the build logs:",
        "",
        "```",
        *log.rstrip().splitlines()[-LOG_LINES:],
        "```",
        "",
    ]
    return "\n".join(lines)


def _result_caveat(record: FindingRecord) -> list[str]:
    """Say that repro.sh cannot judge a finding about a passing build's result."""
    if record.phase != str(Phase.RESULT):
        return []
    return [
        "The build itself passes: buildfuzz found its result wrong. `repro.sh`",
        "runs the same build and exits 2 when it passes, because only",
        "`buildfuzz replay` checks the result.",
        "",
    ]
