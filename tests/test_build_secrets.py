"""Build secrets (--secret): the case field, profile key, strategies, repro.sh,
the leak oracle, and real builds that read them."""

import json
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from buildfuzz import secrets
from buildfuzz.case import Case, Output, case_from_dict, load_case
from buildfuzz.errors import DataFileError
from buildfuzz.minimize import simplifications
from buildfuzz.oracle_model import expected_tree
from buildfuzz.oracle_secret import Leak, secret_report, secret_values
from buildfuzz.profile import load_profile
from buildfuzz.repro import PLACEHOLDER_SECRET, build_command, render_repro
from buildfuzz.rules import load_rules, matching_rule
from buildfuzz.session import Session
from buildfuzz.signature import Phase, Signature
from buildfuzz.strategies import BUSYBOX_IMAGE, Target, cases
from buildfuzz.strategies_dockerfile import instruction_kinds, secret_run
from buildfuzz.verdict import Oracle, Verdict
from tests.conftest import buildfuzz, client_tools, start_engine

SECRET_RUN = secret_run("token")


def test_case_round_trips_build_secrets() -> None:
    case = Case(build_secrets=(("cert", "file"), ("token", "env")))

    data = json.loads(case.to_json())

    assert data["build_secrets"] == {"token": "env", "cert": "file"}
    assert case_from_dict(data) == case


def test_case_without_secrets_keeps_old_json() -> None:
    old = {"schema": 1, "dockerfile": ["FROM scratch"]}

    case = case_from_dict(old)

    assert case.build_secrets == ()
    assert "build_secrets" not in case.to_dict()


@pytest.mark.parametrize(
    ("secret_id", "source", "message"),
    [
        ("to,ken", "env", "build secret id 'to,ken' is invalid"),
        ("token", "stdin", "source 'stdin'; use one of env, file"),
    ],
)
def test_case_rejects_bad_build_secret(
    tmp_path: Path, secret_id: str, source: str, message: str
) -> None:
    path = tmp_path / "case.json"
    path.write_text(json.dumps({"schema": 1, "build_secrets": {secret_id: source}}))

    with pytest.raises(DataFileError, match=message):
        load_case(path)


def test_flags_name_no_value() -> None:
    case = Case(build_secrets=(("token", "env"), ("cert", "file")))

    arguments = case.option_arguments("/c/context")

    assert arguments == [
        "--secret", "id=token,env=BUILDFUZZ_SECRET_token",
        "--secret", "id=cert,src=/c/context.secrets/cert",
    ]  # fmt: skip
    assert secrets.build_secret_value("token") not in " ".join(arguments)


def test_secret_value_is_stable_and_redacted() -> None:
    value = secrets.build_secret_value("stable")

    assert secrets.build_secret_value("stable") == value
    assert secrets.build_secret_value("other") != value
    assert secrets.redact(f"x {value} y") == "x *** y"


