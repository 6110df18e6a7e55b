"""Tests of `buildfuzz results merge`: combining the results of several shards."""

import json
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from buildfuzz.case import Case, ContextFile
from buildfuzz.cli import app
from buildfuzz.finding_page import render_finding_readme
from buildfuzz.finding_writer import FindingWriter, case_target
from buildfuzz.profile import load_profile
from buildfuzz.results import FORMAT_FILE, FindingRecord, ResultsStore
from buildfuzz.results_merge import merge_results
from buildfuzz.strategies import Target
from tests.conftest import REPO, buildfuzz

SHARED = "aaaaaaaaaaaa"
ONLY_A = "bbbbbbbbbbbb"
ONLY_B = "cccccccccccc"

RECORD = FindingRecord(
    id=SHARED,
    phase="solve",
    message="failed to compute cache key: <q> not found",
    oracle="build-error",
    builder="classic",
    engine="26.1",
    count=1,
    first_seen="2024-05-01T10:00:00+00:00",
    last_seen="2024-05-01T10:00:00+00:00",
    shrunk=True,
    shrink_complete=True,
    shrink_builds=10,
    reproduced=3,
    attempts=3,
    seed=7,
    profile="default",
)
SMALL = Case(dockerfile=("FROM scratch", "COPY . /"), builder="classic")
LARGE = Case(
    files=(ContextFile("a"), ContextFile("b", size=3), ContextFile("c")),
    dockerfile=("FROM scratch", "WORKDIR /w", "COPY . /"),
    builder="classic",
)


def readme(record: FindingRecord, case: Case, results_name: str) -> str:
    """Render a finding's README.md as `buildfuzz run` does."""
    return render_finding_readme(
        record,
        case,
        profile=load_profile("default"),
        targets=(Target("26.1", "classic"),),
        environment={},
        log="log\n",
        results_name=results_name,
    )


def add_finding(
    root: Path, record: FindingRecord, case: Case, *, log: str = "log\n"
) -> None:
    """Write a finding as `buildfuzz run` would, with every companion file."""
    store = ResultsStore(root).open()
    try:
        store.write(
            record,
            {
                "case.json": case.to_json(),
                "original.json": LARGE.with_changes(engine="27.0").to_json(),
                "build.log": log,
                "environment.json": json.dumps({"seed": record.seed}) + "\n",
                "repro.sh": "#!/bin/sh\nexit 0\n",
                "README.md": readme(record, case, root.name),
            },
        )
    finally:
        store.close()


def add_run(root: Path, name: str, content: str) -> None:
    (root / "runs").mkdir(parents=True, exist_ok=True)
    (root / "runs" / name).write_text(content)


