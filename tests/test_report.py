"""Reports of a results directory: JUnit XML, Markdown and a standalone HTML page.

Most tests build a results directory by hand, so they need no Docker. The
HTML checks open the page in headless Chromium (the Debian package
``chromium``) with its network features off, and only on ``file://`` URLs.
"""

import datetime
import json
import re
import struct
import subprocess
import xml.etree.ElementTree as ElementTree
from dataclasses import replace
from html.parser import HTMLParser
from pathlib import Path

import pytest
import xmlschema
from typer.testing import CliRunner

from buildfuzz.cli import app
from buildfuzz.replay import ReplayReport
from buildfuzz.report import write_reports
from buildfuzz.report_data import (
    MAX_BUCKETS,
    CaseLine,
    RunData,
    case_buckets,
    clean_text,
    load_report,
)
from buildfuzz.results import FORMAT_FILE, FindingRecord, ResultsStore
from buildfuzz.signature import Phase, Signature
from tests.conftest import PROFILES, REPO, buildfuzz

SCHEMA = REPO / "tests" / "data" / "junit-10.xsd"
CHROMIUM = Path("/usr/bin/chromium")
GENERATED = datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
# Text that HTML, XML and Markdown must each escape: markup, quotes, a table
# cell separator, control characters (invalid in XML 1.0) and a lone
# surrogate, as surrogateescape decoding leaves for a non-UTF-8 file name.
NASTY = "<script>alert('x')</script> & \"q\" | \x1b[31m \x00 \udcff end"

RECORD = FindingRecord(
    id="0123456789ab",
    phase="solve",
    message="invalid user index: -<n>",
    oracle="build-error",
    builder="buildx-docker",
    engine="26.1",
    count=23,
    first_seen="2024-01-01T10:00:00+00:00",
    last_seen="2024-01-02T10:00:00+00:00",
    shrunk=True,
    shrink_complete=True,
    shrink_builds=13,
    reproduced=3,
    attempts=3,
    seed=1,
    profile="finding",
)
FLAKY = replace(
    RECORD,
    id="ba9876543210",
    phase="context",
    message=f"failed to read {NASTY}",
    builder="classic",
    count=2,
    reproduced=1,
    flaky=True,
)
BASE_TIME = 1_700_000_000.0


def case_line(
    offset: float,
    *,
    phase: str = "fuzz",
    verdict: str = "pass",
    builder: str = "buildx-docker",
    names: tuple[str, ...] = ("a",),
) -> dict[str, object]:
    signature = RECORD.id if verdict == "finding" else None
    return {
        "time": BASE_TIME + offset,
        "phase": phase,
        "case_id": f"case{offset:.0f}",
        "verdict": verdict,
        "signature": signature,
        "rule": None,
        "oracle": "build-error" if signature else None,
        "seconds": 0.4,
        "axes": {
            "engine": ["26.1"],
            "builder": [builder],
            "output": ["load"],
            "file name": list(names),
        },
    }


