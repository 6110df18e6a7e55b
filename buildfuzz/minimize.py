"""After Hypothesis: make a finding 1-minimal and tell which axes matter.

Hypothesis shrinks the drawn choices; it cannot see that, say, resetting a
file's owner to the default still fails. ``one_minimal`` tries every single
simplification of the case towards the profile's defaults and keeps each
one that still reproduces, until none does: undoing any one remaining
difference then makes the failure go away. ``explain`` then tries other
values of the axes left at their defaults, within a bounded number of
builds, and reports which of them are free and which the failure needs.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import structlog

from buildfuzz.case import OPTIONAL_FIELDS, Case, ContextFile, FileKind
from buildfuzz.profile import Profile
from buildfuzz.strategies import BASE_IMAGES, Target, case_platforms

log = structlog.get_logger(__name__)

Reproduces = Callable[[Case], bool]
ENGINE_OPTIONS = ("storage_driver", "containerd_store", "data_root_mib", "memory_mib")
# Case fields whose default is the Case's own.
CASE_OPTIONS = OPTIONAL_FIELDS

# Attributes of a context file that a step resets to the profile's default.
FILE_ATTRIBUTES = ("size", "mode", "uid", "gid", "mtime_ns", "xattrs")


@dataclass
class Minimization:
    case: Case
    builds: int  # cases tried, which a caller that caches outcomes may not build
    complete: bool


@dataclass
class AxisReport:
    """How the failure depends on one axis."""

    axis: str
    value: str
    failing: list[str] = field(default_factory=list)
    passing: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if not self.failing and not self.passing:
            return "untested"
        if not self.passing:
            return "free"
        if not self.failing:
            return "needed"
        return "partly needed"


def default_case(profile: Profile, targets: tuple[Target, ...]) -> Case:
    """Return the case made of every axis' default value."""
    base = BASE_IMAGES[profile.dockerfile.bases[0]]
    return Case(
        files=(),
        dockerignore=None,
        dockerfile=(f"FROM {base}",),
        engine=targets[0].engine,
        storage_driver=profile.engine.storage_drivers[0],
        containerd_store=profile.engine.containerd_store[0],
        data_root_mib=profile.engine.data_root_mib[0],
        memory_mib=profile.engine.memory_mib[0],
        builder=targets[0].builder,
        platform=profile.build.platforms[0],
        build_args=(),
        output=profile.build.outputs[0],
    )


def fits(case: Case, target: Target) -> bool:
    """Return whether ``target`` supports the case's output and engine options."""
    if case.output not in target.outputs:
        return False
    if case.containerd_store and not target.containerd_store:
        return False
    driver = case.storage_driver
    return not driver or driver in target.storage_drivers


def default_file(profile: Profile, entry: ContextFile) -> ContextFile:
    axes = profile.context
    pool = axes.dir_modes if entry.kind is FileKind.DIR else axes.modes
    return replace(
        entry,
        size=axes.sizes[0] if entry.kind is FileKind.FILE else 0,
        mode=pool[0],
        uid=axes.owners[0],
        gid=axes.owners[0],
        mtime_ns=axes.mtimes_ns[0],
        xattrs=axes.xattrs[0],
    )


def simplifications(
    case: Case,
    default: Case,
    profile: Profile,
    targets: tuple[Target, ...],
    *,
    groups: bool = False,
) -> Iterator[tuple[str, Case]]:
    """Yield every case that undoes one difference of ``case`` from the default.

    Each case comes with a label that names the step by content, not by
    position, so that a step keeps its label when an earlier one is applied.
    With ``groups``, steps that undo several differences at once come first:
    every Dockerfile line after the first, and every attribute of one file.
    """
    if groups:
        yield from _group_simplifications(case, profile)
    for index, entry in enumerate(case.files):
        label = f"remove file {entry.path!r}"
        yield label, replace(case, files=_without_file(case.files, index, entry))
    if case.dockerignore is not None:
        yield "remove .dockerignore", replace(case, dockerignore=None)
        for index, pattern in enumerate(case.dockerignore):
            kept = case.dockerignore[:index] + case.dockerignore[index + 1 :]
            yield f"remove ignore line {pattern!r}", replace(case, dockerignore=kept)
    for index in range(1, len(case.dockerfile)):
        kept = case.dockerfile[:index] + case.dockerfile[index + 1 :]
        label = f"remove Dockerfile line {case.dockerfile[index]!r}"
        yield label, replace(case, dockerfile=kept)
    if case.dockerfile[0] != default.dockerfile[0]:
        first = default.dockerfile[:1] + case.dockerfile[1:]
        yield "reset the first Dockerfile line", replace(case, dockerfile=first)
    for name in ENGINE_OPTIONS + ("platform", "output", "build_args") + CASE_OPTIONS:
        if getattr(case, name) != getattr(default, name):
            yield f"reset {name}", replace(case, **{name: getattr(default, name)})
    for index, argument in enumerate(case.build_args):
        kept_args = case.build_args[:index] + case.build_args[index + 1 :]
        yield f"remove build arg {argument!r}", replace(case, build_args=kept_args)
    for index, (secret_id, _) in enumerate(case.build_secrets):
        kept_secrets = case.build_secrets[:index] + case.build_secrets[index + 1 :]
        label = f"remove build secret {secret_id!r}"
        yield label, replace(case, build_secrets=kept_secrets)
    for name in ("engine", "builder"):
        # The engine or the builder alone, where the profile has that pair.
        if getattr(case, name) == getattr(default, name):
            continue
        moved = replace(case, **{name: getattr(default, name)})
        pair = (moved.engine, moved.builder)
        target = next((t for t in targets if (t.engine, t.builder) == pair), None)
        if target is not None and fits(moved, target):
            yield f"reset {name}", moved
    for target in targets[:1]:
        if (case.engine, case.builder) != (target.engine, target.builder):
            moved = replace(case, engine=target.engine, builder=target.builder)
            if fits(moved, target):
                yield "move to the first target", moved
    for index, entry in enumerate(case.files):
        simple = default_file(profile, entry)
        for name in FILE_ATTRIBUTES:
            if getattr(entry, name) != getattr(simple, name):
                changed = replace(entry, **{name: getattr(simple, name)})
                label = f"reset {name} of {entry.path!r}"
                yield label, replace(case, files=_with_file(case.files, index, changed))


