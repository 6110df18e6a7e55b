"""Base images in many registry formats, all made from the busybox root file system.

Each format is one value of the Dockerfile's base axis (``busybox-oci-zstd``,
``busybox-multi``, ...). buildfuzz builds every format a run needs once, with
BuildKit, from the same busybox files (the root file system tar of each
platform, see ``base_dockerfile``), and pushes it to a loopback registry (see
``base_publisher``). Dockerfiles name the image ``localhost/buildfuzz/NAME:1``.
Builders in containers reach it through their registry mirror for
"localhost", and engines get it pulled from the registry and tagged with that
name before the case builds.

This module holds only the table and the command-line words, so that profiles
and strategies can import it without starting anything.
"""

from dataclasses import dataclass

from buildfuzz.case import split_from

REGISTRY_HOST = "localhost"
REPOSITORY_PREFIX = "buildfuzz/"
TAG = "1"
NATIVE_PLATFORM = "linux/amd64"


@dataclass(frozen=True)
class BaseFormat:
    """A busybox image in one registry format, pushed to a loopback registry."""

    name: str
    description: str
    oci_mediatypes: bool = True
    compression: str = "gzip"  # gzip, zstd, estargz or uncompressed
    platforms: tuple[str, ...] = (NATIVE_PLATFORM,)
    attestations: bool = False  # a provenance attestation manifest (mode=min)
    authenticated: bool = False  # on the registry that requires htpasswd login

    @property
    def repository(self) -> str:
        return f"{REPOSITORY_PREFIX}{self.name}"

    @property
    def image(self) -> str:
        """The reference that Dockerfiles use: ``localhost/buildfuzz/NAME:1``."""
        return f"{REGISTRY_HOST}/{self.repository}:{TAG}"

    @property
    def multi_platform(self) -> bool:
        return len(self.platforms) > 1

    def reference(self, registry_host: str) -> str:
        """Return the image's reference on the registry at ``registry_host``."""
        return f"{registry_host}/{self.repository}:{TAG}"

    def output(self, reference: str) -> str:
        """Return the ``--output`` value that pushes this format to ``reference``."""
        return ",".join(
            (
                "type=image",
                f"name={reference}",
                "push=true",
                f"oci-mediatypes={str(self.oci_mediatypes).lower()}",
                f"compression={self.compression}",
                "force-compression=true",
            )
        )

    def build_flags(self) -> list[str]:
        """Return the ``docker buildx build`` flags besides ``--output``.

        SBOM attestations are left out: BuildKit makes them by running a
        scanner image, and no such image can be pulled here.
        """
        provenance = "mode=min" if self.attestations else "false"
        return [
            "--platform",
            ",".join(self.platforms),
            "--build-arg",
            f"{NAME_ARG}={self.name}",
            f"--provenance={provenance}",
            "--sbom=false",
        ]

    def buildctl_options(self) -> list[str]:
        """Return the ``buildctl build`` options that match ``build_flags``."""
        options = [f"--opt=platform={','.join(self.platforms)}"]
        options.append(f"--opt=build-arg:{NAME_ARG}={self.name}")
        if self.attestations:
            options.append("--opt=attest:provenance=mode=min")
        return options

    def platform_options(self) -> tuple[str, ...]:
        """Return the ``--platform`` values a case FROM this image may build for.

        "" is the engine's own platform. A foreign platform works only for
        multi-platform bases, and ``strategies.case_platforms`` allows it with
        RUN steps only where a qemu handler for it is enabled.
        """
        return ("", *self.platforms)


