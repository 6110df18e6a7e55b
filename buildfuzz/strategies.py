"""Hypothesis strategies that generate cases from a profile.

Every axis is drawn with ``sampled_from`` over the profile's pool, so that
shrinking moves each axis towards its first (default) value. The context
is drawn in ``strategies_context`` and the Dockerfile in
``strategies_dockerfile``; this module puts a case together.
"""

from collections.abc import Sequence
from dataclasses import dataclass

from hypothesis import strategies as st

from buildfuzz.base_formats import formats_in, unusable_bases
from buildfuzz.case import Case, Output, split_from
from buildfuzz.churn import churn_target
from buildfuzz.emulation import runnable_platforms
from buildfuzz.profile import Profile
from buildfuzz.strategies_context import (
    RESERVED_NAMES,
    bulk_recipes,
    context_files,
    dockerfile_dockerignore_patterns,
    dockerignore_patterns,
)
from buildfuzz.strategies_dockerfile import (
    BASE_IMAGES,
    BUSYBOX_IMAGE,
    FIRST_STAGE,
    SHELL_INSTRUCTIONS,
    dockerfiles,
    render_instruction,
)

NATIVE_PLATFORMS = ("", "linux/amd64")
# Storage drivers that have a containerd snapshotter built into containerd.
CONTAINERD_DRIVERS = ("overlay2", "vfs")

__all__ = [
    "BASE_IMAGES",
    "BUSYBOX_IMAGE",
    "CONTAINERD_DRIVERS",
    "NATIVE_PLATFORMS",
    "RESERVED_NAMES",
    "SHELL_INSTRUCTIONS",
    "Target",
    "case_platforms",
    "cases",
    "render_instruction",
]


@dataclass(frozen=True)
class Target:
    """An engine and a builder that a case may run on."""

    engine: str
    builder: str
    outputs: tuple[Output, ...] = (Output.LOAD,)
    storage_drivers: tuple[str, ...] = ("overlay2",)
    containerd_store: bool = False
    limits: bool = True  # data-root and memory limits; not for existing daemons
    # Whether the builder reads the engine's image store (classic, docker
    # driver). True is the safe default: it rules out more registry bases.
    engine_store: bool = True
    # Whether the engine reaches the loopback registry that serves the bases.
    registry: bool = True
    # Whether a non-root client may run the build: a sandbox engine, a builder
    # that needs no buildx builder of its own, and the user exists.
    client_users: bool = False


def cases(profile: Profile, targets: Sequence[Target]) -> st.SearchStrategy[Case]:
    """Return a strategy for cases of ``profile`` on one of ``targets``."""
    if not targets:
        raise ValueError("at least one target is needed")
    return _case_strategy(profile, tuple(targets))


@st.composite
def _case_strategy(
    draw: st.DrawFn, profile: Profile, targets: tuple[Target, ...]
) -> Case:
    target = draw(st.sampled_from(targets))
    engine_options = draw(engine_settings(profile, target))
    dockerfile_name = draw(st.sampled_from(profile.dockerfile.paths))
    reserved = RESERVED_NAMES | {dockerfile_name.split("/")[0]}
    files = draw(context_files(profile, reserved))
    bulk = draw(bulk_recipes(profile))
    dockerignore = draw(dockerignore_patterns(profile))
    dockerfile_dockerignore = draw(dockerfile_dockerignore_patterns(profile))
    stage_target = draw(st.sampled_from(profile.build.targets))
    build_secrets = draw(st.sampled_from(profile.build.secrets))
    excluded_bases = unusable_bases(
        engine=target.engine,
        containerd_store=engine_options["containerd_store"],
        engine_store=target.engine_store,
        registry=target.registry,
    )
    dockerfile = draw(
        dockerfiles(
            profile,
            files,
            name_stages=bool(stage_target),
            dockerfile_name=dockerfile_name,
            excluded_bases=excluded_bases,
            secret_ids=tuple(secret_id for secret_id, _ in build_secrets),
        )
    )

    # Outputs the builder cannot produce are never drawn: such a build would
    # only ever fail with the builder's "not supported" message.
    # A push goes to the loopback registry, which the target must reach.
    outputs = [
        o for o in profile.build.outputs
        if o in target.outputs and (o is not Output.PUSH or target.registry)
    ]  # fmt: skip
    output = draw(st.sampled_from(outputs)) if outputs else Output.LOAD
    platforms = case_platforms(profile.build.platforms, dockerfile)
    platform = draw(st.sampled_from(platforms))
    build_args = draw(_subset(profile.build.build_args))
    no_cache = draw(st.sampled_from(profile.build.no_cache))
    # Extra tags name a loaded image; the other outputs have no image to tag.
    tags = draw(st.sampled_from(profile.build.tags)) if output is Output.LOAD else ()
    cache = draw(st.sampled_from(profile.build.caches))
    push_options = draw(push_settings(profile)) if output is Output.PUSH else {}
    context_from = draw(st.sampled_from(profile.build.context_from))
    users = profile.build.client_users if target.client_users else ("",)
    client_user = draw(st.sampled_from(users))
    churn = draw(st.sampled_from(profile.build.churn)) if churn_target(files) else ""
    attest = draw(st.sampled_from(profile.build.attestations))

    return Case(
        files=files,
        dockerignore=dockerignore,
        dockerfile=dockerfile,
        engine=target.engine,
        **engine_options,
        builder=target.builder,
        platform=platform,
        build_args=build_args,
        output=output,
        bulk=bulk,
        dockerfile_name=dockerfile_name,
        dockerfile_dockerignore=dockerfile_dockerignore,
        target=FIRST_STAGE if stage_target == "first" else "",
        no_cache=no_cache,
        tags=tags,
        cache=cache,
        attest=attest,
        build_secrets=build_secrets,
        **push_options,
        context_from=context_from,
        client_user=client_user,
        churn=churn,
    )


