"""Tests of loading profiles, builder definitions and expected-failure rules."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from buildfuzz.build import BuildResult
from buildfuzz.case import Case, ContextFile, FileKind, Output
from buildfuzz.definitions import load_definitions
from buildfuzz.errors import DataFileError
from buildfuzz.paths import builders_dir, strategies_dir
from buildfuzz.profile import (
    INSTRUCTION_KINDS,
    LOCAL_BASES,
    available_profiles,
    load_profile,
)
from buildfuzz.rules import (
    RULE_CHECK_EVERY,
    context_listing,
    load_rules,
    matching_rule,
    worth_building,
)
from buildfuzz.signature import Phase, Signature
from buildfuzz.verdict import Evaluation, Oracle, Verdict, judge
from tests.conftest import BUILDFUZZ, REPO

# Profiles


def write_profile(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "custom.toml"
    path.write_text(text)
    return path


def profile_error(tmp_path: Path, text: str) -> DataFileError:
    path = write_profile(tmp_path, text)
    with pytest.raises(DataFileError) as raised:
        load_profile(str(path))
    assert raised.value.path == path
    assert str(raised.value).startswith(f"{path}: ")
    return raised.value


def test_default_profile_loads() -> None:
    profile = load_profile("default")

    assert profile.name == "default"
    assert profile.path == strategies_dir() / "default.toml"
    assert profile.rules == "expected"
    assert profile.builders == ("buildx-docker", "classic")
    assert FileKind.HARDLINK in profile.context.kinds
    nightly = load_profile("nightly")
    assert set(nightly.dockerfile.instructions) == set(INSTRUCTION_KINDS)
    assert set(profile.dockerfile.instructions) <= set(INSTRUCTION_KINDS)
    assert set(profile.dockerfile.bases) == set(LOCAL_BASES)
    assert profile.build.outputs == (Output.LOAD, Output.TAR, Output.LOCAL)


def test_default_profile_is_listed() -> None:
    assert "default" in available_profiles()


def test_profile_loads_by_path(tmp_path: Path) -> None:
    path = write_profile(tmp_path, '[context]\nnames = ["x", "y"]\n')

    profile = load_profile(str(path))

    assert profile.name == "custom"
    assert profile.context.names == ("x", "y")
    assert profile.context.kinds == (FileKind.FILE,)
    assert profile.engines == ("26.1",)


def test_missing_profile_lists_available() -> None:
    with pytest.raises(DataFileError) as raised:
        load_profile("nosuch")

    assert raised.value.path == strategies_dir() / "nosuch.toml"
    assert "profile 'nosuch' not found" in str(raised.value)
    assert "available profiles: " in str(raised.value)
    assert "default" in str(raised.value).split("available profiles: ")[1]


def test_invalid_toml_is_rejected(tmp_path: Path) -> None:
    error = profile_error(tmp_path, "[context\nnames = ")

    assert "invalid TOML" in str(error)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('colour = "red"\n', "unknown key 'colour' in top level"),
        ("[context]\nmax_file = 3\n", "unknown key 'max_file' in [context]"),
        ("[dockerfile]\nbase = []\n", "unknown key 'base' in [dockerfile]"),
        ("[build]\noutput = []\n", "unknown key 'output' in [build]"),
    ],
)
def test_unknown_key_is_rejected(tmp_path: Path, text: str, words: str) -> None:
    error = profile_error(tmp_path, text)

    assert words in str(error)
    assert "known keys:" in str(error)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('[dockerfile]\ninstructions = ["copy-all", "healthcheck"]\n', "healthcheck"),
        ('[dockerfile]\nbases = ["alpine"]\n', "alpine"),
        ('[build]\noutputs = ["load", "registry"]\n', "registry"),
        ('[context]\nkinds = ["file", "whiteout"]\n', "whiteout"),
        ('[build]\ntargets = ["", "last"]\n', "last"),
    ],
)
def test_unknown_value_is_rejected(tmp_path: Path, text: str, value: str) -> None:
    error = profile_error(tmp_path, text)

    assert f"unknown value {value!r}" in str(error)
    assert "use one of" in str(error)


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ("context", "names"),
        ("context", "kinds"),
        ("context", "sizes"),
        ("context", "modes"),
        ("context", "symlink_targets"),
        ("dockerfile", "bases"),
        ("dockerfile", "instructions"),
        ("build", "platforms"),
        ("build", "outputs"),
    ],
)
def test_empty_pool_is_rejected(tmp_path: Path, section: str, key: str) -> None:
    error = profile_error(tmp_path, f"[{section}]\n{key} = []\n")

    assert f"{section}.{key} must be a non-empty list" in str(error)


def test_empty_dockerignore_pool_is_allowed(tmp_path: Path) -> None:
    path = write_profile(tmp_path, "[context]\ndockerignore = []\n")

    assert load_profile(str(path)).context.dockerignore == ()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('engines = []\nbuilders = ["classic"]\n', "at least one value"),
        ('engines = "26.1"\n', "engines must be a list of strings"),
        ("context = 3\n", "[context] must be a table"),
        ("[context]\nmax_files = -1\n", "context.max_files must be a whole number"),
        ("[context]\nmax_files = true\n", "context.max_files must be a whole number"),
        ('[context]\nsizes = ["big"]\n', "context.sizes: 'big' is not an integer"),
        ("[context]\nmodes = [true]\n", "context.modes: True is not an integer"),
        ('[build]\nbuild_args = [["A"]]\n', "[name, value] pairs"),
        ("[context]\nnames = [1]\n", "context.names must be a list of strings"),
    ],
)
def test_malformed_value_is_rejected(tmp_path: Path, text: str, words: str) -> None:
    error = profile_error(tmp_path, text)

    assert words in str(error)


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/"])
def test_unusable_name_is_rejected(tmp_path: Path, name: str) -> None:
    # Each name is one path component. "a/b" or ".." would make cases whose
    # paths load_case rejects, and ".." would write outside the context.
    error = profile_error(tmp_path, f'[context]\nnames = ["a", "{name}"]\n')

    assert repr(name) in str(error)


# Builder definitions


def definitions_copy(tmp_path: Path) -> Path:
    directory = tmp_path / "builders"
    shutil.copytree(builders_dir(), directory)
    return directory


def definitions_error(tmp_path: Path, name: str, text: str) -> DataFileError:
    directory = definitions_copy(tmp_path)
    (directory / name).write_text(text)
    with pytest.raises(DataFileError) as raised:
        load_definitions(directory)
    assert raised.value.path == directory / name
    return raised.value


BUILDER_TABLE = '[client]\npackages = [{ suite = "s", names = ["n"] }]\n'


def test_real_definitions_load() -> None:
    definitions = load_definitions()

    assert "26.1" in definitions.engines
    assert definitions.engines["26.1"].storage_driver == "overlay2"
    assert definitions.client.packages
    assert definitions.builders["classic"].classic
    assert definitions.builders["classic"].outputs == (Output.LOAD,)
    assert not definitions.builders["buildx-docker"].classic
    assert definitions.builders["buildx-docker"].driver == "docker"


def test_missing_definition_file_is_rejected(tmp_path: Path) -> None:
    directory = definitions_copy(tmp_path)
    (directory / "builders.toml").unlink()

    with pytest.raises(DataFileError) as raised:
        load_definitions(directory)

    assert raised.value.path == directory / "builders.toml"
    assert "not found" in str(raised.value)


def test_invalid_definition_toml_is_rejected(tmp_path: Path) -> None:
    error = definitions_error(tmp_path, "engines.toml", "[engines.\n")

    assert "invalid TOML" in str(error)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            BUILDER_TABLE + '[builders.x]\nkind = "classic"\ncolour = 1\n',
            "builder 'x': unknown key 'colour'",
        ),
        (
            BUILDER_TABLE + '[builders.x]\nkind = "kaniko"\n',
            "builder 'x': unknown kind 'kaniko'",
        ),
        (
            BUILDER_TABLE + '[builders.x]\nkind = "buildx"\ndriver = "nosuch"\n',
            "builder 'x': unknown driver 'nosuch'",
        ),
        (
            BUILDER_TABLE + '[builders.x]\nkind = "buildx"\ndriver = "docker"\n'
            'outputs = ["load", "registry"]\n',
            "builder 'x': unknown output 'registry'",
        ),
        (BUILDER_TABLE + "[builders.x]\n", "missing key 'kind'"),
        (BUILDER_TABLE, "[builders.NAME] tables are missing"),
        ('[builders.x]\nkind = "classic"\n', "missing key 'client'"),
    ],
)
def test_bad_builder_is_rejected(tmp_path: Path, text: str, words: str) -> None:
    error = definitions_error(tmp_path, "builders.toml", text)

    assert words in str(error)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            '[engines.e]\npackages = [{ suite = "s", names = ["n"] }]\ncolour = 1\n',
            "engine 'e': unknown key 'colour'",
        ),
        ("[engines.e]\npackages = []\n", "packages must be a non-empty list"),
        (
            '[engines.e]\npackages = [{ suite = "s", names = "n" }]\n',
            "packages.names must be a list of package names",
        ),
        ('[engines.e]\ndescription = "no packages"\n', "missing key 'packages'"),
        (
            '[engines.e]\npackages = [{ suite = "s", names = ["n"] }]\n'
            'features = ["containerd-snapshotter"]\n',
            "features",
        ),
    ],
)
def test_bad_engine_is_rejected(tmp_path: Path, text: str, words: str) -> None:
    error = definitions_error(tmp_path, "engines.toml", text)

    assert words in str(error)


# Expected-failure rules


def write_rules(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return path


def rules_error(tmp_path: Path, text: str) -> DataFileError:
    path = write_rules(tmp_path, text)
    with pytest.raises(DataFileError) as raised:
        load_rules(str(path))
    assert raised.value.path == path
    return raised.value


def chmod_case(builder: str) -> Case:
    return Case(
        files=(ContextFile("a"),),
        dockerfile=("FROM scratch", "COPY --chmod=0750 a /modes/"),
        builder=builder,
    )


def test_expected_rules_compile() -> None:
    rules = load_rules("expected")

    ids = [rule.id for rule in rules]
    assert len(ids) == len(set(ids))
    assert "classic-chmod" in ids
    for rule in rules:
        assert rule.reason
        assert rule.message.pattern


def test_none_gives_no_rules() -> None:
    assert load_rules("none") == ()
    assert load_rules("") == ()


def test_classic_chmod_applies_to_classic() -> None:
    rule = {rule.id: rule for rule in load_rules("expected")}["classic-chmod"]

    assert rule.applies_to(chmod_case("classic"))
    assert not rule.applies_to(chmod_case("buildx-docker"))
    plain = chmod_case("classic").with_changes(
        dockerfile=("FROM scratch", "COPY a /picked/")
    )
    assert not rule.applies_to(plain)


def test_classic_chmod_explains_message() -> None:
    rule = {rule.id: rule for rule in load_rules("expected")}["classic-chmod"]
    log = (
        "Step 2/2 : COPY --chmod=0750 a /modes/\nthe --chmod option requires BuildKit."
    )

    assert rule.explains(chmod_case("classic"), log)
    assert not rule.explains(chmod_case("classic"), "no such file or directory")
    assert not rule.explains(chmod_case("buildx-docker"), log)


def _judged(builder: str, exit_status: int, log: str) -> Evaluation:
    result = BuildResult(exit_status=exit_status, log=log, duration=1.0)
    return judge(
        chmod_case(builder),
        result,
        classic=builder == "classic",
        rules=load_rules("expected"),
    )


def test_always_rule_whose_case_builds_is_a_finding() -> None:
    built = _judged("classic", 0, "Successfully built 0123456789ab")
    other = _judged("classic", 1, "Step 2/2 : COPY\nno space left on device")
    expected = _judged("classic", 1, "the --chmod option requires BuildKit")
    buildkit = _judged("buildx-docker", 0, "")

    assert built.verdict is Verdict.FINDING
    assert built.oracle is Oracle.RULE
    assert built.signature == Signature(
        Phase.RESULT, "rule classic-chmod: the build passed"
    )
    assert other.verdict is Verdict.FINDING
    assert other.oracle is Oracle.RULE
    assert "another message" in other.detail
    assert expected.verdict is Verdict.EXPECTED
    assert buildkit.verdict is Verdict.PASS


def test_always_rule_cases_mostly_skipped() -> None:
    rules = load_rules("expected")
    doomed = [
        chmod_case("classic").with_changes(files=(ContextFile(f"f{n}"),))
        for n in range(400)
    ]

    built = [case for case in doomed if worth_building(rules, case)]

    assert 400 / RULE_CHECK_EVERY / 2 < len(built) < 400 / RULE_CHECK_EVERY * 2
    assert all(worth_building(rules, case.with_changes(builder="buildx-docker"))
               for case in doomed)  # fmt: skip


def test_always_must_be_a_boolean(tmp_path: Path) -> None:
    text = '[[rule]]\nid = "r"\nreason = "x"\nmessage = "m"\nalways = "yes"\n'

    assert "always of rule 'r' must be true or false" in str(
        rules_error(tmp_path, text)
    )


def test_symlink_rule_reads_listing() -> None:
    rules = load_rules("expected")
    case = Case(
        files=(ContextFile("s", FileKind.SYMLINK, target="../outside"),),
        dockerfile=("FROM scratch", "COPY s /picked/"),
    )

    rule = matching_rule(rules, case, 'failed: "/s": not found')

    assert context_listing(case) == "symlink s -> ../outside"
    assert rule is not None
    assert rule.id == "symlink-outside-context"


def test_dockerignore_rule_needs_dockerignore() -> None:
    rule = {r.id: r for r in load_rules("expected")}["dockerignored-source"]
    case = Case(files=(ContextFile("a"),), dockerfile=("FROM scratch", "COPY a /"))

    assert not rule.applies_to(case)
    assert rule.applies_to(case.with_changes(dockerignore=("a",)))


def test_missing_rule_set_is_rejected() -> None:
    with pytest.raises(DataFileError) as raised:
        load_rules("nosuch")

    assert raised.value.path == strategies_dir() / "rules" / "nosuch.toml"
    assert "rule set 'nosuch' not found" in str(raised.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[[rule]\n", "invalid TOML"),
        ("rule = 3\n", "rules must be [[rule]] tables"),
        ('[[rule]]\nid = "r"\nreason = "x"\n', "rule 'r' has no message key"),
        (
            '[[rule]]\nid = "r"\nreason = "x"\nmessage = "m"\ncolour = 1\n',
            "unknown key 'colour' in rule 'r'",
        ),
        ('[[rule]]\nid = "r"\nreason = "x"\nmessage = "(open"\n', "invalid rule"),
        (
            '[[rule]]\nid = "r"\nreason = "x"\nmessage = "m"\ndockerfile = "[z-a]"\n',
            "bad character range",
        ),
    ],
)
def test_bad_rule_is_rejected(tmp_path: Path, text: str, words: str) -> None:
    error = rules_error(tmp_path, text)

    assert words in str(error)


@pytest.mark.parametrize("key", ["builders", "engines"])
def test_string_name_list_is_rejected(tmp_path: Path, key: str) -> None:
    # A bare string would become a tuple of its letters and never match.
    text = f'[[rule]]\nid = "r"\nreason = "x"\nmessage = "m"\n{key} = "classic"\n'

    error = rules_error(tmp_path, text)

    assert key in str(error)


# The widened axes


def test_bytes_name_decodes_to_surrogates(tmp_path: Path) -> None:
    path = write_profile(tmp_path, '[context]\nnames = ["a", "bytes:6e6fff"]\n')

    names = load_profile(str(path)).context.names

    assert names[1] == "no\udcff"


def test_new_pools_load(tmp_path: Path) -> None:
    text = (
        "[context]\n"
        'devices = ["1:3", "0:0"]\n'
        'xattrs = [{}, { "user.a" = "1", "user.b" = "" }]\n'
        "bulk_sizes = [[0, 1], [512]]\n"
        "path_lengths = [0, 4200]\n"
        "[dockerfile]\n"
        "stages = [1, 3]\n"
        'paths = ["Dockerfile", "docker/Dockerfile"]\n'
        "[build]\n"
        'tags = [[], ["a:1", "b:2"]]\n'
        "no_cache = [false, true]\n"
    )

    profile = load_profile(str(write_profile(tmp_path, text)))

    assert profile.context.devices == ((1, 3), (0, 0))
    assert profile.context.xattrs == ((), (("user.a", "1"), ("user.b", "")))
    assert profile.context.bulk_sizes == ((0, 1), (512,))
    assert profile.dockerfile.stages == (1, 3)
    assert profile.build.tags == ((), ("a:1", "b:2"))


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('[context]\nnames = ["bytes:zz"]\n', "not valid hex"),
        ('[context]\nnames = ["bytes:2f"]\n', "not a usable file name"),
        ('[context]\ndevices = ["1"]\n', "not a device number"),
        ('[context]\ndevices = ["5000:1"]\n', "out of range"),
        ('[context]\nxattrs = [{ "security.x" = "1" }]\n', "not a user.* attribute"),
        ('[context]\nxattrs = [["user.a"]]\n', "tables of names and values"),
        ("[context]\npath_lengths = [3]\n", "8 to 65536 bytes"),
        ("[context]\nbulk_files = [1000000]\n", "out of range"),
        ("[context]\nbulk_sizes = [[]]\n", "non-empty lists of sizes"),
        ("[dockerfile]\nstages = [0]\n", "out of range"),
        ('[dockerfile]\npaths = ["bulk/Dockerfile"]\n', "clashes"),
        ('[dockerfile]\npaths = ["$x"]\n', "needs quoting"),
    ],
)
def test_bad_new_pool_is_rejected(tmp_path: Path, text: str, words: str) -> None:
    error = profile_error(tmp_path, text)

    assert words in str(error)


@pytest.mark.parametrize("name", ["default", "nightly", "context", "images"])
def test_shipped_profiles_load(name: str) -> None:
    profile = load_profile(name)

    assert profile.description
    assert name in available_profiles()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("[context]\nowners = [-1]\n", "context.owners: -1 is out of range"),
        ("[context]\nmodes = [0o77777]\n", "context.modes: 32767 is out of range"),
        (
            '[build]\nplatforms = ["linux/sparc99"]\n',
            "unknown platform 'linux/sparc99'",
        ),
    ],
)
def test_out_of_range_axis_values_are_rejected(
    tmp_path: Path, text: str, words: str
) -> None:
    with pytest.raises(DataFileError, match=re.escape(words)):
        load_profile(str(write_profile(tmp_path, text)))


@pytest.mark.parametrize(
    ("profile", "rules", "words"),
    [
        ('[engine]\nstorage_drivers = ["zfs"]\n', "", "unknown storage driver 'zfs'"),
        (
            'rules = "RULES"\n',
            '[[rule]]\nid = "r"\nreason = "x"\nmessage = "m"\nbuilders = ["clasic"]\n',
            "rule 'r' names builder 'clasic', which is not defined",
        ),
    ],
)
def test_unknown_profile_or_rule_names_rejected(
    tmp_path: Path, profile: str, rules: str, words: str
) -> None:
    rules_file = tmp_path / "rules.toml"
    rules_file.write_text(rules)
    path = tmp_path / "bad.toml"
    path.write_text(profile.replace("RULES", str(rules_file)))
    results = tmp_path / "results"

    completed = subprocess.run(
        [*BUILDFUZZ, "run", "--budget", "10s", "--profile", str(path),
         "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip

    assert completed.returncode == 2
    assert words in completed.stderr
    assert not results.exists()


def test_unreadable_context_rule_explains_permission_denied() -> None:
    case = Case(
        files=(ContextFile("d", FileKind.DIR, mode=0o300),),
        dockerfile=(
            "FROM localhost/buildfuzz/busybox:1",
            "USER 1000:1000",
            "RUN --mount=type=bind,target=/mnt/context ls -lanR /mnt/context"
            " > /tmp/context.txt",
        ),
    )
    log = "#6 0.060 ls: can't open '/mnt/context/d': Permission denied\n"

    rule = matching_rule(load_rules("expected"), case, log)

    assert rule is not None
    assert rule.id == "run-as-user-lists-unreadable-context"


def test_rules_file_beside_profile(tmp_path: Path) -> None:
    """A profile's rules file is found next to the profile, not in the cwd."""
    (tmp_path / "mine.toml").write_text(
        '[[rule]]\nid = "x"\nreason = "r"\nmessage = "boom"\n'
    )
    (tmp_path / "p.toml").write_text('rules = "mine.toml"\n')
    from buildfuzz.profile import load_profile
    from buildfuzz.rules import load_rules

    profile = load_profile(str(tmp_path / "p.toml"))
    assert profile.rules == str(tmp_path / "mine.toml")
    assert [rule.id for rule in load_rules(profile.rules)] == ["x"]


def test_bad_rule_pattern_names_key(tmp_path: Path) -> None:
    from buildfuzz.rules import load_rules

    path = tmp_path / "bad.toml"
    path.write_text('[[rule]]\nid = "x"\nreason = "r"\nmessage = "ok"\nfiles = "a("\n')
    with pytest.raises(DataFileError, match="files of rule 'x' is not a valid regular"):
        load_rules(str(path))
    path.write_text('[[rule]]\nid = "x"\nreason = "r"\n')
    with pytest.raises(DataFileError, match="rule 'x' has no message key"):
        load_rules(str(path))
