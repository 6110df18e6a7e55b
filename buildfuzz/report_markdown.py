"""The Markdown summary, for a CI job summary page such as GitHub's."""

import re
from collections.abc import Sequence
from pathlib import Path

from buildfuzz.replay import ReplayReport
from buildfuzz.report_data import (
    VERDICTS,
    ReportData,
    clean_text,
    finding_link,
    rate_text,
    totals,
)

MESSAGE_WIDTH = 120
# Characters that start emphasis, code, links, inline HTML, entities or a
# table cell inside a cell. CommonMark keeps any backslash-escaped ASCII
# punctuation literal, and headings, lists and link targets cannot start
# inside a cell, so escaping these suffices.
_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")


def render_markdown(
    data: ReportData, replays: Sequence[ReplayReport] = (), *, link_from: Path
) -> str:
    """Return the Markdown summary, with finding links relative to
    ``link_from``, the directory that the summary is written to."""
    sections = [
        totals_section(data),
        findings_section(data, link_from),
        regressions_section(replays) if replays else [],
        targets_section(data),
    ]
    return "\n".join(line for section in sections for line in section)


def cell(text: object, width: int | None = None) -> str:
    """Return ``text`` as the literal content of one Markdown table cell."""
    flat = " ".join(clean_text(text).split())
    if width is not None and len(flat) > width:
        flat = flat[: width - 1] + "…"
    return _SPECIAL.sub(r"\\\1", flat)


def totals_section(data: ReportData) -> list[str]:
    numbers = totals(data)
    rate = numbers.last_builds_per_minute
    lines = [
        "# buildfuzz report",
        "",
        f"Results directory {cell(data.results)}, "
        f"made {data.generated.isoformat(timespec='seconds')}.",
        "",
        f"- runs: {numbers.runs}",
        f"- fuzz cases: {numbers.cases} (and {numbers.shrink_builds} shrink builds)",
        "- builds per minute of the last run: "
        + (f"{rate:.1f}" if rate is not None else "unknown (no run summary)"),
        f"- findings: {numbers.findings} distinct; in the last run "
        f"{numbers.new} new and {numbers.known} known; {numbers.flaky} flaky",
    ]
    if data.skipped_lines:
        lines.append(f"- case lines skipped as unreadable: {data.skipped_lines}")
    return [*lines, ""]


def findings_section(data: ReportData, link_from: Path) -> list[str]:
    lines = ["## Findings", ""]
    if not data.findings:
        return [*lines, "No findings.", ""]
    lines += [
        "| id | phase | oracle | message | rate | first seen | last seen |",
        "|---|---|---|---|---|---|---|",
    ]
    for record in data.findings:
        link = finding_link(data.results, record, link_from)
        lines.append(
            f"| [{cell(record.id)}]({link}) | {cell(record.phase)} "
            f"| {cell(record.oracle)} | {cell(record.message, MESSAGE_WIDTH)} "
            f"| {cell(rate_text(record))} | {cell(record.first_seen)} "
            f"| {cell(record.last_seen)} |"
        )
    return [*lines, ""]


def regressions_section(replays: Sequence[ReplayReport]) -> list[str]:
    lines = [
        "## Regression checks",
        "",
        "| finding | status | reproduced | expected |",
        "|---|---|---|---|",
    ]
    for report in replays:
        expected = str(report.expected) if report.expected else "any failure"
        lines.append(
            f"| {cell(report.name)} | {cell(report.status)} "
            f"| {report.reproduced}/{report.runs} | {cell(expected, MESSAGE_WIDTH)} |"
        )
    return [*lines, ""]


def targets_section(data: ReportData) -> list[str]:
    lines = ["## Fuzz cases per target", ""]
    if not data.per_target:
        return [*lines, "No cases recorded.", ""]
    lines += [
        "| engine/builder | pass | expected | finding | total |",
        "|---|---:|---:|---:|---:|",
    ]
    for target, counts in data.per_target.items():
        numbers = " | ".join(str(counts[verdict]) for verdict in VERDICTS)
        lines.append(f"| {cell(target)} | {numbers} | {counts.total()} |")
    return [*lines, ""]