def write_run(
    runs: Path, run_id: str, lines: list[dict[str, object]], summary: dict | None
) -> None:
    text = "".join(json.dumps(line) + "\n" for line in lines)
    (runs / f"{run_id}.jsonl").write_text(text)
    if summary is not None:
        (runs / f"{run_id}.json").write_text(json.dumps(summary))


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Two findings and two runs: a killed one (no summary, a cut last line)
    and a finished one."""
    directory = tmp_path / "results"
    store = ResultsStore(directory).open()
    for record in (RECORD, FLAKY):
        store.write(record, {"README.md": f"# Finding {record.id}\n"})
    store.close()

    runs = directory / "runs"
    runs.mkdir()
    killed = [
        case_line(0),
        case_line(30, verdict="finding"),
        case_line(31, phase="shrink", verdict="finding"),
        case_line(70, builder="classic", names=("a", NASTY)),
    ]
    write_run(runs, "20240101T000000Z-1", killed, None)
    with (runs / "20240101T000000Z-1.jsonl").open("a") as stream:
        stream.write('{"time": 1700000100.0, "phase": "fu')

    finished = [
        case_line(86_400),
        case_line(86_410, verdict="expected", builder="classic"),
        case_line(86_420, verdict="finding", names=()),
    ]
    summary = {
        "run_id": "20240102T000000Z-2",
        "elapsed": 30.0,
        "builds_per_minute": 6.0,
        "new_findings": [],
        "known_findings": [RECORD.id, FLAKY.id],
    }
    write_run(runs, "20240102T000000Z-2", finished, summary)
    return directory


REPLAYS = [
    ReplayReport(
        name=RECORD.id,
        expected=Signature(Phase.SOLVE, RECORD.message),
        runs=3,
        reproduced=3,
        signatures=[f"solve: {RECORD.message}"] * 3,
    ),
    ReplayReport(
        name=FLAKY.id,
        expected=Signature(Phase.CONTEXT, FLAKY.message),
        runs=2,
        reproduced=0,
        signatures=["pass", "pass"],
    ),
    ReplayReport(
        name="fedcba987654",
        expected=None,
        runs=1,
        reproduced=0,
        signatures=["load: something else"],
    ),
]


def write_all(
    results: Path, out: Path, replays: list[ReplayReport] | None = None
) -> dict[str, Path]:
    paths = {
        "junit": out / "junit.xml",
        "markdown": out / "summary.md",
        "html": out / "report.html",
    }
    write_reports(
        results,
        junit=paths["junit"],
        markdown=paths["markdown"],
        html=paths["html"],
        replays=replays or [],
        generated=GENERATED,
    )
    return paths


# Reading the results directory.


def test_load_report_counts_runs_and_targets(results: Path) -> None:
    data = load_report(results, generated=GENERATED)

    assert [run.run_id for run in data.runs] == [
        "20240101T000000Z-1",
        "20240102T000000Z-2",
    ]
    assert data.runs[0].summary is None
    assert data.skipped_lines == 0
    assert data.per_target["26.1/buildx-docker"] == {"pass": 2, "finding": 2}
    assert data.per_target["26.1/classic"] == {"pass": 1, "expected": 1}


def test_load_report_skips_lines_of_other_shape(results: Path) -> None:
    with (results / "runs" / "20240102T000000Z-2.jsonl").open("a") as stream:
        stream.write('[1, 2]\n{"time": "soon"}\n{"time": 1, "axes": []}\n')

    data = load_report(results)

    assert data.skipped_lines == 3
    assert len(data.runs[1].lines) == 3


def test_coverage_counts_fuzz_cases_only(results: Path) -> None:
    data = load_report(results)

    assert data.coverage["builder"] == {"buildx-docker": 4, "classic": 2}
    assert data.coverage["file name"] == {"a": 5, NASTY: 1}


def test_buckets_per_minute_of_each_run(results: Path) -> None:
    buckets = case_buckets(load_report(results).runs)

    counts = [(b.run_id[-1], b.start, b.fuzz, b.shrink) for b in buckets]
    assert counts == [("1", 0, 2, 1), ("1", 1, 1, 0), ("2", 0, 3, 0)]


def test_buckets_grow_for_long_runs() -> None:
    lines = [CaseLine(BASE_TIME + 60 * i, "fuzz", "pass", None, {}) for i in range(900)]
    runs = [RunData("r1", lines, None), RunData("r2", lines[:5], None)]

    buckets = case_buckets(runs)

    assert len(buckets) <= MAX_BUCKETS
    assert {bucket.minutes for bucket in buckets} == {5}
    assert sum(bucket.fuzz for bucket in buckets) == 905


def test_clean_text_makes_invalid_characters_visible() -> None:
    assert (
        clean_text("a\x00b\x1bc\udcffd\ufffee\tf") == "a\\x00b\\x1bc\\xffd\\ufffee\tf"
    )
    assert clean_text("ü € 𝄞") == "ü € 𝄞"


# JUnit XML.


def test_junit_validates_against_schema(results: Path, tmp_path: Path) -> None:
    paths = write_all(results, tmp_path / "out", replays=REPLAYS)

    xmlschema.XMLSchema(str(SCHEMA)).validate(str(paths["junit"]))


@pytest.mark.parametrize(
    "document",
    [
        '<testsuite tests="1"><testcase name="x"/></testsuite>',
        '<testsuite name="a" tests="-1"/>',
        '<testsuite name="a" tests="0" timestamp="2024-01-01T00:00:00+00:00"/>',
        '<testsuite name="a" tests="1"><testcase name="x"/><properties/></testsuite>',
        '<testsuite name="a" tests="1"><testcase name="x"><x/></testcase></testsuite>',
    ],
)
def test_schema_rejects_malformed_junit(document: str) -> None:
    assert not xmlschema.XMLSchema(str(SCHEMA)).is_valid(document)


def test_junit_without_findings_validates(tmp_path: Path) -> None:
    results = tmp_path / "empty"
    results.mkdir()
    junit = tmp_path / "junit.xml"

    write_reports(results, junit=junit)

    xmlschema.XMLSchema(str(SCHEMA)).validate(str(junit))
    assert ElementTree.parse(junit).getroot().get("tests") == "0"


def test_junit_has_failing_case_per_finding(results: Path, tmp_path: Path) -> None:
    paths = write_all(results, tmp_path / "out")
    root = ElementTree.parse(paths["junit"]).getroot()

    suites = root.findall("testsuite")
    assert [suite.get("name") for suite in suites] == ["buildfuzz.findings"]
    cases = suites[0].findall("testcase")
    assert len(cases) == 2
    for case, record in zip(cases, (RECORD, FLAKY), strict=True):
        failure = case.find("failure")
        assert failure is not None
        assert case.get("name", "").startswith(record.id)
        assert failure.get("type") == "build-error"
        assert f"phase: {record.phase}" in (failure.text or "")
        assert str(results / record.id) in (failure.text or "")
    assert "reproduced: 3/3" in (cases[0].findtext("failure") or "")
    assert "reproduced: 1/3 flaky" in (cases[1].findtext("failure") or "")


def test_junit_counts_and_timestamp(results: Path, tmp_path: Path) -> None:
    paths = write_all(results, tmp_path / "out", replays=REPLAYS)
    root = ElementTree.parse(paths["junit"]).getroot()
    findings, regressions = root.findall("testsuite")

    assert (root.get("tests"), root.get("failures")) == ("5", "4")
    assert (findings.get("tests"), findings.get("failures")) == ("2", "2")
    assert (regressions.get("tests"), regressions.get("failures")) == ("3", "2")
    assert findings.get("timestamp") == "2024-01-02T03:04:05"
    assert findings.get("time") == "30.000"


def test_junit_regression_fails_unless_fixed(results: Path, tmp_path: Path) -> None:
    paths = write_all(results, tmp_path / "out", replays=REPLAYS)
    suite = ElementTree.parse(paths["junit"]).getroot().findall("testsuite")[1]

    outcomes = {
        case.get("name"): case.find("failure") for case in suite.findall("testcase")
    }
    still_failing = outcomes[RECORD.id]
    changed = outcomes["fedcba987654"]
    assert still_failing is not None
    assert still_failing.get("type") == "still failing"
    assert changed is not None
    assert changed.get("type") == "changed signature"
    assert outcomes[FLAKY.id] is None


def test_junit_escapes_nasty_text(results: Path, tmp_path: Path) -> None:
    paths = write_all(results, tmp_path / "out")
    root = ElementTree.parse(paths["junit"]).getroot()

    message = root.findall("testsuite/testcase/failure")[1].get("message", "")
    assert message == f"context: failed to read {clean_text(NASTY)}"
    assert "<script>" in message


# Markdown.


def test_markdown_has_finding_rows(results: Path, tmp_path: Path) -> None:
    paths = write_all(results, tmp_path / "out")
    text = paths["markdown"].read_text()

    rows = [line for line in text.splitlines() if line.startswith("| [")]
    assert len(rows) == 2
    assert rows[0].startswith(f"| [{RECORD.id}](../results/{RECORD.id}/README.md) |")
    assert "| 3/3 |" in rows[0]
    assert "| 1/3 flaky |" in rows[1]
    assert "| 2024-01-01T10:00:00+00:00 | 2024-01-02T10:00:00+00:00 |" in rows[0]


def test_markdown_totals(results: Path, tmp_path: Path) -> None:
    text = write_all(results, tmp_path / "out")["markdown"].read_text()

    assert "- runs: 2" in text
    assert "- fuzz cases: 6 (and 1 shrink builds)" in text
    assert "- builds per minute of the last run: 6.0" in text
    assert "- findings: 2 distinct; in the last run 0 new and 2 known; 1 flaky" in text


def test_markdown_escapes_table_cells(results: Path, tmp_path: Path) -> None:
    text = write_all(results, tmp_path / "out")["markdown"].read_text()
    row = next(line for line in text.splitlines() if FLAKY.id in line)

    unescaped_pipes = re.findall(r"(?<!\\)\|", row)
    assert len(unescaped_pipes) == 8
    assert "<script>" not in row
    assert "\\<script\\>" in row


def test_markdown_regressions_and_targets(results: Path, tmp_path: Path) -> None:
    text = write_all(results, tmp_path / "out", replays=REPLAYS)["markdown"].read_text()

    assert "## Regression checks" in text
    assert f"| {RECORD.id} | still failing | 3/3 |" in text
    assert f"| {FLAKY.id} | fixed | 0/2 |" in text
    assert "| fedcba987654 | changed signature | 0/1 | any failure |" in text
    assert "| 26.1/buildx-docker | 2 | 0 | 2 | 4 |" in text
    assert "| 26.1/classic | 1 | 1 | 0 | 2 |" in text


# HTML.


class PageOutline(HTMLParser):
    """The start tags of a page, each with the id of its nearest ancestor
    that has one, and the text inside each id."""

    VOID = {"meta", "br", "img", "input", "link", "hr", "wbr"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []
        self.tags: list[tuple[str, dict[str, str | None], str | None]] = []
        self.text: dict[str, list[str]] = {}

    def section(self) -> str | None:
        return next((i for i in reversed(self.stack) if i is not None), None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        self.tags.append((tag, attributes, self.section()))
        if tag not in self.VOID:
            self.stack.append(attributes.get("id"))

    def handle_endtag(self, tag: str) -> None:
        if tag not in self.VOID:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        section = self.section()
        if section is not None:
            self.text.setdefault(section, []).append(data)

    def count(self, tag: str, section: str, css_class: str | None = None) -> int:
        return sum(
            1
            for name, attributes, within in self.tags
            if name == tag
            and within == section
            and (css_class is None or css_class in (attributes.get("class") or ""))
        )


def outline(path: Path) -> PageOutline:
    parser = PageOutline()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def test_html_has_findings_table(results: Path, tmp_path: Path) -> None:
    page = outline(write_all(results, tmp_path / "out")["html"])

    tables = [a.get("id") for tag, a, _ in page.tags if tag == "table"]
    assert tables == ["findings", "targets"]
    assert page.count("tr", "findings") == 3
    links = [a.get("href") for tag, a, _ in page.tags if tag == "a"]
    assert links == [
        f"../results/{RECORD.id}/README.md",
        f"../results/{FLAKY.id}/README.md",
    ]
    assert page.stack == []


def test_html_has_heat_map_and_chart(results: Path, tmp_path: Path) -> None:
    page = outline(write_all(results, tmp_path / "out")["html"])

    assert page.count("div", "coverage", "axis-name") == 4
    assert page.count("span", "coverage", "cell") == 6
    assert "file name" in page.text["coverage"]
    assert page.count("svg", "builds-over-time") == 1
    assert page.count("rect", "builds-over-time") >= 6
    assert page.count("tr", "targets") == 3


def test_html_escapes_text_and_loads_nothing(results: Path, tmp_path: Path) -> None:
    page_path = write_all(results, tmp_path / "out", replays=REPLAYS)["html"]
    text = page_path.read_text(encoding="utf-8")
    page = outline(page_path)

    assert "<script" not in text
    assert "\x00" not in text
    assert clean_text(f"failed to read {NASTY}") in "".join(page.text["findings"])
    sources = [a.get("src") for _, a, _ in page.tags if a.get("src")]
    assert sources == []
    assert not [a for _, a, _ in page.tags if "http" in (a.get("href") or "")]


def chromium_screenshot(page: Path, out: Path) -> tuple[str, Path]:
    """Open ``page`` in headless Chromium and return its log and screenshot."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install the Debian package chromium")
    shot = out / f"{page.stem}.png"
    completed = subprocess.run(
        [
            str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
            "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync",
            f"--user-data-dir={out / 'profile'}", "--enable-logging=stderr",
            "--v=0", f"--screenshot={shot}", "--window-size=1280,2000",
            page.absolute().as_uri(),
        ],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stderr, shot


def console_messages(log: str) -> list[str]:
    return [
        line for line in log.splitlines() if "CONSOLE" in line or "Uncaught" in line
    ]


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    return width, height


def assert_page_opens_cleanly(page: Path, out: Path) -> None:
    log, shot = chromium_screenshot(page, out)

    assert console_messages(log) == []
    assert shot.exists()
    assert png_size(shot) == (1280, 2000)
    assert shot.stat().st_size > 20_000


def test_html_opens_in_chromium(results: Path, tmp_path: Path) -> None:
    page = write_all(results, tmp_path / "out", replays=REPLAYS)["html"]

    assert_page_opens_cleanly(page, tmp_path)


def test_chromium_check_sees_console_errors(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><body><script>nosuch();</script></body>")

    log, _ = chromium_screenshot(page, tmp_path)

    assert any("Uncaught ReferenceError" in line for line in console_messages(log))


# The command line.


def test_report_command_writes_files(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    arguments = ["report", "--results", str(results), "--junit", str(out / "j.xml")]

    outcome = CliRunner().invoke(
        app,
        [*arguments, "--markdown", str(out / "s.md"), "--html", str(out / "r.html")],
    )

    assert outcome.exit_code == 0, outcome.output
    assert outcome.output.splitlines() == [
        f"wrote {out / name}" for name in ("j.xml", "s.md", "r.html")
    ]
    for name in ("j.xml", "s.md", "r.html"):
        assert (out / name).stat().st_size > 0


def assert_one_line_error(completed, mentions: str) -> None:
    assert completed.returncode == 2
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1, completed.stderr
    assert lines[0].startswith("buildfuzz: error: ")
    assert mentions in lines[0]


def test_report_rejects_missing_results(tmp_path: Path) -> None:
    completed = buildfuzz(
        "report", "--results", str(tmp_path / "nosuch"), "--html", str(tmp_path / "r"),
        cwd=REPO,
    )  # fmt: skip

    assert_one_line_error(completed, "not found")
    assert not (tmp_path / "r").exists()


def test_report_needs_an_output(results: Path) -> None:
    completed = buildfuzz("report", "--results", str(results), cwd=REPO)

    assert_one_line_error(completed, "--junit, --markdown and --html")


def test_report_rejects_other_format(results: Path, tmp_path: Path) -> None:
    (results / FORMAT_FILE).write_text("99\n")

    completed = buildfuzz(
        "report", "--results", str(results), "--junit", str(tmp_path / "j.xml"),
        cwd=REPO,
    )  # fmt: skip

    assert_one_line_error(completed, "format '99'")


def test_report_skips_corrupt_finding(results: Path, tmp_path: Path) -> None:
    """A damaged finding.json is named in a warning; the report still comes out."""
    (results / RECORD.id / "finding.json").write_text("{not json")

    completed = buildfuzz(
        "report", "--results", str(results), "--junit", str(tmp_path / "j.xml"),
        cwd=REPO,
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr
    assert "cannot read finding" in completed.stderr
    assert "remove its directory to drop the finding" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert (tmp_path / "j.xml").exists()


def test_report_rejects_unwritable_output(results: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")

    completed = buildfuzz(
        "report", "--results", str(results), "--html", str(blocker / "r.html"),
        cwd=REPO,
    )  # fmt: skip

    assert_one_line_error(completed, "cannot write --html")


# End to end, with a real run.


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_report_of_real_run(tmp_path: Path, workdir: Path) -> None:
    results = tmp_path / "results"
    run = buildfuzz(
        "run", "--budget", "20s", "--profile", str(PROFILES / "finding.toml"),
        "--results", str(results), "--workdir", str(workdir), "--log-format", "json",
        cwd=REPO,
    )  # fmt: skip
    assert run.returncode == 1, run.stderr[-2000:]
    finding_ids = sorted(path.parent.name for path in results.glob("*/finding.json"))
    assert finding_ids

    out = tmp_path / "out"
    report = buildfuzz(
        "report", "--results", str(results), "--junit", str(out / "junit.xml"),
        "--markdown", str(out / "summary.md"), "--html", str(out / "report.html"),
        cwd=REPO,
    )  # fmt: skip

    assert report.returncode == 0, report.stderr
    xmlschema.XMLSchema(str(SCHEMA)).validate(str(out / "junit.xml"))
    suite = ElementTree.parse(out / "junit.xml").getroot().find("testsuite")
    assert suite is not None
    failing = [
        case for case in suite.findall("testcase") if case.find("failure") is not None
    ]
    assert sorted(case.get("name", "")[:12] for case in failing) == finding_ids
    summary = (out / "summary.md").read_text()
    for finding_id in finding_ids:
        assert f"| [{finding_id}](../results/{finding_id}/README.md) |" in summary
    page = outline(out / "report.html")
    assert page.count("tr", "findings") == len(finding_ids) + 1
    assert page.count("span", "coverage", "cell") > 0
    assert_page_opens_cleanly(out / "report.html", tmp_path)
