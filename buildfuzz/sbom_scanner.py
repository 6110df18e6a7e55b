"""BuildKit's SBOM generator, docker/buildkit-syft-scanner, built from source.

BuildKit makes an SBOM attestation by running a generator image on the
built root file system. By BuildKit's SBOM protocol
(docs/attestations/sbom-protocol.md in moby/buildkit), it sets
BUILDKIT_SCAN_SOURCE to that file system and BUILDKIT_SCAN_DESTINATION to
a directory where the generator writes SPDX JSON documents. The default
generator image cannot be pulled here, so buildfuzz compiles the scanner's
release from the Go module proxy, caches it under
``~/.cache/buildfuzz/syft-scanner/VERSION/``, and packs it as the release's
Dockerfile does: the static binary as /bin/syft-scanner in an image that
holds nothing else, as its entrypoint, with LOG_LEVEL=warn.

Cases name the image ``SCANNER_IMAGE`` (``localhost/buildfuzz/...``). The
docker-container and remote builders fetch it from the loopback registry
through their mirror of "localhost" (``publish_scanner_image``), and an
engine's own BuildKit looks it up in the engine's image store
(``import_scanner_image``).
"""

import json
import tarfile
import tempfile
import time
from pathlib import Path

import structlog
from python_on_whales import DockerClient

from buildfuzz.go_build import compile_release, staged_directory
from buildfuzz.paths import cache_root
from buildfuzz.registry import LoopbackRegistry

log = structlog.get_logger(__name__)

SCANNER_MODULE = "github.com/docker/buildkit-syft-scanner"
# NOTE: the newest release tag found in the scanner's public history (January
# 2026); the Go module proxy refused to list the module's versions here.
SCANNER_VERSION = "v1.10.0"
SCANNER_COMMAND = "syft-scanner"  # the main package is ./cmd/syft-scanner
SCANNER_REPOSITORY = "buildfuzz/syft-scanner"
SCANNER_IMAGE = f"localhost/{SCANNER_REPOSITORY}:{SCANNER_VERSION}"
# The entrypoint and environment of the release's Dockerfile.
SCANNER_CHANGES = (
    f'ENTRYPOINT ["/bin/{SCANNER_COMMAND}"]',
    "ENV LOG_LEVEL=warn",
)
# Values of Case.attest that make an SBOM attestation (see case.ATTESTATIONS).
SBOM_PREFIX = "sbom"
MARKER = ".buildfuzz-complete"


def needs_scanner(attest: str) -> bool:
    """Return True when the attestations value ``attest`` requests an SBOM."""
    return attest.startswith(SBOM_PREFIX)


def scanner_dir() -> Path:
    return cache_root() / "syft-scanner" / SCANNER_VERSION


def ensure_scanner_binary() -> Path:
    """Return the path of the compiled ``syft-scanner``, compiling it on first use.

    Later calls reuse it while the marker beside it contains the module,
    version and command that it was built from.
    """
    directory = scanner_dir()
    binary = directory / SCANNER_COMMAND
    marker = directory / MARKER
    if marker.is_file() and marker.read_text() == _fingerprint():
        return binary

    started = time.monotonic()
    log.info("sbom scanner build started", version=SCANNER_VERSION)
    with staged_directory(directory) as staging:
        compile_release(
            SCANNER_MODULE,
            SCANNER_VERSION,
            staging,
            (SCANNER_COMMAND,),
            program=f"buildkit-syft-scanner {SCANNER_VERSION}",
            fix=f"change SCANNER_VERSION in {Path(__file__).name} to an older release",
        )
        (staging / MARKER).write_text(_fingerprint())
    log.info(
        "sbom scanner built",
        version=SCANNER_VERSION,
        seconds=round(time.monotonic() - started, 1),
        directory=str(directory),
    )
    return binary


def _fingerprint() -> str:
    return json.dumps(
        {
            "module": SCANNER_MODULE,
            "version": SCANNER_VERSION,
            "command": SCANNER_COMMAND,
        }
    )


def scanner_rootfs_tar(destination: Path) -> Path:
    """Write the scanner image's root file system, /bin/syft-scanner alone."""
    binary = ensure_scanner_binary()
    with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as archive:
        directory = tarfile.TarInfo("bin")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        archive.addfile(directory)
        info = tarfile.TarInfo(f"bin/{SCANNER_COMMAND}")
        info.size = binary.stat().st_size
        info.mode = 0o755
        with binary.open("rb") as stream:
            archive.addfile(info, stream)
    return destination


def import_scanner_image(docker: DockerClient, reference: str = SCANNER_IMAGE) -> None:
    """Import the scanner image into ``docker``'s engine as ``reference``."""
    with tempfile.TemporaryDirectory(prefix="buildfuzz-scanner-") as scratch:
        tar_path = scanner_rootfs_tar(Path(scratch) / "rootfs.tar")
        docker.image.import_(tar_path, reference, changes=list(SCANNER_CHANGES))


def publish_scanner_image(docker: DockerClient, registry: LoopbackRegistry) -> str:
    """Import the scanner image into ``docker``'s engine and push it to ``registry``.

    Return the pushed reference, ``localhost:PORT/buildfuzz/syft-scanner:VERSION``.
    Builders whose buildkitd.toml mirrors "localhost" to ``registry`` find it
    as ``SCANNER_IMAGE``.
    """
    started = time.monotonic()
    reference = registry.image(SCANNER_REPOSITORY, SCANNER_VERSION)
    import_scanner_image(docker, reference)
    if registry.username is not None and registry.password is not None:
        docker.login(registry.host, registry.username, registry.password)
    docker.image.push(reference, quiet=True)
    log.info(
        "sbom scanner image published",
        image=reference,
        seconds=round(time.monotonic() - started, 1),
    )
    return reference
