"""The ``buildfuzz strategies`` command: a profile's axes, pools and hit counts.

Registered on the app in ``buildfuzz.cli``. Hit counts come from the case
lines in ``<results>/runs/*.jsonl``: ``runlog.axis_values`` records each
axis under a name of its own, and ``AXES`` below maps every profile axis
to that name and to the way a pool value is written there.
"""

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from buildfuzz.errors import BuildfuzzError
from buildfuzz.profile import Profile, load_profile
from buildfuzz.runlog import value_label

GENERATED = "(generated)"  # the label of "" in symlink_targets


@dataclass(frozen=True)
class Axis:
    """One axis of a profile: where its pool is and how run logs record it."""

    section: str  # "" for the top level
    key: str
    recorded: str  # the axis name in a case line's "axes", "" when not recorded
    label: Callable[[Any], str] = value_label


def _octal(mode: int) -> str:
    return f"{mode:04o}"


def _platform(value: str) -> str:
    return value or "(default)"


def _device(device: tuple[int, int]) -> str:
    return f"{device[0]}:{device[1]}"


def _build_arg(pair: tuple[str, str]) -> str:
    return f"{pair[0]}={pair[1]}"


def _secret_set(pairs: tuple[tuple[str, str], ...]) -> str:
    return ",".join(f"{secret_id}={source}" for secret_id, source in pairs) or "(none)"


def _from_platform(platform: str) -> str:
    return platform or "(none)"


def _client_user(user: str) -> str:
    return user or "root"


def _symlink_target(target: str) -> str:
    return target or GENERATED


AXES = (
    Axis("", "engines", "engine"),
    Axis("", "builders", "builder"),
    Axis("engine", "storage_drivers", "storage driver", _platform),
    Axis("engine", "containerd_store", "containerd store"),
    Axis("engine", "data_root_mib", "data root MiB"),
    Axis("engine", "memory_mib", "memory MiB"),
    Axis("context", "max_files", "file count"),
    Axis("context", "kinds", "file kind"),
    Axis("context", "names", "file name"),
    Axis("context", "sizes", "file size"),
    Axis("context", "sparse_sizes", "sparse size"),
    Axis("context", "modes", "file mode", _octal),
    Axis("context", "dir_modes", "dir mode", _octal),
    Axis("context", "owners", "file owner"),
    Axis("context", "mtimes_ns", "file mtime_ns"),
    Axis("context", "symlink_targets", "symlink target", _symlink_target),
    Axis("context", "devices", "device", _device),
    Axis("context", "xattrs", "xattrs"),
    Axis("context", "path_lengths", "path length"),
    Axis("context", "dockerignore", "dockerignore pattern"),
    Axis("context", "dockerfile_dockerignore", "dockerfile dockerignore"),
    Axis("context", "bulk_files", "bulk files"),
    Axis("context", "bulk_sizes", "bulk sizes"),
    Axis("context", "bulk_depths", "bulk depth"),
    Axis("dockerfile", "bases", "base name"),
    Axis("dockerfile", "instructions", "instruction kind"),
    Axis("dockerfile", "max_instructions", ""),
    Axis("dockerfile", "stages", "stages"),
    Axis("dockerfile", "layers", "layers"),
    Axis("dockerfile", "paths", "dockerfile path"),
    Axis("dockerfile", "from_platforms", "from platform", _from_platform),
    Axis("build", "platforms", "platform", _platform),
    Axis("build", "outputs", "output"),
    Axis("build", "build_args", "build arg", _build_arg),
    Axis("build", "targets", "target"),
    Axis("build", "no_cache", "no cache"),
    Axis("build", "tags", "extra tags"),
    Axis("build", "caches", "cache"),
    Axis("build", "attestations", "attestations"),
    Axis("build", "secrets", "build secrets", _secret_set),
    Axis("build", "compressions", "compression"),
    Axis("build", "force_compression", "force compression"),
    Axis("build", "oci_mediatypes", "oci mediatypes"),
    Axis("build", "context_from", "context source"),
    Axis("build", "client_users", "client user", _client_user),
    Axis("build", "churn", "context churn"),
)


