"""The tree oracle's check of a pushed image: its manifests on the registry.

After an Output.PUSH build, the oracle reads the pushed manifest (and, for
an index, each image manifest but the attestations) from the loopback
registry over HTTP on 127.0.0.1, and the first bytes of every layer blob.
It checks that:

* with ``oci_mediatypes`` "true" or "false", the manifests use OCI or
  Docker media types, and every layer's media type is of the same family;
* every layer's media type names the compression that its blob's first
  bytes show (gzip, zstd, or a plain tar);
* with ``force_compression``, every layer has the case's compression
  (gzip when the case names none; estargz is gzip with the stargz TOC
  annotation).

Without ``force_compression``, BuildKit keeps a layer blob that it already
has in another compression, as its documentation of force-compression
states, so the layers' compression is not compared with the case's then. The
files of a pushed image are not compared with the model.
"""

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from buildfuzz.case import Case
from buildfuzz.signature import Phase, Signature
from buildfuzz.verdict import Oracle, OracleReport

HTTP_TIMEOUT = 30.0
HEAD_BYTES = 512  # a tar header's "ustar" magic is at offset 257

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_FAMILIES = {
    OCI_INDEX: "OCI",
    OCI_MANIFEST: "OCI",
    DOCKER_LIST: "Docker",
    DOCKER_MANIFEST: "Docker",
}
# Layer media types: the family and the compression each names.
LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": ("OCI", "uncompressed"),
    "application/vnd.oci.image.layer.v1.tar+gzip": ("OCI", "gzip"),
    "application/vnd.oci.image.layer.v1.tar+zstd": ("OCI", "zstd"),
    "application/vnd.docker.image.rootfs.diff.tar": ("Docker", "uncompressed"),
    "application/vnd.docker.image.rootfs.diff.tar.gzip": ("Docker", "gzip"),
    "application/vnd.docker.image.rootfs.diff.tar.zstd": ("Docker", "zstd"),
}
STARGZ_ANNOTATION = "containerd.io/snapshot/stargz/toc.digest"
ATTESTATION_TYPE = "attestation-manifest"  # vnd.docker.reference.type

# Reads a manifest (by tag or digest) or the head of a blob (by digest).
FetchManifest = Callable[[str], dict[str, Any]]
FetchHead = Callable[[str], bytes]


@dataclass(frozen=True)
class Problem:
    summary: str  # the signature message: no digest, no layer number
    detail: str


class PushedImage:
    """The manifests and blobs of one reference on a loopback registry."""

    def __init__(self, reference: str) -> None:
        host, _, rest = reference.partition("/")
        self.repository, _, self.tag = rest.rpartition(":")
        port = host.rpartition(":")[2]
        # The reference names "localhost"; the registry listens on 127.0.0.1.
        self.base = f"http://127.0.0.1:{port}/v2/{self.repository}"

    def manifest(self, reference: str) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.base}/manifests/{reference}",
            headers={"Accept": ", ".join(MANIFEST_FAMILIES)},
        )
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            data = json.loads(response.read())
        if not isinstance(data, dict):
            raise ValueError(f"manifest {reference} is not a JSON object")
        return data

    def blob(self, digest: str) -> bytes:
        request = urllib.request.Request(f"{self.base}/blobs/{digest}")
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            data: bytes = response.read()
        return data

    def image_manifests(self) -> list[dict[str, Any]]:
        """Return the image manifests of the tag, without attestation manifests."""
        top = self.manifest(self.tag)
        if "manifests" not in top:
            return [top]
        return [self.manifest(digest) for digest in _image_digests(top)]

    def head(self, digest: str) -> bytes:
        request = urllib.request.Request(
            f"{self.base}/blobs/{digest}",
            headers={"Range": f"bytes=0-{HEAD_BYTES - 1}"},
        )
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            data: bytes = response.read(HEAD_BYTES)
        return data


def push_report(case: Case, reference: str) -> OracleReport | None:
    """Check the image that the build of ``case`` pushed to ``reference``."""
    image = PushedImage(reference)
    return pushed_image_report(case, image.tag, image.manifest, image.head)


