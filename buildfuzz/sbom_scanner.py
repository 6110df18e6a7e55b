"""BuildKit's SBOM generator image, made from syft built from source.

BuildKit makes an SBOM attestation by running a generator image on the
built root file system. By BuildKit's SBOM protocol
(docs/attestations/sbom-protocol.md in moby/buildkit), it sets
BUILDKIT_SCAN_SOURCE to that file system, BUILDKIT_SCAN_SOURCE_EXTRAS to a
directory of further ones, and BUILDKIT_SCAN_DESTINATION to a directory
where the generator writes one in-toto statement with an SPDX document
per file system.

Neither the default generator image nor the source of its program
(docker/buildkit-syft-scanner) can be fetched here, but anchore/syft, the
scanner that program wraps, is on the Go module proxy. buildfuzz compiles
syft's command, caches it under ``~/.cache/buildfuzz/syft/VERSION/``, and
packs it into an image with busybox and ``GENERATOR_SCRIPT``, which speaks
the protocol: it runs ``syft scan dir:ROOT`` on each file system and wraps
each SPDX document in a statement.

Cases name the image ``SCANNER_IMAGE`` (``localhost/buildfuzz/...``). The
docker-container and remote builders fetch it from the loopback registry
through their mirror of "localhost" (``publish_scanner_image``), and an
engine's own BuildKit looks it up in the engine's image store
(``import_scanner_image``).
"""

import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import structlog
from python_on_whales import DockerClient

from buildfuzz.go_build import compile_release, staged_directory
from buildfuzz.install import busybox_binary
from buildfuzz.paths import cache_root
from buildfuzz.registry import LoopbackRegistry

log = structlog.get_logger(__name__)

SCANNER_MODULE = "github.com/anchore/syft"
SCANNER_VERSION = "v1.57.2"
SCANNER_COMMAND = "syft"  # the main package is ./cmd/syft
SCANNER_REPOSITORY = "buildfuzz/sbom-generator"
SCANNER_TAG = f"syft-{SCANNER_VERSION}"
SCANNER_IMAGE = f"localhost/{SCANNER_REPOSITORY}:{SCANNER_TAG}"
GENERATOR = "buildkit-sbom"  # the script's name in the image's /bin
# syft looks for a newer release on start unless SYFT_CHECK_FOR_APP_UPDATE
# is false, and the generator must reach no host. Its caches go to
# BuildKit's tmpfs on /tmp.
SCANNER_CHANGES = (
    f'ENTRYPOINT ["/bin/{GENERATOR}"]',
    "ENV PATH=/bin",
    "ENV HOME=/tmp",
    "ENV SYFT_CHECK_FOR_APP_UPDATE=false",
)
# The busybox applets that the script runs.
APPLETS = ("sh", "cat", "basename", "rm")
SPDX_PREDICATE = "https://spdx.dev/Document"
STATEMENT_TYPE = "https://in-toto.io/Statement/v0.1"
# An in-toto statement up to its predicate, the SPDX document.
STATEMENT_START = (
    f'{{"_type":"{STATEMENT_TYPE}","predicateType":"{SPDX_PREDICATE}","predicate":'
)
# --base-path keeps syft inside each file system: an absolute symlink there
# resolves against that root, as it does in a container.
GENERATOR_SCRIPT = f"""#!/bin/sh
# BuildKit's SBOM generator protocol with syft: one in-toto statement of an
# SPDX document per file system, BUILDKIT_SCAN_SOURCE and each directory in
# BUILDKIT_SCAN_SOURCE_EXTRAS, named after the file system.
set -eu
export SYFT_CHECK_FOR_APP_UPDATE=false
scan() {{
	document=/tmp/document.spdx.json
	syft scan "dir:$1" --base-path "$1" --quiet --output "spdx-json=$document"
	{{
		printf '%s' '{STATEMENT_START}'
		cat "$document"
		echo '}}'
	}} >"$BUILDKIT_SCAN_DESTINATION/$(basename "$1").spdx.json"
	rm -f "$document"
}}
scan "$BUILDKIT_SCAN_SOURCE"
extras=${{BUILDKIT_SCAN_SOURCE_EXTRAS:-}}
if [ -n "$extras" ] && [ -d "$extras" ]; then
	for extra in "$extras"/*; do
		if [ -d "$extra" ]; then scan "$extra"; fi
	done
fi
"""
# Values of Case.attest that make an SBOM attestation (see case.ATTESTATIONS).
SBOM_PREFIX = "sbom"
MARKER = ".buildfuzz-complete"


