"""The secret oracle: no secret value may end up in what a build makes.

Build arguments given as ``env:NAME`` and build secrets (``--secret``) are
secrets (``buildfuzz.secrets``). After a successful build of a case that
has any, the oracle looks for each raw value in:

* a loaded image: its config (``docker image inspect``), its history
  (``docker history --no-trunc``) and its layers (``docker image save``);
* a type=docker tar: the same parts, read from the tar;
* type=tar and type=local: every file's content, name and link target;
* a pushed image: its config and its gzip or uncompressed layers, read
  from the registry (``find_pushed_leaks``).

A value found is a finding, unless an expected-failure rule explains the
message: Docker documents that a build argument consumed by a RUN step is
recorded in the image history (rule ``build-arg-in-history`` in
``strategies/rules/expected.toml``). No rule explains a build secret's
value in an output: BuildKit mounts it for a RUN step and keeps it out of
layers, cache and history. Reports name where the value was and which
argument or secret it belongs to, never the value.
"""

import bz2
import gzip
import io
import json
import lzma
import os
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from python_on_whales import DockerClient

from buildfuzz import secrets
from buildfuzz.build import IMAGE_NAME, tag_for
from buildfuzz.case import Case, Output
from buildfuzz.oracle_push import PushedImage
from buildfuzz.signature import Phase, Signature
from buildfuzz.verdict import Oracle, OracleReport

COMMAND_TIMEOUT = 120.0
_DECOMPRESSORS = (
    (b"\x1f\x8b", gzip.decompress),
    (b"BZh", bz2.decompress),
    (b"\xfd7zXZ\x00", lzma.decompress),
)


@dataclass(frozen=True)
class Leak:
    where: str  # "image config", "image history", "image layer" or "output files"
    # What the value belongs to: "secret build argument NAME" or "build secret ID".
    source: str
    detail: str  # the file or field, without the value


BUILD_SECRET = "build secret"


def secret_values(case: Case) -> dict[str, str]:
    """Return the values of the case's secret build arguments and build secrets.

    Each is keyed by what it belongs to, as Leak.source names it.
    """
    found = {}
    for name, value in case.build_args:
        if value.startswith(secrets.ENV_PREFIX):
            raw = secrets.resolve(value)
            if len(raw) >= secrets.MIN_LENGTH:
                found[f"secret build argument {name}"] = raw
    for secret_id, _ in case.build_secrets:
        found[f"{BUILD_SECRET} {secret_id}"] = secrets.build_secret_value(secret_id)
    return found


