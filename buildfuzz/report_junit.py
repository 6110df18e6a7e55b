"""The JUnit XML report, for CI systems that show test results.

Each finding is a failing test case of the suite ``buildfuzz.findings``, and
each replayed finding is a test case of ``buildfuzz.regressions`` that fails
unless replay found it fixed. The layout follows the common Jenkins-style
JUnit format that ``tests/data/junit-10.xsd`` describes.
"""

import datetime
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from pathlib import Path

from buildfuzz.replay import ReplayReport, Status
from buildfuzz.report_data import ReportData, clean_text, rate_text
from buildfuzz.results import FindingRecord


def render_junit(data: ReportData, replays: Sequence[ReplayReport] = ()) -> str:
    """Return the JUnit XML document of ``data`` and of the replay reports."""
    timestamp = junit_timestamp(data.generated)
    suites = [findings_suite(data, timestamp)]
    if replays:
        suites.append(regressions_suite(replays, timestamp))
    root = ElementTree.Element("testsuites", name="buildfuzz")
    _count_suites(root, suites)
    root.extend(suites)
    ElementTree.indent(root)
    body = ElementTree.tostring(root, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{body}\n'


def junit_timestamp(moment: datetime.datetime) -> str:
    """Return ``moment`` in UTC without a zone, as JUnit timestamps are written."""
    utc = moment.astimezone(datetime.UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S")


def findings_suite(data: ReportData, timestamp: str) -> ElementTree.Element:
    elapsed = sum(
        float(run.summary.get("elapsed", 0) or 0) for run in data.runs if run.summary
    )
    suite = _suite("buildfuzz.findings", timestamp, elapsed)
    properties = ElementTree.SubElement(suite, "properties")
    for name, value in (
        ("results", str(data.results)),
        ("runs", str(len(data.runs))),
        ("cases", str(sum(run.fuzz_cases for run in data.runs))),
    ):
        ElementTree.SubElement(properties, "property", name=name, value=value)
    for record in data.findings:
        suite.append(finding_case(record, data.results / record.id))
    _count_cases(suite)
    return suite


def finding_case(record: FindingRecord, directory: Path) -> ElementTree.Element:
    signature = clean_text(f"{record.phase}: {record.message}")
    case = ElementTree.Element(
        "testcase",
        name=f"{record.id} {signature}",
        classname="buildfuzz.findings",
        time="0",
    )
    failure = ElementTree.SubElement(
        case, "failure", message=signature, type=clean_text(record.oracle)
    )
    failure.text = "\n".join(
        [
            signature,
            f"phase: {clean_text(record.phase)}",
            f"oracle: {clean_text(record.oracle)}",
            f"target: {clean_text(record.engine)}/{clean_text(record.builder)}",
            f"reproduced: {rate_text(record)}",
            f"seen: {'once' if record.count == 1 else f'{record.count} times'}, "
            f"first {record.first_seen}, "
            f"last {record.last_seen}",
            f"finding: {clean_text(directory)} (README.md, case.json, repro.sh)",
        ]
    )
    return case


def regressions_suite(
    replays: Sequence[ReplayReport], timestamp: str
) -> ElementTree.Element:
    suite = _suite("buildfuzz.regressions", timestamp, 0.0)
    for report in replays:
        suite.append(regression_case(report))
    _count_cases(suite)
    return suite


def regression_case(report: ReplayReport) -> ElementTree.Element:
    case = ElementTree.Element(
        "testcase",
        name=clean_text(report.name),
        classname="buildfuzz.regressions",
        time="0",
    )
    expected = str(report.expected) if report.expected else "any failure"
    details = [
        f"status: {report.status}",
        f"expected: {clean_text(expected)}",
        f"reproduced: {report.reproduced}/{report.runs}",
        *(
            f"run {attempt}: {clean_text(signature)}"
            for attempt, signature in enumerate(report.signatures, start=1)
        ),
    ]
    if report.status is Status.FIXED:
        ElementTree.SubElement(case, "system-out").text = "\n".join(details)
        return case
    failure = ElementTree.SubElement(
        case,
        "failure",
        message=f"{report.status}: reproduced {report.reproduced}/{report.runs}",
        type=str(report.status),
    )
    failure.text = "\n".join(details)
    return case


def _suite(name: str, timestamp: str, elapsed: float) -> ElementTree.Element:
    return ElementTree.Element(
        "testsuite", name=name, timestamp=timestamp, time=f"{elapsed:.3f}"
    )


def _count_cases(suite: ElementTree.Element) -> None:
    cases = suite.findall("testcase")
    failures = sum(case.find("failure") is not None for case in cases)
    suite.set("tests", str(len(cases)))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suite.set("skipped", "0")


def _count_suites(
    root: ElementTree.Element, suites: Sequence[ElementTree.Element]
) -> None:
    for name in ("tests", "failures", "errors"):
        root.set(name, str(sum(int(suite.get(name, "0")) for suite in suites)))
    elapsed = sum(float(suite.get("time", "0")) for suite in suites)
    root.set("time", f"{elapsed:.3f}")
