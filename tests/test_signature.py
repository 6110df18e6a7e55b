"""Tests of failure signatures, against the real logs in tests/data/errors."""

import tomllib
from collections import defaultdict
from pathlib import Path

import pytest

from buildfuzz.signature import (
    MAX_MESSAGE,
    Phase,
    Signature,
    buildx_signature,
    classic_signature,
    load_signature,
    normalise,
)

CORPUS = Path(__file__).parent / "data" / "errors"
SAMPLES: dict[str, dict[str, str]] = tomllib.loads(
    (CORPUS / "expected.toml").read_text()
)["samples"]


def signature_of(name: str) -> Signature:
    """Compute a sample's signature with the function its builder uses."""
    sample = SAMPLES[name]
    log = (CORPUS / f"{name}.log").read_text()
    builder = sample["builder"]
    if builder == "load":
        return load_signature(log)
    if builder == "buildx":
        return buildx_signature(log)
    if builder == "cli" and "docker buildx" in sample["command"]:
        return buildx_signature(log)
    return classic_signature(log)


def causes_by_group() -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, sample in SAMPLES.items():
        groups[(sample["builder"], sample["cause"])].append(name)
    return dict(groups)


GROUPS = causes_by_group()
BUILDERS = sorted({sample["builder"] for sample in SAMPLES.values()})


def test_corpus_logs_match_entries() -> None:
    logs = {path.stem for path in CORPUS.glob("*.log")}
    assert logs - SAMPLES.keys() == set(), "logs without an expected.toml entry"
    assert SAMPLES.keys() - logs == set(), "expected.toml entries without a log"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_sample_phase(name: str) -> None:
    signature = signature_of(name)
    assert signature.phase == Phase(SAMPLES[name]["phase"]), str(signature)


@pytest.mark.parametrize(
    "group", sorted(GROUPS), ids=lambda group: f"{group[0]}/{group[1]}"
)
def test_cause_has_one_signature(group: tuple[str, str]) -> None:
    signatures = {name: str(signature_of(name)) for name in GROUPS[group]}
    assert len(set(signatures.values())) == 1, signatures


@pytest.mark.parametrize("builder", BUILDERS)
def test_causes_get_different_signatures(builder: str) -> None:
    causes: dict[Signature, set[str]] = defaultdict(set)
    for name, sample in SAMPLES.items():
        if sample["builder"] == builder:
            causes[signature_of(name)].add(sample["cause"])
    shared = {str(sig): names for sig, names in causes.items() if len(names) > 1}
    assert shared == {}


def test_load_ignores_daemon_prefix() -> None:
    """`docker import` errors come as API errors, `docker load` errors do not."""
    with_prefix = signature_of("import-tar-invalid-header")
    without_prefix = signature_of("load-corrupt-tar-a")
    assert with_prefix == without_prefix


def test_classic_skips_help_hint() -> None:
    signature = signature_of("cli-output-flag-unsupported")
    assert signature.message == "unknown flag: --output"


def test_push_vertex_is_export() -> None:
    """A push fails in vertex "pushing <image> with docker", not in a step."""
    signature = signature_of("buildx-export-push-refused-b")
    assert signature.phase == Phase.EXPORT


def test_run_keeps_runtime_error() -> None:
    signature = signature_of("buildx-run-on-scratch")
    assert signature.message.startswith('process "<q>" did not complete')
    assert 'exec: "<q>": stat <path>: no such file' in signature.message


def test_classic_keeps_client_tar_error() -> None:
    signature = signature_of("classic-context-socket")
    assert signature.message.endswith(
        "(context tar: archive/tar: sockets not supported)"
    )


def test_normalise_sha256_digest() -> None:
    digest = "sha256:6070fd6962fa1ad81584270b2786ea7a5679db0568cd839dc4694799dc072a1a"
    assert normalise(f"writing image {digest} done") == "writing image <digest> done"


def test_normalise_bare_digest() -> None:
    digest = "69ce27f8e7327134fbac330aae7449d627e0e384bedda7210df87f39fd2d9bef"
    assert normalise(f"layer {digest} missing") == "layer <digest> missing"


def test_normalise_uuid() -> None:
    message = "snapshot 82426739-289e-41f5-a11e-4b4da7040597 removed"
    assert normalise(message) == "snapshot <uuid> removed"


def test_normalise_buildkit_ref() -> None:
    message = (
        "failed to calculate checksum of ref "
        '82426739-289e-41f5-a11e-4b4da7040597::d6ag4nzpat2s73e8sosf15uw1: "/a": '
        "not found"
    )
    expected = 'failed to calculate checksum of ref <uuid>::<ref>: "<q>": not found'
    assert normalise(message) == expected


def test_normalise_container_id() -> None:
    message = "Removed intermediate container 0a48430d7da2"
    assert normalise(message) == "Removed intermediate container <id>"