def case_platforms(
    platforms: tuple[str, ...],
    dockerfile: tuple[str, ...],
    runnable: frozenset[str] | None = None,
) -> tuple[str, ...]:
    """Return the platforms of ``platforms`` that every base of ``dockerfile`` has.

    The local busybox base exists for the machine's platform only; any other
    platform would make the engine look for it in a registry. A registry base
    has the platforms of its format. RUN steps run the base's binaries, so
    with them a foreign platform must also be in ``runnable``: the platforms
    this machine runs natively or with a qemu handler (read from
    ``emulation.BINFMT_DIR`` when None).
    """
    # A stage FROM --platform=$BUILDPLATFORM takes its base for the machine's
    # own platform, whatever the build's target platforms are.
    on_target = tuple(
        line
        for line in dockerfile
        if line.startswith("FROM ")
        and getattr(split_from(line), "platform", "") != "$BUILDPLATFORM"
    )
    allowed = {part for platform in platforms for part in platform.split(",")}
    if any(BUSYBOX_IMAGE in line for line in on_target):
        allowed &= set(NATIVE_PLATFORMS)
    for base in formats_in(on_target):
        allowed &= set(base.platform_options())
    if on_target and any(element.startswith("RUN ") for element in dockerfile):
        # NOTE: these are the handlers of this machine, where sandbox engines
        # run. An --engine-host daemon on another machine may have others.
        if runnable is None:
            runnable = runnable_platforms()
        allowed &= set(NATIVE_PLATFORMS) | runnable
    chosen = [p for p in platforms if all(part in allowed for part in p.split(","))]
    return tuple(chosen) or ("",)


@st.composite
def push_settings(draw: st.DrawFn, profile: Profile) -> dict:
    """Draw the options of a pushed image; other outputs keep the defaults."""
    axes = profile.build
    return {
        "compression": draw(st.sampled_from(axes.compressions)),
        "force_compression": draw(st.sampled_from(axes.force_compression)),
        "oci_mediatypes": draw(st.sampled_from(axes.oci_mediatypes)),
    }


@st.composite
def engine_settings(draw: st.DrawFn, profile: Profile, target: Target) -> dict:
    """Draw the daemon options; options the engine lacks are never drawn."""
    axes = profile.engine
    stores = [s for s in axes.containerd_store if not s or target.containerd_store]
    containerd_store = draw(st.sampled_from(stores or [False]))
    # "" is the engine's own default driver; other drivers need support, and
    # the containerd image store has snapshotters for overlay2 and vfs only.
    drivers = [
        d for d in axes.storage_drivers
        if not d or (d in target.storage_drivers
                     and (not containerd_store or d in CONTAINERD_DRIVERS))
    ]  # fmt: skip
    return {
        "storage_driver": draw(st.sampled_from(drivers or [""])),
        "containerd_store": containerd_store,
        "data_root_mib": draw(st.sampled_from(axes.data_root_mib))
        if target.limits
        else 0,
        "memory_mib": draw(st.sampled_from(axes.memory_mib)) if target.limits else 0,
    }


def _subset(pairs: tuple[tuple[str, str], ...]) -> st.SearchStrategy:
    if not pairs:
        return st.just(())
    return st.lists(st.sampled_from(pairs), unique=True, max_size=len(pairs)).map(
        lambda chosen: tuple(sorted(chosen))
    )
