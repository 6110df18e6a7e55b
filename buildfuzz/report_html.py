"""The HTML report: one self-contained file with inline CSS and SVG.

The page loads nothing: its Content-Security-Policy blocks every external
resource and script, so it opens the same offline, from a CI artifact or
from disk. Only the links to the findings' README.md files leave the page.
"""

from collections.abc import Sequence
from pathlib import Path

from buildfuzz.replay import ReplayReport
from buildfuzz.report_charts import escape, heat_map, rate_chart
from buildfuzz.report_data import (
    VERDICTS,
    ReportData,
    case_buckets,
    finding_link,
    rate_text,
    totals,
)

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #111; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #ccd; padding: 4px 8px; text-align: left;
  vertical-align: top; }
th { background: #eef1f7; } td.number { text-align: right; }
td.message { max-width: 520px; overflow-wrap: anywhere; font-family: monospace; }
tr.failing td.status { color: #a40000; font-weight: 600; }
dl.totals { display: grid; grid-template-columns: max-content auto; gap: 2px 16px; }
dl.totals dt { color: #555; } dl.totals dd { margin: 0; font-weight: 600; }
svg.chart text { font-size: 12px; fill: #333; }
svg.chart text.small { font-size: 11px; }
svg.chart line.grid { stroke: #dde; } svg.chart line.run { stroke: #999;
  stroke-dasharray: 3 3; }
.heatmap .axis { display: flex; border-top: 1px solid #eee; padding: 3px 0; }
.heatmap .axis-name { flex: 0 0 140px; font-weight: 600; padding-top: 3px; }
.heatmap .cells { display: flex; flex-wrap: wrap; gap: 3px; }
.heatmap .cell { padding: 2px 6px; border-radius: 3px; font-family: monospace;
  white-space: pre; }
.heatmap .cell b { margin-left: 6px; font-weight: 600; }
.heatmap .none { color: #777; padding: 2px 6px; }
p.note { color: #555; }
"""
POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render_html(
    data: ReportData, replays: Sequence[ReplayReport] = (), *, link_from: Path
) -> str:
    """Return the HTML page, with finding links relative to ``link_from``, the
    directory that the page is written to."""
    sections = [
        totals_section(data),
        findings_section(data, link_from),
        regressions_section(replays) if replays else "",
        chart_section(data),
        coverage_section(data),
        targets_section(data),
    ]
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>buildfuzz report: {escape(data.results)}</title>"
        f"<style>{STYLE}</style></head>\n<body>\n"
        + "\n".join(section for section in sections if section)
        + "\n</body></html>\n"
    )


def totals_section(data: ReportData) -> str:
    numbers = totals(data)
    rate = numbers.last_builds_per_minute
    rows = [
        ("results directory", str(data.results)),
        ("made", data.generated.isoformat(timespec="seconds")),
        ("runs", str(numbers.runs)),
        ("fuzz cases", str(numbers.cases)),
        ("shrink builds", str(numbers.shrink_builds)),
        ("builds per minute, last run", f"{rate:.1f}" if rate is not None else "-"),
        ("findings", str(numbers.findings)),
        ("new in the last run", str(numbers.new)),
        ("known, seen again in the last run", str(numbers.known)),
        ("flaky", str(numbers.flaky)),
    ]
    if data.skipped_lines:
        rows.append(("case lines skipped as unreadable", str(data.skipped_lines)))
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in rows)
    return f'<h1>buildfuzz report</h1>\n<dl class="totals">{items}</dl>'


def findings_section(data: ReportData, link_from: Path) -> str:
    if not data.findings:
        return '<h2>Findings</h2>\n<p id="findings">No findings.</p>'
    header = _row(
        "th",
        ["id", "phase", "oracle", "engine/builder", "message", "rate", "seen",
         "first seen", "last seen"],
    )  # fmt: skip
    rows = []
    for record in data.findings:
        link = escape(finding_link(data.results, record, link_from))
        rows.append(
            f'<tr class="failing"><td><a href="{link}">{escape(record.id)}</a></td>'
            f"<td>{escape(record.phase)}</td><td>{escape(record.oracle)}</td>"
            f"<td>{escape(record.engine)}/{escape(record.builder)}</td>"
            f'<td class="message">{escape(record.message)}</td>'
            f"<td>{escape(rate_text(record))}</td>"
            f'<td class="number">{escape(record.count)}</td>'
            f"<td>{escape(record.first_seen)}</td>"
            f"<td>{escape(record.last_seen)}</td></tr>"
        )
    return f'<h2>Findings</h2>\n<table id="findings">{header}{"".join(rows)}</table>'


def regressions_section(replays: Sequence[ReplayReport]) -> str:
    header = _row("th", ["finding", "status", "reproduced", "expected", "runs"])
    rows = []
    for report in replays:
        expected = str(report.expected) if report.expected else "any failure"
        failing = ' class="failing"' if report.status != "fixed" else ""
        rows.append(
            f"<tr{failing}><td>{escape(report.name)}</td>"
            f'<td class="status">{escape(report.status)}</td>'
            f"<td>{report.reproduced}/{report.runs}</td>"
            f'<td class="message">{escape(expected)}</td>'
            f'<td class="message">{escape(" / ".join(report.signatures))}</td></tr>'
        )
    return (
        '<h2>Regression checks</h2>\n<table id="regressions">'
        f"{header}{''.join(rows)}</table>"
    )


def chart_section(data: ReportData) -> str:
    return (
        '<h2>Builds over time</h2>\n<div id="builds-over-time">'
        f"{rate_chart(case_buckets(data.runs))}</div>\n"
        '<p class="note">Each run starts at its first case. A run\'s last bar '
        "covers only the part of its time bucket before the run ended.</p>"
    )


def coverage_section(data: ReportData) -> str:
    cases = sum(run.fuzz_cases for run in data.runs)
    return (
        "<h2>Axis-value coverage</h2>\n"
        f'<p class="note">How many of the {cases} fuzz cases took each value of '
        "each axis; darker is more, relative to the axis's most-taken value. "
        "Shrink builds are not counted.</p>\n"
        f'<div id="coverage">{heat_map(data.coverage, cases)}</div>'
    )


def targets_section(data: ReportData) -> str:
    if not data.per_target:
        return '<h2>Fuzz cases per target</h2>\n<p id="targets">No cases.</p>'
    rows = [_row("th", ["engine/builder", *VERDICTS, "total"])]
    for target, counts in data.per_target.items():
        numbers = "".join(
            f'<td class="number">{counts[verdict]}</td>' for verdict in VERDICTS
        )
        rows.append(
            f"<tr><td>{escape(target)}</td>{numbers}"
            f'<td class="number">{counts.total()}</td></tr>'
        )
    return (
        f'<h2>Fuzz cases per target</h2>\n<table id="targets">{"".join(rows)}</table>'
    )


def _row(tag: str, cells: list[str]) -> str:
    return "<tr>" + "".join(f"<{tag}>{escape(c)}</{tag}>" for c in cells) + "</tr>"