def tree(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Return every file under ``directory`` with its content and mode.

    Trees are compared between outputs of the same name, because finding
    READMEs name the results directory in their commands.
    """
    return {
        str(path.relative_to(directory)): (path.read_bytes(), path.stat().st_mode)
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def load(root: Path, finding_id: str) -> FindingRecord:
    record = ResultsStore(root).load(finding_id)
    assert record is not None
    return record


@pytest.fixture
def shard_a(tmp_path: Path) -> Path:
    root = tmp_path / "shard-a"
    shared = replace(
        RECORD,
        count=2,
        first_seen="2024-05-01T10:00:00+00:00",
        last_seen="2024-05-01T12:00:00+00:00",
        shrunk=False,
        shrink_complete=False,
        seen_on=["26.1/classic"],
    )
    add_finding(root, shared, LARGE, log="log of shard a\n")
    add_finding(root, replace(RECORD, id=ONLY_A, message="other"), SMALL)
    add_run(root, "20240501T100000Z-7.jsonl", '{"phase": "fuzz"}\n')
    add_run(root, "20240501T100000Z-7.json", '{"seed": 7}\n')
    add_run(root, "20240501T090000Z-1.jsonl", '{"from": "a"}\n')
    add_run(root, "20240501T080000Z-2.jsonl", '{"killed": true}\n')
    return root


@pytest.fixture
def shard_b(tmp_path: Path) -> Path:
    root = tmp_path / "shard-b"
    shared = replace(
        RECORD,
        count=5,
        first_seen="2024-05-01T09:30:00+00:00",
        last_seen="2024-05-01T11:00:00+00:00",
        seen_on=["26.1+vfs/buildx-docker"],
    )
    add_finding(root, shared, SMALL, log="log of shard b\n")
    add_finding(root, replace(RECORD, id=ONLY_B, message="third"), SMALL)
    add_run(root, "20240501T100000Z-7.jsonl", '{"phase": "fuzz"}\n')
    add_run(root, "20240501T090000Z-1.jsonl", '{"from": "b"}\n')
    add_run(root, "20240501T080000Z-2.jsonl", '{"killed": true}\n')
    add_run(root, "20240501T080000Z-2.json", '{"ended": true}\n')
    return root


def test_shared_finding_is_combined(
    shard_a: Path, shard_b: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    summary = merge_results([shard_a, shard_b], out)

    assert (summary.findings, summary.shared) == (3, 1)
    record = load(out, SHARED)
    assert record.count == 7
    assert record.first_seen == "2024-05-01T09:30:00+00:00"
    assert record.last_seen == "2024-05-01T12:00:00+00:00"
    assert record.shrunk and record.shrink_complete
    assert record.seen_on == sorted(
        {"26.1/classic", "26.1+vfs/buildx-docker", case_target(SMALL), "27.0/classic"}
    )
    for name in ("case.json", "build.log", "original.json", "repro.sh"):
        assert (out / SHARED / name).read_bytes() == (
            shard_b / SHARED / name
        ).read_bytes()
    assert (out / SHARED / "README.md").read_text() == readme(record, SMALL, "out")
    assert (out / ONLY_A / "README.md").read_text() == readme(
        load(out, ONLY_A), SMALL, "out"
    )
    assert load(out, ONLY_A) == replace(
        load(shard_a, ONLY_A), seen_on=[case_target(SMALL), "27.0/classic"]
    )
    assert load(out, ONLY_B).message == "third"
    assert (out / FORMAT_FILE).read_text() == "1\n"


def test_runs_are_united_by_name(shard_a: Path, shard_b: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    merge_results([shard_a, shard_b], out)

    runs = {path.name: path.read_text() for path in (out / "runs").iterdir()}
    assert runs.pop("20240501T100000Z-7.jsonl") == '{"phase": "fuzz"}\n'
    assert runs.pop("20240501T100000Z-7.json") == '{"seed": 7}\n'
    # A run killed in one copy and finished in the other is one run.
    assert runs.pop("20240501T080000Z-2.jsonl") == '{"killed": true}\n'
    assert runs.pop("20240501T080000Z-2.json") == '{"ended": true}\n'
    # Two different runs of the same id are both kept, each with a suffix.
    assert sorted(runs.values()) == ['{"from": "a"}\n', '{"from": "b"}\n']
    assert all(name.startswith("20240501T090000Z-1-") for name in runs)
    assert all(name.endswith(".jsonl") for name in runs)


def test_merge_does_not_depend_on_order(
    shard_a: Path, shard_b: Path, tmp_path: Path
) -> None:
    merge_results([shard_a, shard_b], tmp_path / "ab" / "out")
    merge_results([shard_b, shard_a], tmp_path / "ba" / "out")

    assert tree(tmp_path / "ab" / "out") == tree(tmp_path / "ba" / "out")


def test_equal_cases_are_chosen_by_content_hash(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    add_finding(first, RECORD, SMALL.with_changes(platform="linux/arm64"), log="1\n")
    add_finding(second, RECORD, SMALL.with_changes(platform="linux/amd64"), log="2\n")

    merge_results([first, second], tmp_path / "forward" / "out")
    merge_results([second, first], tmp_path / "backward" / "out")

    assert tree(tmp_path / "forward" / "out") == tree(tmp_path / "backward" / "out")


def test_merging_again_changes_nothing(
    shard_a: Path, shard_b: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    merge_results([shard_a, shard_b], out)
    merged = tree(out)

    merge_results([shard_a, shard_b], out)
    assert tree(out) == merged

    merge_results([out], out)
    assert tree(out) == merged

    merge_results([out, out], out)
    assert tree(out) == merged

    merge_results([out], tmp_path / "copy" / "out")
    assert tree(tmp_path / "copy" / "out") == merged


def test_new_shard_adds_to_earlier_merge(
    shard_a: Path, shard_b: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    merge_results([shard_a], out)

    merge_results([out, shard_b], out)

    merge_results([shard_a, shard_b], tmp_path / "direct" / "out")
    assert tree(out) == tree(tmp_path / "direct" / "out")


@pytest.mark.parametrize(
    ("better", "worse"),
    [
        ({"shrunk": True}, {"shrunk": False, "shrink_complete": False}),
        ({"shrink_complete": True}, {"shrink_complete": False}),
        ({"case": SMALL}, {"case": LARGE}),
        (
            {"case": SMALL},
            {"case": SMALL.with_changes(dockerfile=(*SMALL.dockerfile, "USER 1"))},
        ),
        ({"reproduced": 3}, {"reproduced": 1}),
    ],
    ids=["shrunk", "complete", "fewer files", "fewer lines", "higher rate"],
)
def test_best_case_is_kept(
    better: dict[str, object], worse: dict[str, object], tmp_path: Path
) -> None:
    for name, changes in (("better", better), ("worse", worse)):
        fields = {key: value for key, value in changes.items() if key != "case"}
        case = changes.get("case", SMALL)
        assert isinstance(case, Case)
        add_finding(tmp_path / name, replace(RECORD, **fields), case, log=name)

    merge_results([tmp_path / "worse", tmp_path / "better"], tmp_path / "out")

    assert (tmp_path / "out" / SHARED / "build.log").read_text() == "better"


def test_old_record_without_seen_on_is_read(tmp_path: Path) -> None:
    root = tmp_path / "old"
    add_finding(root, RECORD, SMALL)
    path = root / SHARED / "finding.json"
    data = json.loads(path.read_text())
    del data["seen_on"]
    path.write_text(json.dumps(data))

    assert load(root, SHARED) == replace(RECORD, seen_on=[])
    merge_results([root], tmp_path / "out")
    assert load(tmp_path / "out", SHARED).seen_on == ["26.1/classic", "27.0/classic"]


def test_finding_record_json_has_seen_on(tmp_path: Path) -> None:
    add_finding(tmp_path, replace(RECORD, seen_on=["26.1/classic"]), SMALL)

    data = json.loads((tmp_path / SHARED / "finding.json").read_text())

    assert data["seen_on"] == ["26.1/classic"]
    assert set(data) == set(asdict(RECORD))


def test_finding_seen_again_records_its_target(tmp_path: Path) -> None:
    add_finding(tmp_path, replace(RECORD, seen_on=["26.1/classic"]), SMALL)
    store = ResultsStore(tmp_path).open()
    # Seeing a known finding again uses only the store, profile and targets.
    writer = FindingWriter(
        store,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        profile=load_profile("default"),
        targets=(Target("26.1", "classic"),),
        seed=7,
        build_timeout=60,
    )
    again = SMALL.with_changes(storage_driver="vfs", builder="buildx-docker")
    event = SimpleNamespace(
        signature=SimpleNamespace(id=SHARED),
        original=SimpleNamespace(case=again),
        shrunk=None,
        new=False,
    )
    try:
        writer.write(event)  # type: ignore[arg-type]
    finally:
        store.close()

    record = load(tmp_path, SHARED)
    assert record.seen_on == ["26.1+vfs/buildx-docker", "26.1/classic"]
    assert record.count == 2
    assert "seen 2 times" in (tmp_path / SHARED / "README.md").read_text()


def test_merge_output_is_read_by_the_other_commands(
    shard_a: Path, shard_b: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    merged = buildfuzz(
        "results", "merge", str(shard_a), str(shard_b), "--into", str(out), cwd=REPO
    )
    assert merged.returncode == 0, merged.stderr
    assert "3 findings (1 found in more than one input)" in merged.stdout

    listed = buildfuzz("results", "--results", str(out), cwd=REPO)
    assert listed.returncode == 0, listed.stderr
    assert f"{SHARED}  solve" in listed.stdout
    assert "x7" in listed.stdout

    summary = tmp_path / "summary.md"
    reported = buildfuzz(
        "report", "--results", str(out), "--markdown", str(summary), cwd=REPO
    )
    assert reported.returncode == 0, reported.stderr
    assert SHARED in summary.read_text()


# Each spoiler damages shard ``root`` or makes another bad input, and returns
# the input to merge and the path that the error message has to name.
def corrupt_json(root: Path) -> tuple[Path, Path]:
    path = root / SHARED / "finding.json"
    path.write_text('{"id": ')
    return root, path


def edit_record(root: Path, **changes: object) -> tuple[Path, Path]:
    path = root / SHARED / "finding.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))
    return root, path


def wrong_type(root: Path) -> tuple[Path, Path]:
    return edit_record(root, count="7")


def unknown_field(root: Path) -> tuple[Path, Path]:
    return edit_record(root, colour="red")


def bad_time(root: Path) -> tuple[Path, Path]:
    return edit_record(root, last_seen="yesterday")


def corrupt_case(root: Path) -> tuple[Path, Path]:
    path = root / SHARED / "case.json"
    path.write_text("[")
    return root, path


def other_format(root: Path) -> tuple[Path, Path]:
    (root / FORMAT_FILE).write_text("2\n")
    return root, root


def missing(root: Path) -> tuple[Path, Path]:
    return root.parent / "missing", root.parent / "missing"


def plain_file(root: Path) -> tuple[Path, Path]:
    path = root.parent / "file"
    path.write_text("not a directory\n")
    return path, path


def plain_directory(root: Path) -> tuple[Path, Path]:
    path = root.parent / "plain"
    (path / "notes").mkdir(parents=True)
    return path, path


@pytest.mark.parametrize(
    ("spoil", "mentions"),
    [
        (missing, "not found"),
        (plain_file, "is not a directory"),
        (plain_directory, "is not a buildfuzz results directory"),
        (other_format, "has format '2'"),
        (corrupt_json, "not valid JSON"),
        (wrong_type, "field 'count' is not of type int"),
        (bad_time, "field 'last_seen' is not an ISO 8601 time"),
        (unknown_field, "unexpected keyword argument 'colour'"),
        (corrupt_case, "not valid JSON"),
    ],
)
def test_bad_input_fails_cleanly(
    spoil, mentions: str, shard_a: Path, shard_b: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    merge_results([shard_a], out)
    before = tree(out)
    bad, named = spoil(shard_b)

    outcome = CliRunner().invoke(
        app, ["results", "merge", str(shard_a), str(bad), "--into", str(out)]
    )

    assert outcome.exit_code == 2
    lines = outcome.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("buildfuzz: error: ")
    assert mentions in lines[0]
    assert str(named) in lines[0]
    assert tree(out) == before


def test_bad_input_creates_no_output(shard_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"

    outcome = CliRunner().invoke(
        app, ["results", "merge", str(shard_a), str(tmp_path / "x"), "--into", str(out)]
    )

    assert outcome.exit_code == 2
    assert not out.exists()


def test_output_with_other_findings_is_rejected(
    shard_a: Path, shard_b: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    merge_results([shard_b], out)
    before = tree(out)

    completed = buildfuzz(
        "results", "merge", str(shard_a), "--into", str(out), cwd=REPO
    )

    assert completed.returncode == 2
    assert f"--into {out} contains {ONLY_B}, which no input has" in completed.stderr
    assert "Traceback" not in completed.stderr
    assert tree(out) == before


def test_foreign_output_is_rejected(shard_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")

    outcome = CliRunner().invoke(
        app, ["results", "merge", str(shard_a), "--into", str(out)]
    )

    assert outcome.exit_code == 2
    assert "not empty and not a buildfuzz results directory" in outcome.stderr
    assert tree(out) == {"notes.txt": (b"mine\n", (out / "notes.txt").stat().st_mode)}


def test_finding_page_heredoc_one_row() -> None:
    case = Case(dockerfile=("FROM scratch", "COPY <<EOF /a\nx | y\nEOF"))

    page = readme(RECORD, case, "results")
    row = next(line for line in page.splitlines() if line.startswith("| Dockerfile"))

    assert "COPY <<EOF /a\\nx \\| y\\nEOF" in row
    assert row.endswith("|")


def test_results_show_reads_the_group_results_option(shard_a: Path) -> None:
    before = CliRunner().invoke(
        app, ["results", "show", SHARED, "--results", str(shard_a)]
    )
    group = CliRunner().invoke(
        app, ["results", "--results", str(shard_a), "show", SHARED]
    )

    assert before.exit_code == 0, before.output
    assert group.exit_code == 0, group.output
    assert group.stdout == before.stdout
