"""Tests of the case model: JSON round trip and rejection of malformed cases."""

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from structlog.testing import capture_logs

from buildfuzz.case import (
    CASE_SCHEMA,
    BulkRecipe,
    Case,
    ContextFile,
    FileKind,
    Output,
    case_from_dict,
    load_case,
)
from buildfuzz.errors import DataFileError
from buildfuzz.profile import load_profile
from buildfuzz.strategies import Target, cases

TARGETS = [
    Target("26.1", "buildx-docker", (Output.LOAD, Output.TAR, Output.LOCAL)),
    Target("26.1", "classic", (Output.LOAD,)),
]
DEFAULT_CASES = cases(load_profile("default"), TARGETS)


def case_dict(**changes: object) -> dict[str, object]:
    data = Case(files=(ContextFile("a"),)).to_dict()
    data.update(changes)
    return data


@settings(max_examples=60, deadline=None)
@given(DEFAULT_CASES)
def test_generated_case_round_trips(case: Case) -> None:
    loaded = case_from_dict(json.loads(case.to_json()))

    assert loaded == case
    assert loaded.id == case.id


def test_case_file_round_trips(tmp_path) -> None:
    case = Case(
        files=(
            ContextFile("dir", FileKind.DIR, mode=0o1777),
            ContextFile("dir/f", size=513, mode=0o4755, uid=1000, seed=7),
            ContextFile("dir/h", FileKind.HARDLINK, size=513, target="dir/f"),
            ContextFile("s", FileKind.SYMLINK, target="../outside"),
        ),
        dockerignore=("*.txt", "!b.txt"),
        dockerfile=("FROM scratch", "COPY . /ctx/"),
        builder="classic",
        platform="linux/amd64",
        build_args=(("A", "1"), ("B", "two")),
        output=Output.TAR,
    )
    path = tmp_path / "case.json"
    path.write_text(case.to_json())

    assert load_case(path) == case


def test_finding_directory_loads_case(tmp_path) -> None:
    case = Case(files=(ContextFile("a", size=1),))
    (tmp_path / "case.json").write_text(case.to_json())

    assert load_case(tmp_path) == case


def test_non_utf8_path_round_trips(tmp_path) -> None:
    case = Case(
        files=(
            ContextFile("bad\udcff"),
            ContextFile("link\udc80", FileKind.SYMLINK, target="bad\udcff"),
        ),
        dockerfile=("FROM scratch", 'COPY ["bad\udcff", "/picked/"]'),
    )
    path = tmp_path / "case.json"
    path.write_text(case.to_json())

    loaded = load_case(path)

    assert loaded == case
    assert loaded.files[0].path == "bad\udcff"
    assert "\\udcff" in path.read_text()


def test_empty_dockerignore_differs_from_none() -> None:
    with_empty = Case(dockerignore=())

    loaded = case_from_dict(json.loads(with_empty.to_json()))

    assert loaded.dockerignore == ()
    assert case_from_dict(json.loads(Case().to_json())).dockerignore is None


def test_invalid_json_is_rejected(tmp_path) -> None:
    path = tmp_path / "case.json"
    path.write_text('{"schema": 1,\n "files": [')

    with pytest.raises(DataFileError) as raised:
        load_case(path)

    assert str(path) in str(raised.value)
    assert "not valid JSON" in str(raised.value)
    assert "line 2" in str(raised.value)


def test_non_object_json_is_rejected(tmp_path) -> None:
    path = tmp_path / "case.json"
    path.write_text("[1, 2]\n")

    with pytest.raises(DataFileError) as raised:
        load_case(path)

    assert "JSON object" in str(raised.value)


def test_wrong_schema_says_what_to_do() -> None:
    data = case_dict(schema=CASE_SCHEMA + 1)

    with pytest.raises(DataFileError) as raised:
        case_from_dict(data, source="old/case.json")

    message = str(raised.value)
    assert message.startswith("old/case.json: ")
    assert f"schema {CASE_SCHEMA + 1}" in message
    assert f"reads schema {CASE_SCHEMA}" in message
    assert "replay it with the buildfuzz that wrote it" in message


def test_missing_schema_is_rejected() -> None:
    data = case_dict()
    del data["schema"]

    with pytest.raises(DataFileError) as raised:
        case_from_dict(data)

    assert 'case has no "schema" key' in str(raised.value)


def test_unknown_case_field_is_rejected() -> None:
    data = case_dict(colour="red", shape="round")

    with pytest.raises(DataFileError) as raised:
        case_from_dict(data)

    assert "unknown case fields: colour, shape" in str(raised.value)


def test_unknown_file_field_is_rejected() -> None:
    data = case_dict(files=[{"path": "a", "colour": "red"}])

    with pytest.raises(DataFileError) as raised:
        case_from_dict(data)

    assert "unknown file fields: colour" in str(raised.value)