def pushed_image_report(
    case: Case, tag: str, manifest: FetchManifest, head: FetchHead
) -> OracleReport | None:
    """Return a report of the first kind of problem, listing every problem."""
    problems = pushed_image_problems(case, tag, manifest, head)
    if not problems:
        return None
    detail = "".join(f"{problem.detail}\n" for problem in problems)
    return OracleReport(
        Oracle.TREE,
        Signature(Phase.RESULT, f"pushed image: {problems[0].summary}"),
        f"tree oracle: the image pushed with {_options(case)}\n\n{detail}",
    )


def pushed_image_problems(
    case: Case, tag: str, manifest: FetchManifest, head: FetchHead
) -> list[Problem]:
    top = manifest(tag)
    problems = _family_problems(case, "the pushed manifest", top)
    if "manifests" in top:
        manifests = [manifest(digest) for digest in _image_digests(top)]
    else:
        manifests = [top]
    for image in manifests:
        problems += _family_problems(case, "an image manifest", image)
        for number, layer in enumerate(image.get("layers", [])):
            problems += _layer_problems(case, number, layer, head)
    return problems


def _image_digests(index: dict[str, Any]) -> list[str]:
    return [
        str(entry["digest"])
        for entry in index["manifests"]
        if entry.get("annotations", {}).get("vnd.docker.reference.type")
        != ATTESTATION_TYPE
    ]


def _family_problems(case: Case, what: str, data: dict[str, Any]) -> list[Problem]:
    media_type = str(data.get("mediaType", ""))
    family = MANIFEST_FAMILIES.get(media_type)
    if family is None:
        return [Problem("unknown manifest media type", f"{what}: {media_type!r}")]
    expected = {"true": "OCI", "false": "Docker"}.get(case.oci_mediatypes)
    if expected is None or family == expected:
        return []
    return [
        Problem(
            f"{family} media types, expected {expected}",
            f"{what} is {media_type}, but oci-mediatypes={case.oci_mediatypes}",
        )
    ]


def _layer_problems(
    case: Case, number: int, layer: dict[str, Any], head: FetchHead
) -> list[Problem]:
    media_type = str(layer.get("mediaType", ""))
    where = f"layer {number} ({layer.get('digest', '?')})"
    if media_type not in LAYER_TYPES:
        return [Problem("unknown layer media type", f"{where}: {media_type!r}")]
    family, named = LAYER_TYPES[media_type]
    problems = []
    expected_family = {"true": "OCI", "false": "Docker"}.get(case.oci_mediatypes)
    if expected_family is not None and family != expected_family:
        problems.append(
            Problem(
                f"{family} layer media type, expected {expected_family}",
                f"{where} is {media_type}",
            )
        )
    actual = blob_compression(head(str(layer["digest"])))
    if actual != named:
        problems.append(
            Problem(
                f"layer media type names {named}, but its blob is {actual}",
                f"{where} is {media_type}, but its first bytes are {actual}",
            )
        )
    if case.force_compression:
        stargz = STARGZ_ANNOTATION in layer.get("annotations", {})
        found = "estargz" if named == "gzip" and stargz else named
        expected = case.compression or "gzip"
        matches = found == expected or (expected == "gzip" and named == "gzip")
        if not matches:
            problems.append(
                Problem(
                    f"layer compression {found}, expected {expected}",
                    f"{where} is {found} ({media_type}), "
                    f"but the case forces {expected}",
                )
            )
    return problems


def blob_compression(data: bytes) -> str:
    """Name the compression of a blob by its first bytes."""
    if data.startswith(b"\x1f\x8b"):
        return "gzip"
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        return "zstd"
    if data[257:262] == b"ustar" or not data.strip(b"\x00"):
        return "uncompressed"  # a tar, or the zero blocks of an empty one
    return "unknown"


def _options(case: Case) -> str:
    options = [f"compression={case.compression or '(default)'}"]
    options.append(f"force-compression={str(case.force_compression).lower()}")
    options.append(f"oci-mediatypes={case.oci_mediatypes or '(default)'}")
    return ", ".join(options)


FETCH_ERRORS = (urllib.error.URLError, OSError, ValueError, KeyError, TypeError)

__all__ = [
    "FETCH_ERRORS",
    "PushedImage",
    "blob_compression",
    "push_report",
    "pushed_image_problems",
    "pushed_image_report",
]