def test_normalise_absolute_path() -> None:
    message = "open /tmp/corpus-ctx/conf/private.pem: permission denied"
    assert normalise(message) == "open <path>: permission denied"


def test_normalise_keeps_layout_basename() -> None:
    message = "open /var/lib/docker/tmp/docker-import-42/manifest.json: no such file"
    assert normalise(message) == "open <path>/manifest.json: no such file"


def test_normalise_dotted_directory_path() -> None:
    """A dotted directory in a path is not taken for a registry host."""
    message = "open /etc/conf.d/app/repositories: no such file"
    assert normalise(message) == "open <path>/repositories: no such file"


def test_normalise_dockerfile_names() -> None:
    plain = normalise("lstat /ctx/a/Dockerfile: no such file")
    assert plain == "lstat <path>/Dockerfile: no such file"
    assert normalise("lstat /ctx/b/Prod.Dockerfile: no such file") == plain
    assert normalise("lstat /ctx/c/Dockerfile.dev: no such file") == plain


def test_normalise_relative_path() -> None:
    message = "error from sender: open vendor/cache: permission denied"
    assert normalise(message) == "error from sender: open <path>: permission denied"


def test_normalise_numbers() -> None:
    message = "dockerfile parse error on line 12: exit code: 7"
    assert normalise(message) == "dockerfile parse error on line <n>: exit code: <n>"


def test_normalise_durations() -> None:
    assert normalise("timed out after 1.5s") == "timed out after <dur>"
    assert normalise("timed out after 250ms") == "timed out after <dur>"
    assert normalise("timed out after 3m") == "timed out after <dur>"


def test_normalise_timestamp() -> None:
    message = 'time="2026-12-04T15:22:14Z" level=error'
    assert normalise(message) == 'time="<q>" level=error'
    assert normalise("at 2026-12-04T15:22:14.5+01:00 failed") == "at <time> failed"


def test_normalise_image_with_port() -> None:
    message = "localhost:15000/bf-busybox:2-does-not-exist: not found"
    assert normalise(message) == "<image>: not found"


def test_normalise_image_with_domain() -> None:
    digest = "sha256:538ebd000e035b69a33919d175c0cb359248bba51a6dfa24c26a529ed40cb376"
    message = f"pull registry.example.com/team/app@{digest} failed"
    assert normalise(message) == "pull <image> failed"


def test_normalise_image_with_address() -> None:
    message = "failed to resolve source metadata for 127.0.0.1:15998/other:3.1"
    assert normalise(message) == "failed to resolve source metadata for <image>"


def test_normalise_strips_daemon_prefix() -> None:
    message = "Error response from daemon: archive/tar: invalid tar header"
    assert normalise(message) == "archive/tar: invalid tar header"


def test_normalise_strips_repeated_prefix() -> None:
    prefix = "Error response from daemon: "
    assert normalise(f"{prefix}{prefix}unexpected EOF") == "unexpected EOF"


def test_normalise_keeps_inner_prefix() -> None:
    """The CLI adds the prefix only at the start. Later, it belongs to the cause."""
    message = "push failed: Error response from daemon: denied"
    assert normalise(message) == message


def test_normalise_chown_user_name() -> None:
    message = "can't find uid for user nosuchuser: no such file"
    assert normalise(message) == "can't find uid for user <name>: no such file"


def test_normalise_chown_group_name() -> None:
    message = "can't find gid for group nosuchgroup: no such file"
    assert normalise(message) == "can't find gid for group <name>: no such file"


def test_normalise_apostrophe_not_quote() -> None:
    message = "error checking context: can't stat '/tmp/ctx/private'"
    assert normalise(message) == "error checking context: can't stat '<q>'"


def test_normalise_strips_ansi_codes() -> None:
    message = "\x1b[91m/bin/sh: -c requires an argument\x1b[0m"
    assert normalise(message) == "<path>: -c requires an argument"


def test_normalise_collapses_whitespace() -> None:
    assert normalise("  failed \n\t to   solve ") == "failed to solve"


def test_normalise_truncates_long_message() -> None:
    assert len(normalise("x " * MAX_MESSAGE)) <= MAX_MESSAGE


def test_signature_id_is_pinned() -> None:
    """Ids name finding directories, so they must not change across releases."""
    signature = Signature(Phase.SOLVE, "exit code: <n>")
    assert signature.id == "aa36c01d5f96"


def test_signature_id_equal_for_equal() -> None:
    first = Signature(Phase.PULL, "manifest unknown")
    second = Signature(Phase.PULL, "manifest unknown")
    assert first.id == second.id


def test_signature_id_depends_on_phase() -> None:
    solve = Signature(Phase.SOLVE, "unexpected EOF")
    context = Signature(Phase.CONTEXT, "unexpected EOF")
    assert solve.id != context.id


def test_signature_id_is_short_hex() -> None:
    signature_id = Signature(Phase.LOAD, "unexpected EOF").id
    assert len(signature_id) == 12
    assert all(char in "0123456789abcdef" for char in signature_id)