def needs_scanner(attest: str) -> bool:
    """Return True when the attestations value ``attest`` requests an SBOM."""
    return attest.startswith(SBOM_PREFIX)


def scanner_dir() -> Path:
    return cache_root() / "syft" / SCANNER_VERSION


def ensure_scanner_binary() -> Path:
    """Return the path of the compiled ``syft``, compiling it on first use.

    Later calls reuse it while the marker beside it contains the module,
    version and command that it was built from.
    """
    directory = scanner_dir()
    binary = directory / SCANNER_COMMAND
    marker = directory / MARKER
    if marker.is_file() and marker.read_text() == _fingerprint():
        return binary

    started = time.monotonic()
    log.info("syft build started", version=SCANNER_VERSION)
    with staged_directory(directory) as staging:
        compile_release(
            SCANNER_MODULE,
            SCANNER_VERSION,
            staging,
            (SCANNER_COMMAND,),
            program=f"syft {SCANNER_VERSION}",
            fix=f"change SCANNER_VERSION in {Path(__file__).name} to an older release",
            # syft's own version variable; -s -w leave out the debug symbols,
            # a third of the binary, which the image would carry for nothing.
            ldflags=(f"-X main.version={SCANNER_VERSION}", "-s", "-w"),
        )
        (staging / MARKER).write_text(_fingerprint())
    log.info(
        "syft built",
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
            "ldflags": "-s -w",
        }
    )


def scanner_rootfs_tar(destination: Path, busybox: Path) -> Path:
    """Write the generator image's root file system to ``destination``.

    It contains /bin/syft, the static ``busybox`` with links for ``APPLETS``,
    the generator script and an empty /tmp.
    """
    binary = ensure_scanner_binary()
    with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, mode in (("bin", 0o755), ("tmp", 0o1777)):
            directory = tarfile.TarInfo(name)
            directory.type = tarfile.DIRTYPE
            directory.mode = mode
            archive.addfile(directory)
        _add_file(archive, f"bin/{SCANNER_COMMAND}", binary)
        _add_file(archive, "bin/busybox", busybox)
        for applet in APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            archive.addfile(link)
        script = GENERATOR_SCRIPT.encode()
        info = tarfile.TarInfo(f"bin/{GENERATOR}")
        info.size = len(script)
        info.mode = 0o755
        archive.addfile(info, io.BytesIO(script))
    return destination


def _add_file(archive: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o755
    with path.open("rb") as stream:
        archive.addfile(info, stream)


def import_scanner_image(docker: DockerClient, reference: str = SCANNER_IMAGE) -> None:
    """Import the scanner image into ``docker``'s engine as ``reference``."""
    with tempfile.TemporaryDirectory(prefix="buildfuzz-scanner-") as scratch:
        tar_path = scanner_rootfs_tar(
            Path(scratch) / "rootfs.tar", Path(busybox_binary())
        )
        docker.image.import_(tar_path, reference, changes=list(SCANNER_CHANGES))


def publish_scanner_image(docker: DockerClient, registry: LoopbackRegistry) -> str:
    """Import the scanner image into ``docker``'s engine and push it to ``registry``.

    Return the pushed reference, ``localhost:PORT/buildfuzz/sbom-generator:TAG``.
    Builders whose buildkitd.toml mirrors "localhost" to ``registry`` find it
    as ``SCANNER_IMAGE``.
    """
    started = time.monotonic()
    reference = registry.image(SCANNER_REPOSITORY, SCANNER_TAG)
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