@pytest.mark.parametrize(
    "path", ["/etc/passwd", "../a", "a/../../b", "a/..", "", "a\x00b"]
)
def test_escaping_path_is_rejected(path: str) -> None:
    data = case_dict(files=[{"path": path}])

    with pytest.raises(DataFileError) as raised:
        case_from_dict(data)

    assert repr(path) in str(raised.value)


@pytest.mark.parametrize("path", [".", "./", "a/.."])
def test_context_root_path_is_rejected(path: str) -> None:
    # The root is the context directory itself, not an entry in it.
    data = case_dict(files=[{"path": path, "kind": "symlink", "target": "x"}])

    with pytest.raises(DataFileError) as raised:
        case_from_dict(data)

    assert repr(path) in str(raised.value)


@pytest.mark.parametrize("target", ["/etc/passwd", "../outside", "a/../../b"])
def test_escaping_hardlink_target_is_rejected(target: str) -> None:
    # materialize() links to a hardlink's target, so it must stay inside.
    data = case_dict(
        files=[{"path": "a"}, {"path": "h", "kind": "hardlink", "target": target}]
    )

    with pytest.raises(DataFileError) as raised:
        case_from_dict(data)

    assert repr(target) in str(raised.value)


def test_escaping_symlink_target_is_kept() -> None:
    data = case_dict(files=[{"path": "s", "kind": "symlink", "target": "../x"}])

    case = case_from_dict(data)

    assert case.files[0].target == "../x"


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"output": "registry"}, "'registry' is not a valid Output"),
        ({"files": [{"path": "a", "kind": "whiteout"}]}, "'whiteout'"),
        ({"files": [{"path": "a", "xattrs": [["user.a", "1"]]}]}, "files.xattrs"),
        ({"bulk": {"count": 3, "sizes": []}}, "bulk.sizes"),
        ({"bulk": {"count": 3, "colour": 1}}, "unknown bulk fields: colour"),
        ({"bulk": {"count": -1}}, "bulk count, sizes and depth"),
        ({"no_cache": "yes"}, "no_cache must be true or false"),
        ({"tags": "a"}, "tags must be a list of strings"),
        ({"dockerfile_name": "../Dockerfile"}, "'../Dockerfile'"),
        ({"files": [{"path": "a", "size": "1"}]}, "files.size must be an integer"),
        ({"files": [{"path": "a", "mode": True}]}, "files.mode must be an integer"),
        ({"files": [{"path": 3}]}, "files.path must be a string"),
        ({"files": ["a"]}, "each entry of files must be an object"),
        ({"dockerfile": "FROM scratch"}, "dockerfile must be a list of strings"),
        ({"dockerignore": [1]}, "dockerignore must be a string"),
        ({"build_args": [["A", "1"]]}, "build_args must be an object"),
        ({"build_args": {"A": 1}}, "build_args must be a string"),
        ({"engine": 26.1}, "engine must be a string"),
    ],
)
def test_malformed_value_is_rejected(changes: dict[str, object], words: str) -> None:
    data = case_dict(**changes)

    with pytest.raises(DataFileError) as raised:
        case_from_dict(data, source="c.json")

    assert str(raised.value).startswith("c.json: invalid case: ")
    assert words in str(raised.value)


def test_missing_file_names_path(tmp_path) -> None:
    path = tmp_path / "nosuch" / "case.json"

    with pytest.raises(DataFileError) as raised:
        load_case(path)

    assert raised.value.path == path
    assert str(path) in str(raised.value)
    assert "not found" in str(raised.value)


def test_missing_directory_case_names_file(tmp_path) -> None:
    with pytest.raises(DataFileError) as raised:
        load_case(tmp_path)

    assert raised.value.path == tmp_path / "case.json"


def test_non_utf8_file_is_rejected(tmp_path) -> None:
    path = tmp_path / "case.json"
    path.write_bytes(b'{"schema": 1, "engine": "\xff"}')

    with pytest.raises(DataFileError) as raised:
        load_case(path)

    assert "cannot read case file" in str(raised.value)


def test_defaults_fill_missing_fields() -> None:
    case = case_from_dict({"schema": CASE_SCHEMA})

    assert case.files == ()
    assert case.output is Output.LOAD
    assert case.engine == Case.engine
    assert case.builder == Case.builder


def test_id_changes_with_case() -> None:
    first = Case(files=(ContextFile("a"),))

    second = first.with_changes(platform="linux/arm64")

    assert len(first.id) == 10
    assert first.id != second.id
    assert first.id == Case(files=(ContextFile("a"),)).id


def test_dockerfile_text_ends_with_newline() -> None:
    case = Case(dockerfile=("FROM scratch", "COPY . /ctx/"))

    assert case.dockerfile_text == "FROM scratch\nCOPY . /ctx/\n"