def test_profile_reads_secret_sets(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('[build]\nsecrets = [{}, { token = "env", cert = "file" }]\n')

    profile = load_profile(str(path))

    assert profile.build.secrets == ((), (("cert", "file"), ("token", "env")))


@pytest.mark.parametrize(
    ("pool", "message"),
    [
        ('[{ token = "ssh" }]', "build.secrets: build secret 'token' has source 'ssh'"),
        ('[{ "a b" = "env" }]', "build.secrets: build secret id 'a b' is invalid"),
        ('["token"]', "build.secrets entries must be tables of ids and sources"),
    ],
)
def test_profile_rejects_bad_secrets(tmp_path: Path, pool: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(f"[build]\nsecrets = {pool}\n")

    completed = buildfuzz("strategies", "--profile", str(path), cwd=tmp_path)

    assert completed.returncode == 2
    assert message in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("name", ["default", "nightly"])
def test_profiles_draw_build_secrets(name: str) -> None:
    assert len(load_profile(name).build.secrets) > 1


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_secret_mounts_read_the_case_secrets(data: st.DataObject) -> None:
    profile = load_profile("nightly")
    case = data.draw(cases(profile, (Target("26.1", "buildx-docker"),)))

    ids = {secret_id for secret_id, _ in case.build_secrets}
    for line in case.dockerfile:
        if line.startswith("RUN --mount=type=secret"):
            if ids:
                assert line in {secret_run(secret_id) for secret_id in ids}
            else:
                assert "required" not in line


def test_secret_run_is_a_known_kind() -> None:
    kinds = instruction_kinds((f"FROM {BUSYBOX_IMAGE}", SECRET_RUN))

    assert kinds == ["run-mount-secret"]


def test_model_hides_secret_mount_point() -> None:
    case = Case(dockerfile=("FROM scratch", "COPY . /ctx/", SECRET_RUN))

    tree = expected_tree(case)

    assert "/run" in tree.opaque


def test_minimizer_resets_and_removes_secrets() -> None:
    case = Case(build_secrets=(("token", "env"), ("cert", "file")))
    profile = load_profile("default")
    targets = (Target("26.1", "buildx-docker"),)

    steps = dict(simplifications(case, Case(), profile, targets))

    assert steps["reset build_secrets"].build_secrets == ()
    assert steps["remove build secret 'token'"].build_secrets == (("cert", "file"),)


def test_build_secret_leak_has_its_own_signature() -> None:
    leaks = [
        Leak("image history", "secret build argument TOKEN", "docker history"),
        Leak("image layer", "build secret token", "leaked"),
    ]

    report = secret_report(leaks)

    assert report is not None
    assert report.signature.message == "build secret value in image layer"
    assert "build secret token found in image layer: leaked" in report.detail


def test_build_arg_rules_do_not_explain_secret_leak() -> None:
    report = secret_report([Leak("image history", "build secret token", "x")])
    case = Case(dockerfile=("FROM scratch", "ARG A", "RUN true"))

    assert report is not None
    text = f"{report.signature.message}\n{report.detail}"
    assert matching_rule(load_rules("expected"), case, text) is None


def test_secret_values_cover_arguments_and_secrets(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("BF_TEST_ARG", "argument-value")
    case = Case(
        build_args=(("TOKEN", "env:BF_TEST_ARG"),), build_secrets=(("token", "file"),)
    )

    values = secret_values(case)

    assert values["secret build argument TOKEN"] == "argument-value"
    assert values["build secret token"] == secrets.build_secret_value("token")


def test_classic_rule_explains_unknown_flag() -> None:
    case = Case(builder="classic", build_secrets=(("token", "env"),))

    rule = matching_rule(load_rules("expected"), case, "unknown flag: --secret\n")

    assert rule is not None
    assert rule.id == "classic-secret-flag"


def test_repro_passes_secrets_from_variables(tmp_path: Path) -> None:
    case = Case(
        dockerfile=(f"FROM {BUSYBOX_IMAGE}", SECRET_RUN),
        build_args=(("TOKEN", "env:MY_TOKEN"),),
        build_secrets=(("token", "file"), ("cert", "env")),
    )

    script = render_repro(case, Signature(Phase.SOLVE, "x"), timeout=60)
    words = build_command(case, classic=False)

    assert 'export TOKEN="${MY_TOKEN:-' + PLACEHOLDER_SECRET + '}"' in script
    assert 'export BUILDFUZZ_SECRET_cert="${BUILDFUZZ_SECRET_cert:-' in script
    assert 'printf %s "$BUILDFUZZ_SECRET_token" > "$ctx.secrets/token"' in script
    assert "id=token,src=$ctx.secrets/token" in words
    assert "id=cert,env=BUILDFUZZ_SECRET_cert" in words
    assert words[words.index("--build-arg") + 1] == "TOKEN"
    path = tmp_path / "repro.sh"
    path.write_text(script)
    assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0


# --- on real engines -----------------------------------------------------------


def _secret_case(builder: str, source: str, *lines: str) -> Case:
    return Case(
        dockerfile=(f"FROM {BUSYBOX_IMAGE}", SECRET_RUN, *lines),
        builder=builder,
        build_secrets=(("token", source),),
        no_cache=True,
        output=Output.LOAD if builder == "classic" else Output.TAR,
    )


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
@pytest.mark.parametrize("builder", ["buildx-docker", "container-v0-34"])
def test_builds_read_secrets(session: Session, builder: str) -> None:
    """Without the secret the required mount fails, so each pass shows the
    builder got it; a step that copies it out is a finding of the oracle."""
    value = secrets.build_secret_value("token")
    passes = [session.execute(_secret_case(builder, s)) for s in ("env", "file")]
    missing = session.execute(
        _secret_case(builder, "env").with_changes(build_secrets=())
    )
    leaked = session.execute(
        _secret_case(
            builder, "file", "RUN --mount=type=secret,id=token cp /run/secrets/token /k"
        )
    )

    for record in passes:
        assert record.evaluation.verdict is Verdict.PASS, record.result.log[-1500:]
        assert value not in record.result.log
    assert "secret token: not found" in missing.result.log
    assert leaked.evaluation.oracle is Oracle.SECRET
    assert leaked.evaluation.signature == Signature(
        Phase.RESULT, "build secret value in output files"
    )
    assert value not in leaked.evaluation.detail


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_classic_rejects_secret_flag(session: Session) -> None:
    record = session.execute(_secret_case("classic", "env"))

    assert record.evaluation.verdict is Verdict.EXPECTED, record.result.log[-800:]
    assert record.evaluation.rule == "classic-secret-flag"


def _command_lines() -> list[bytes]:
    lines = []
    for entry in Path("/proc").iterdir():
        try:
            lines.append((entry / "cmdline").read_bytes())
        except OSError:
            pass  # not a process, or it ended
    return lines


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_secret_value_never_on_a_command_line(session: Session) -> None:
    value = secrets.build_secret_value("token").encode()
    case = _secret_case("buildx-docker", "env", "RUN sleep 2")
    seen: list[bytes] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            seen.extend(line for line in _command_lines() if b"--secret" in line)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        record = session.execute(case)
    finally:
        done.set()
        watcher.join()

    assert record.result.succeeded, record.result.log[-2000:]
    assert seen
    assert not any(value in line for line in seen)


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_repro_reproduces_with_secrets(run_dir: Path) -> None:
    """The failure comes after the secret mounts, so it reproduces only when
    repro.sh passes both secrets; unset variables take the placeholder."""
    signature = Signature(Phase.SOLVE, '"/missing-file": not found')
    case = Case(
        dockerfile=(
            f"FROM {BUSYBOX_IMAGE}",
            SECRET_RUN,
            secret_run("cert"),
            "COPY missing-file /x",
        ),
        build_secrets=(("token", "file"), ("cert", "env")),
    )
    script = run_dir / "repro.sh"
    script.write_text(render_repro(case, signature, timeout=120))
    engine = start_engine("26.1", run_dir)
    tools = client_tools(run_dir)
    try:
        completed = subprocess.run(
            ["bash", str(script)],
            env={
                "PATH": f"{tools.cli.parent}:/usr/bin:/bin",
                "DOCKER_HOST": engine.host,
                "DOCKER_CONFIG": str(tools.config_dir),
                "HOME": str(run_dir),
                "BUILDFUZZ_SECRET_cert": "my-own-value",
            },
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        engine.stop()

    assert completed.returncode == 0, completed.stdout[-2000:]
    assert "buildfuzz repro: REPRODUCED" in completed.stdout


@pytest.mark.engine
@pytest.mark.usefixtures("installed")
def test_unprivileged_client_reads_secret_file(session: Session) -> None:
    from buildfuzz.client_user import USER, user_exists

    assert user_exists(), "run ./dev.sh to create the user"
    session.run_dir.parent.chmod(0o711)  # the user passes through the workdir
    case = _secret_case("buildx-docker", "file").with_changes(client_user=USER)

    record = session.execute(case)

    assert record.evaluation.verdict is Verdict.PASS, record.result.log[-1500:]