def find_leaks(
    case: Case, case_dir: Path, docker: DockerClient, values: dict[str, str]
) -> list[Leak]:
    """Look for every secret value in what the build of ``case`` produced."""
    if case.output is Output.TAR:
        return list(_scan_tar_file(case_dir / "rootfs.tar", values, "output files"))
    if case.output is Output.LOCAL:
        return list(_scan_directory(case_dir / "rootfs", values))
    if case.output is Output.DOCKER_TAR:
        return list(_scan_image_tar(case_dir / "image.tar", values))
    if case.output is Output.OCI:
        return list(_scan_image_tar(case_dir / "image-oci.tar", values))
    image = tag_for(case)
    leaks = list(
        _scan_text(
            _cli(docker, "image", "inspect", image),
            values,
            "image config",
            "docker image inspect",
        )
    )
    history = _cli(docker, "history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    leaks += _scan_text(history, values, "image history", "docker history")
    saved = case_dir / "image-save.tar"
    _cli(docker, "image", "save", "--output", str(saved), image)
    try:
        leaks += _scan_image_tar(saved, values)
    finally:
        saved.unlink(missing_ok=True)
    return leaks


def find_pushed_leaks(reference: str, values: dict[str, str]) -> list[Leak]:
    """Look for every secret value in the image pushed to ``reference``.

    Layers are read when they are gzip or plain tars; Python's standard
    library has no zstd, so a zstd layer is left out.
    """
    image = PushedImage(reference)
    leaks: list[Leak] = []
    for manifest in image.image_manifests():
        config = _config(image.blob(str(manifest["config"]["digest"])))
        if config is not None:
            history = json.dumps(config.pop("history", []))
            leaks += _scan_text(history, values, "image history", "pushed config")
            text = json.dumps(config)
            leaks += _scan_text(text, values, "image config", "pushed config")
        for layer in manifest.get("layers", []):
            data = _decompressed(image.blob(str(layer["digest"])))
            if _is_tar(data):
                with tarfile.open(fileobj=io.BytesIO(data)) as archive:
                    leaks += _scan_tar(archive, values, "image layer")
    return leaks


def secret_report(leaks: list[Leak]) -> OracleReport | None:
    if not leaks:
        return None
    # A build secret's leak is reported apart, so that the rules about build
    # arguments (messages "secret value in ...") never explain it.
    secret_leaks = [leak for leak in leaks if leak.source.startswith(BUILD_SECRET)]
    prefix = f"{BUILD_SECRET} value" if secret_leaks else "secret value"
    places = sorted({leak.where for leak in secret_leaks or leaks})
    detail = "\n".join(
        f"{leak.source} found in {leak.where}: {leak.detail}" for leak in leaks
    )
    return OracleReport(
        Oracle.SECRET,
        Signature(Phase.RESULT, f"{prefix} in {', '.join(places)}"),
        detail + "\n",
    )


def _cli(docker: DockerClient, *arguments: str) -> str:
    completed = subprocess.run(
        [*docker.docker_cmd, *arguments],
        capture_output=True,
        timeout=COMMAND_TIMEOUT,
        check=True,
    )
    return completed.stdout.decode("utf-8", "surrogateescape")


def _scan_text(
    text: str, values: dict[str, str], where: str, detail: str
) -> Iterator[Leak]:
    for name, value in values.items():
        if value in text:
            yield Leak(where, name, detail)


def _scan_bytes(
    data: bytes, values: dict[str, str], where: str, detail: str
) -> Iterator[Leak]:
    for name, value in values.items():
        if value.encode("utf-8", "surrogateescape") in data:
            yield Leak(where, name, detail)


def _scan_tar_file(path: Path, values: dict[str, str], where: str) -> Iterator[Leak]:
    with tarfile.open(path, "r:*") as archive:
        yield from _scan_tar(archive, values, where)


def _scan_tar(
    archive: tarfile.TarFile, values: dict[str, str], where: str
) -> Iterator[Leak]:
    for member in archive:
        names = f"{member.name}\n{member.linkname}".encode("utf-8", "surrogateescape")
        yield from _scan_bytes(names, values, where, f"name of {member.name}")
        if member.isreg():
            stream = archive.extractfile(member)
            assert stream is not None
            yield from _scan_bytes(stream.read(), values, where, member.name)


def _scan_directory(root: Path, values: dict[str, str]) -> Iterator[Leak]:
    for directory, names, files in os.walk(root):
        for name in names + files:
            path = Path(directory) / name
            relative = str(path.relative_to(root))
            yield from _scan_text(
                relative, values, "output files", f"name of {relative}"
            )
            if path.is_symlink():
                target = os.readlink(path)
                yield from _scan_text(
                    target, values, "output files", f"target of {relative}"
                )
            elif path.is_file():
                yield from _scan_bytes(
                    path.read_bytes(), values, "output files", relative
                )


def _scan_image_tar(path: Path, values: dict[str, str]) -> Iterator[Leak]:
    """Scan a ``docker save``, type=docker or type=oci tar: configs apart from
    history, layers, and other blobs such as attestations."""
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if not member.isreg():
                continue
            stream = archive.extractfile(member)
            assert stream is not None
            data = _decompressed(stream.read())
            config = _config(data)
            if config is not None:
                # History is reported as such, from the same config.
                history = json.dumps(config.pop("history", []))
                yield from _scan_text(history, values, "image history", member.name)
                text = json.dumps(config)
                yield from _scan_text(text, values, "image config", member.name)
            elif _is_tar(data):
                with tarfile.open(fileobj=io.BytesIO(data)) as layer:
                    yield from _scan_tar(layer, values, "image layer")
            else:
                yield from _scan_bytes(data, values, "image metadata", member.name)


def _decompressed(data: bytes) -> bytes:
    for magic, decompress in _DECOMPRESSORS:
        if data.startswith(magic):
            try:
                return decompress(data)
            except (OSError, EOFError, ValueError, lzma.LZMAError):
                return data
    return data


def _config(data: bytes) -> dict[str, object] | None:
    if not data.startswith(b"{"):
        return None
    try:
        parsed = json.loads(data)
    except ValueError:
        return None
    if isinstance(parsed, dict) and ("rootfs" in parsed or "history" in parsed):
        return parsed
    return None


def _is_tar(data: bytes) -> bool:
    return len(data) >= 512 and data[257:262] == b"ustar"


__all__ = [
    "IMAGE_NAME",
    "Leak",
    "find_leaks",
    "find_pushed_leaks",
    "secret_report",
    "secret_values",
]
