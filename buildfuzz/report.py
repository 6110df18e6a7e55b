"""Reports of a results directory for people and CI systems.

``write_reports`` reads the results directory once and writes any of three
reports: JUnit XML (``report_junit``), a Markdown summary for a CI job page
(``report_markdown``) and a self-contained HTML page (``report_html``).
"""

import datetime
from collections.abc import Sequence
from pathlib import Path

from buildfuzz.errors import UsageError
from buildfuzz.replay import ReplayReport
from buildfuzz.report_data import ReportData, load_report
from buildfuzz.report_html import render_html
from buildfuzz.report_junit import render_junit
from buildfuzz.report_markdown import render_markdown
from buildfuzz.results import write_atomic


def write_reports(
    results: Path,
    *,
    junit: Path | None = None,
    markdown: Path | None = None,
    html: Path | None = None,
    replays: Sequence[ReplayReport] = (),
    generated: datetime.datetime | None = None,
) -> list[Path]:
    """Write the requested reports of ``results`` and return their paths.

    ``replays`` adds a regression check per replayed finding. Raises
    UsageError or ResultsError when the results cannot be read or a report
    cannot be written.
    """
    data = load_report(results, generated=generated)
    written = []
    if junit is not None:
        _write(junit, render_junit(data, replays), option="--junit")
        written.append(junit)
    if markdown is not None:
        _write(markdown, _markdown(data, replays, markdown), option="--markdown")
        written.append(markdown)
    if html is not None:
        page = render_html(data, replays, link_from=html.absolute().parent)
        _write(html, page, option="--html")
        written.append(html)
    return written


def _markdown(data: ReportData, replays: Sequence[ReplayReport], path: Path) -> str:
    return render_markdown(data, replays, link_from=path.absolute().parent)


def _write(path: Path, text: str, *, option: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, text)
    except OSError as error:
        raise UsageError(
            f"cannot write {option} {path}: {error.strerror or error}; "
            "give a writable file path"
        ) from None