def _group_simplifications(case: Case, profile: Profile) -> Iterator[tuple[str, Case]]:
    if len(case.dockerfile) > 2:
        yield (
            "remove every Dockerfile line after the first",
            replace(case, dockerfile=case.dockerfile[:1]),
        )
    for index, entry in enumerate(case.files):
        simple = default_file(profile, entry)
        differences = sum(
            getattr(entry, name) != getattr(simple, name) for name in FILE_ATTRIBUTES
        )
        if differences > 1:
            label = f"reset every attribute of {entry.path!r}"
            yield label, replace(case, files=_with_file(case.files, index, simple))


def _without_file(
    files: tuple[ContextFile, ...], index: int, entry: ContextFile
) -> tuple[ContextFile, ...]:
    # Hardlinks to the removed file and entries below a removed directory go too.
    prefix = entry.path + "/"
    return tuple(
        other
        for position, other in enumerate(files)
        if position != index
        and not other.path.startswith(prefix)
        and not (other.kind is FileKind.HARDLINK and other.target == entry.path)
    )


def _with_file(
    files: tuple[ContextFile, ...], index: int, entry: ContextFile
) -> tuple[ContextFile, ...]:
    return files[:index] + (entry,) + files[index + 1 :]


def one_minimal(
    case: Case,
    reproduces: Reproduces,
    *,
    profile: Profile,
    targets: tuple[Target, ...],
    deadline: float,
) -> Minimization:
    """Apply single simplifications while the failure reproduces.

    A pass tries each step once and, after a step that reproduces, goes on
    with the next step of the smaller case instead of starting over. Passes
    repeat until one applies no step: then every step of the final case has
    been tried on that very case, and none reproduced, so it is 1-minimal.
    A case already tried is not built again.
    """
    default = default_case(profile, targets)
    builds = 0
    outcomes: dict[str, bool] = {}
    progress = True
    passes = 0
    while progress:
        progress = False
        passes += 1
        done: set[str] = set()
        while True:
            step = next(
                (
                    (label, candidate)
                    for label, candidate in simplifications(
                        case, default, profile, targets, groups=passes == 1
                    )
                    if label not in done
                ),
                None,
            )
            if step is None:
                break
            label, candidate = step
            done.add(label)
            key = candidate.to_json()
            if key not in outcomes:
                if time.monotonic() >= deadline:
                    return Minimization(case, builds, complete=False)
                builds += 1
                outcomes[key] = reproduces(candidate)
            if outcomes[key]:
                case = candidate
                progress = True
    return Minimization(case, builds, complete=True)


def explain(
    case: Case,
    reproduces: Reproduces,
    *,
    profile: Profile,
    targets: tuple[Target, ...],
    deadline: float,
    max_builds: int = 12,
) -> list[AxisReport]:
    """Try other values of the case's default axes and report which are free."""
    reports = []
    builds = 0
    for report, variants in _axis_variants(case, profile, targets):
        for label, variant in variants:
            if builds >= max_builds or time.monotonic() >= deadline:
                break
            builds += 1
            (report.failing if reproduces(variant) else report.passing).append(label)
        reports.append(report)
    return reports


def _axis_variants(
    case: Case, profile: Profile, targets: tuple[Target, ...]
) -> Iterator[tuple[AxisReport, list[tuple[str, Case]]]]:
    others = [
        t for t in targets if (t.engine, t.builder) != (case.engine, case.builder)
    ]
    builders = [t for t in others if t.engine == case.engine and fits(case, t)]
    engines = [t for t in others if t.builder == case.builder and fits(case, t)]
    yield (
        AxisReport("builder", case.builder),
        [(t.builder, replace(case, builder=t.builder)) for t in builders[:2]],
    )
    yield (
        AxisReport("engine", case.engine),
        [(t.engine, replace(case, engine=t.engine)) for t in engines[:2]],
    )

    target = next(
        (t for t in targets if (t.engine, t.builder) == (case.engine, case.builder)),
        None,
    )
    outputs = [
        o for o in profile.build.outputs
        if o != case.output and (target is None or o in target.outputs)
    ]  # fmt: skip
    yield (
        AxisReport("output", str(case.output)),
        [(str(o), replace(case, output=o)) for o in outputs[:2]],
    )

    # Only platforms that every base of the case has and, for RUN steps, that
    # this machine can run.
    possible = case_platforms(profile.build.platforms, case.dockerfile)
    platforms = [p for p in possible if p != case.platform]
    yield (
        AxisReport("platform", case.platform or "(default)"),
        [(p or "(default)", replace(case, platform=p)) for p in platforms[:2]],
    )