WIDE_CASE = Case(
    files=(
        ContextFile("d", FileKind.CHAR_DEVICE, major=1, minor=3),
        ContextFile("x", size=1, xattrs=(("user.a", "1"), ("user.b", ""))),
        ContextFile("s", FileKind.SPARSE, size=1 << 33),
    ),
    bulk=BulkRecipe(count=1000, sizes=(0, 512), depth=3, seed=7),
    dockerfile_name="docker/Dockerfile",
    dockerfile_dockerignore=("*", "!a"),
    target="stage0",
    no_cache=True,
    tags=("buildfuzz-case:second",),
)


def test_new_fields_round_trip(tmp_path) -> None:
    path = tmp_path / "case.json"
    path.write_text(WIDE_CASE.to_json())

    assert load_case(path) == WIDE_CASE


def test_bulk_recipe_stays_compact() -> None:
    data = json.loads(WIDE_CASE.to_json())

    assert data["bulk"] == {"count": 1000, "sizes": [0, 512], "depth": 3, "seed": 7}
    assert len(WIDE_CASE.to_json()) < 2000


def test_default_new_fields_are_left_out() -> None:
    data = Case(files=(ContextFile("a"),)).to_dict()

    for name in ("bulk", "dockerfile_name", "target", "no_cache", "tags"):
        assert name not in data
    assert "dockerfile_dockerignore" not in data
    assert set(data["files"][0]) == {
        "path", "kind", "size", "mode", "uid", "gid", "mtime_ns", "seed", "target",
    }  # fmt: skip


def test_old_case_json_still_loads() -> None:
    # A case.json as buildfuzz wrote it before the bulk recipe and the new
    # file kinds existed.
    old = {
        "build_args": {},
        "builder": "classic",
        "containerd_store": False,
        "data_root_mib": 0,
        "dockerfile": ["FROM scratch", "COPY . /ctx/"],
        "dockerignore": None,
        "engine": "26.1",
        "files": [{"gid": 0, "kind": "file", "mode": 420, "mtime_ns": 0,
                   "path": "a", "seed": 1, "size": 3, "target": "", "uid": 0}],
        "memory_mib": 0,
        "output": "load",
        "platform": "",
        "schema": 1,
        "storage_driver": "",
    }  # fmt: skip

    case = case_from_dict(old)

    assert case.bulk is None
    assert case.dockerfile_name == "Dockerfile"
    assert case.files[0].xattrs == ()
    assert json.loads(case.to_json()) == old


def test_build_timeout_grows_with_the_context() -> None:
    from buildfuzz.build import scaled_timeout
    from buildfuzz.case import BulkRecipe

    small = Case(files=(ContextFile("a", size=1),))
    sparse = Case(files=(ContextFile("s", FileKind.SPARSE, size=8 * 2**30),))
    many = Case(bulk=BulkRecipe(100_000, sizes=(0, 512)))

    assert 60 <= scaled_timeout(small, 60) < 61
    assert scaled_timeout(sparse, 60) >= 60 + 8 * 60  # holes are read too
    assert scaled_timeout(many, 60) >= 60 + 100


def test_cache_and_attestation_round_trip_and_give_flags() -> None:
    case = Case(cache="local", attest="provenance-max", output=Output.OCI)

    loaded = case_from_dict(json.loads(case.to_json()))

    assert loaded == case
    assert case.option_arguments("/c") == [
        "--cache-to", "type=local,dest=/c.cache",
        "--cache-from", "type=local,src=/c.cache",
        "--provenance=mode=max",
    ]  # fmt: skip
    assert "cache" not in Case().to_dict()  # older case files stay as they were


@pytest.mark.parametrize(
    ("field", "value"), [("cache", "registry"), ("attest", "spdx"), ("cache", 1)]
)
def test_unknown_cache_or_attestation_is_refused(field: str, value: object) -> None:
    data = {**json.loads(Case().to_json()), field: value}

    with pytest.raises(DataFileError, match=f"{field} must be one of"):
        case_from_dict(data)


def test_case_without_engine_or_builder_warns(tmp_path: Path) -> None:
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"schema": 1, "dockerfile": ["FROM scratch"]}))

    with capture_logs() as logs:
        case = load_case(path)

    warned = {entry["event"]: entry["default"] for entry in logs}
    assert warned == {
        "the case names no engine; using the default": case.engine,
        "the case names no builder; using the default": case.builder,
    }


def test_written_case_loads_without_warning(tmp_path: Path) -> None:
    path = tmp_path / "case.json"
    path.write_text(Case(dockerfile=("FROM scratch",)).to_json())

    with capture_logs() as logs:
        load_case(path)

    assert logs == []