# The first value of a profile's pool is its default, so profiles list the
# plain formats first. BuildKit v0.34.2 rejects attestations with Docker media
# types ('cannot export attestations with "oci-mediatypes=false"'), so no
# Docker-format base has attestations.
BASE_FORMATS = (
    BaseFormat("busybox-docker", "Docker v2 manifest, gzip layer", False),
    BaseFormat("busybox-oci", "OCI manifest, gzip layer"),
    BaseFormat("busybox-oci-zstd", "OCI manifest, zstd layer", compression="zstd"),
    BaseFormat(
        "busybox-oci-estargz", "OCI manifest, eStargz layer", compression="estargz"
    ),
    BaseFormat(
        "busybox-oci-uncompressed",
        "OCI manifest, uncompressed layer",
        compression="uncompressed",
    ),
    BaseFormat(
        "busybox-docker-zstd",
        "Docker v2 manifest, zstd layer (BuildKit's tar.zstd media type)",
        False,
        compression="zstd",
    ),
    BaseFormat(
        "busybox-docker-uncompressed",
        "Docker v2 manifest, uncompressed layer",
        False,
        compression="uncompressed",
    ),
    BaseFormat(
        "busybox-multi",
        "OCI index of linux/amd64 and linux/arm64",
        platforms=(NATIVE_PLATFORM, "linux/arm64"),
    ),
    BaseFormat(
        "busybox-docker-multi",
        "Docker manifest list of linux/amd64 and linux/arm64",
        False,
        platforms=(NATIVE_PLATFORM, "linux/arm64"),
    ),
    BaseFormat(
        "busybox-attest",
        "OCI index of linux/amd64 and a provenance attestation manifest",
        attestations=True,
    ),
    BaseFormat(
        "busybox-multi-attest-zstd",
        "OCI index of linux/amd64, linux/arm64 and their attestations, zstd",
        compression="zstd",
        platforms=(NATIVE_PLATFORM, "linux/arm64"),
        attestations=True,
    ),
    BaseFormat(
        "busybox-auth",
        "Docker v2 manifest on a registry that requires htpasswd login",
        False,
        authenticated=True,
    ),
)
FORMATS_BY_NAME = {base.name: base for base in BASE_FORMATS}
FORMATS_BY_IMAGE = {base.image: base for base in BASE_FORMATS}


def formats_in(dockerfile: tuple[str, ...]) -> list[BaseFormat]:
    """Return the registry bases that ``dockerfile``'s FROM lines name, in order."""
    found: list[BaseFormat] = []
    for element in dockerfile:
        parts = split_from(element)
        base = FORMATS_BY_IMAGE.get(parts.image) if parts is not None else None
        if base is not None and base not in found:
            found.append(base)
    return found


# Engines that cannot unpack zstd layers. Docker 20.10.24 fails the pull of
# any zstd layer with "failed to register layer: ... archive/tar: invalid tar
# header" (overlay2, vfs and fuse-overlayfs, measured December 2026).
# NOTE: keyed by the engine names of builders/engines.toml; an engine defined
# under another name is not ruled out.
ENGINES_WITHOUT_ZSTD = ("20.10",)


def unusable_bases(
    *, engine: str, containerd_store: bool, engine_store: bool, registry: bool = True
) -> frozenset[str]:
    """Return the names of the bases that a builder on ``engine`` can never use.

    ``engine_store`` is true for builders that read the engine's image store
    (the classic builder and the docker driver), for which the engine pulls
    the base. Docker 26.1 with the containerd image store rejects the pull of
    a Docker v2 manifest with zstd layers, a media type that BuildKit made up
    and no Docker specification lists: "failed to unpack image on snapshotter
    overlayfs: mismatched image rootfs and manifest layers" (measured December
    2026). Builders in containers pull bases themselves. ``registry`` is
    false for an engine that cannot reach the loopback registry (a dind
    engine, a daemon over TCP): it can pull no base at all.
    """
    if not engine_store:
        return frozenset()
    if not registry:
        return frozenset(base.name for base in BASE_FORMATS)
    if engine in ENGINES_WITHOUT_ZSTD:
        return frozenset(
            base.name for base in BASE_FORMATS if base.compression == "zstd"
        )
    if containerd_store:
        return frozenset(
            base.name
            for base in BASE_FORMATS
            if base.compression == "zstd" and not base.oci_mediatypes
        )
    return frozenset()


NAME_ARG = "BASE_NAME"
NAME_FILE = "/etc/buildfuzz-base"


def base_dockerfile() -> str:
    """Return the Dockerfile that builds every format from per-platform tars.

    BuildKit sets TARGETARCH for each platform, and ``ADD`` of a local tar
    unpacks it, so every platform gets the same files from its own busybox.
    The file with the format's name makes each format's one layer different.
    Formats that shared a layer would let an engine skip the download of an
    existing layer, so its pull would not read that format, and Docker 26.1's
    containerd image store would then lack the layer's blob when it exports an
    image built FROM the base.
    """
    return (
        "FROM scratch AS rootfs\n"
        "ARG TARGETARCH\n"
        "ADD rootfs-${TARGETARCH}.tar /\n"
        f"ARG {NAME_ARG}\n"
        f"COPY names/${{{NAME_ARG}}} {NAME_FILE}\n"
        "FROM scratch\n"
        "COPY --from=rootfs / /\n"
        "ENV PATH=/bin\n"
        'CMD ["/bin/sh"]\n'
    )


def architecture(platform: str) -> str:
    """Return the architecture part of ``os/arch``: ``linux/arm64`` gives arm64."""
    return platform.split("/")[1]