def pool(profile: Profile, axis: Axis) -> tuple[Any, ...]:
    """Return the axis' pool, where a ``max_`` axis gives each count up to its max."""
    owner = getattr(profile, axis.section) if axis.section else profile
    value = getattr(owner, axis.key)
    if axis.key.startswith("max_"):
        low = 1 if axis.key == "max_instructions" else 0
        return tuple(range(low, value + 1))
    return tuple(value)


def hit_counts(profile: Profile, axis: Axis, counts: Counter[str]) -> list[int]:
    """Return how many cases took each pool value of ``axis``.

    The symlink target "" means a target made from another entry's path, so
    it counts every recorded target that is not another value of the pool.
    """
    labels = [axis.label(value) for value in pool(profile, axis)]
    hits = [counts.get(label, 0) for label in labels]
    if axis.label is _symlink_target and GENERATED in labels:
        others = sum(n for value, n in counts.items() if value not in labels)
        hits[labels.index(GENERATED)] = others
    return hits


def display(text: str) -> str:
    """Return ``text`` printable on one line: raw bytes and controls escaped."""
    raw = text.encode("utf-8", "surrogateescape")
    shown = raw.decode("utf-8", "backslashreplace")
    shown = "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode()
        for char in shown
    )
    return f'"{shown}"' if shown != shown.strip() else shown


def render(profile: Profile, counts: dict[str, Counter[str]] | None) -> list[str]:
    """Return the lines that list every axis, its pool and, given counts, hits."""
    lines = [
        f"profile {profile.name}: {profile.description}",
        f"  file {profile.path}, rules {profile.rules!r}",
        "  the first value of each pool is the axis' default"
        + (": hit counts are of fuzz cases" if counts is not None else ""),
    ]
    for axis in AXES:
        name = f"{axis.section}.{axis.key}" if axis.section else axis.key
        notes = [f"recorded as {axis.recorded!r}"] if axis.recorded else []
        if axis.key.startswith("max_"):
            notes.insert(0, "a range, not a pool")
        lines.append("")
        lines.append(f"{name} ({', '.join(notes)})" if notes else name)
        values = [display(axis.label(value)) for value in pool(profile, axis)]
        width = max(len(value) for value in values) if values else 0
        if counts is None or not axis.recorded:
            lines += [f"  {value}" for value in values]
            continue
        hits = hit_counts(profile, axis, counts.get(axis.recorded, Counter()))
        for value, hit in zip(values, hits, strict=True):
            lines.append(f"  {value:<{width}}  {hit}")
    sequences = profile.sequences
    lines.append("")
    if sequences.share:
        lines.append(
            f"sequences: {sequences.share:g} of the budget, at most "
            f"{sequences.max_steps} steps each"
        )
    else:
        lines.append("sequences: off")
    return lines


def _fail(error: BuildfuzzError) -> NoReturn:
    # The same one-line message and exit code as buildfuzz.cli._fail, which
    # this module cannot import because buildfuzz.cli imports this module.
    typer.echo(f"buildfuzz: error: {error}", err=True)
    raise typer.Exit(error.exit_code)


def strategies(
    profile: Annotated[
        str, typer.Option(help="Profile name in strategies/, or a path to a .toml.")
    ] = "default",
    results: Annotated[
        Path | None,
        typer.Option(help="Results directory whose run logs give the hit counts."),
    ] = None,
) -> None:
    """List a profile's axes and value pools, with hit counts from --results."""
    from buildfuzz.report_data import check_results, count_axis_values, load_runs
    from buildfuzz.runlog import RUNS_DIR

    try:
        loaded = load_profile(profile)
        counts = None
        if results is not None:
            check_results(results)
            runs, _ = load_runs(results / RUNS_DIR)
            counts = count_axis_values(runs)
    except BuildfuzzError as error:
        _fail(error)
    typer.echo("\n".join(render(loaded, counts)))
