"""Fuzz profiles: which axes vary and the pool of values each draws from.

A profile is a TOML file in ``strategies/``. The first value of every pool
is that axis' default, because Hypothesis shrinks a choice from a list
towards its first element; a shrunk case therefore differs from the
defaults only in the axes that the failure needs.
"""

import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from buildfuzz import secrets
from buildfuzz.base_formats import BASE_FORMATS
from buildfuzz.case import (
    ATTESTATIONS,
    BULK_DIR,
    CACHE_MODES,
    CHURN_MODES,
    CLIENT_USERS,
    COMPRESSIONS,
    CONTEXT_SOURCES,
    DEEP_DIR,
    OCI_MEDIATYPES,
    FileKind,
    Output,
)
from buildfuzz.errors import DataFileError
from buildfuzz.paths import strategies_dir

INSTRUCTION_KINDS = (
    "copy-all",
    "copy-root",
    "copy-file",
    "copy-dir",
    "add-file",
    "copy-chown-id",
    "copy-chown-name",
    "copy-chmod",
    "run",
    "workdir",
    "env",
    "arg",
    "user",
    "copy-from-stage",
    "run-heredoc",
    "copy-heredoc",
    "run-mount-cache",
    "run-mount-tmpfs",
    "run-mount-bind",
    "run-mount-secret",
    "copy-link",
    "copy-parents",
    "copy-exclude",
    "add-archive",
)
# "stage" is FROM the stage before. A first stage uses another base instead.
LOCAL_BASES = ("scratch", "busybox", "stage")
# The busybox-* formats are images on a loopback registry (see base_formats).
BASES = (*LOCAL_BASES, *(base.name for base in BASE_FORMATS))
TARGETS = ("", "first")  # "first": --target of the first stage
GIB = 1 << 30
# Prefix of a file name given as hex bytes, for names that are not UTF-8.
BYTES_PREFIX = "bytes:"
# ext4 fits a file's extended attributes into its inode and one 4 KiB block
# (unless the ea_inode feature is on), so stay well below 4 KiB.
MAX_XATTR_BYTES = 3072


@dataclass(frozen=True)
class ContextAxes:
    max_files: int = 4
    kinds: tuple[FileKind, ...] = (FileKind.FILE,)
    names: tuple[str, ...] = ("a",)
    sizes: tuple[int, ...] = (0,)
    modes: tuple[int, ...] = (0o644,)
    dir_modes: tuple[int, ...] = (0o755,)
    owners: tuple[int, ...] = (0,)
    mtimes_ns: tuple[int, ...] = (1_700_000_000_000_000_000,)
    symlink_targets: tuple[str, ...] = ("",)
    dockerignore: tuple[str, ...] = ()
    # Whether <Dockerfile>.dockerignore exists, with patterns from dockerignore.
    dockerfile_dockerignore: tuple[bool, ...] = (False,)
    sparse_sizes: tuple[int, ...] = (8 * GIB,)
    devices: tuple[tuple[int, int], ...] = ((1, 3),)  # (major, minor)
    xattrs: tuple[tuple[tuple[str, str], ...], ...] = ((),)
    # Length in bytes of one extra file's path under deep/, or 0 for no such file.
    path_lengths: tuple[int, ...] = (0,)
    bulk_files: tuple[int, ...] = (0,)  # files of the bulk recipe, 0 for no bulk/
    bulk_sizes: tuple[tuple[int, ...], ...] = ((0,),)
    bulk_depths: tuple[int, ...] = (2,)


@dataclass(frozen=True)
class EngineAxes:
    storage_drivers: tuple[str, ...] = ("",)
    containerd_store: tuple[bool, ...] = (False,)
    data_root_mib: tuple[int, ...] = (0,)
    memory_mib: tuple[int, ...] = (0,)


@dataclass(frozen=True)
class DockerfileAxes:
    bases: tuple[str, ...] = ("scratch",)
    instructions: tuple[str, ...] = ("copy-all",)
    max_instructions: int = 3  # per stage
    stages: tuple[int, ...] = (1,)
    layers: tuple[int, ...] = (0,)  # extra COPY layers at the end of the last stage
    paths: tuple[str, ...] = ("Dockerfile",)  # where the Dockerfile is in the context
    # FROM --platform= values: "" (no flag), "$BUILDPLATFORM", "$TARGETPLATFORM".
    from_platforms: tuple[str, ...] = ("",)


@dataclass(frozen=True)
class BuildAxes:
    platforms: tuple[str, ...] = ("",)
    outputs: tuple[Output, ...] = (Output.LOAD,)
    build_args: tuple[tuple[str, str], ...] = ()
    targets: tuple[str, ...] = ("",)
    no_cache: tuple[bool, ...] = (False,)
    tags: tuple[tuple[str, ...], ...] = ((),)  # extra tags of a loaded image
    caches: tuple[str, ...] = ("",)  # see CACHE_MODES
    attestations: tuple[str, ...] = ("",)  # see ATTESTATIONS
    # Sets of build secrets (--secret), each secret an id and "env" or "file".
    secrets: tuple[tuple[tuple[str, str], ...], ...] = ((),)
    # Options of the "push" output: see COMPRESSIONS and OCI_MEDIATYPES.
    compressions: tuple[str, ...] = ("",)
    force_compression: tuple[bool, ...] = (False,)
    oci_mediatypes: tuple[str, ...] = ("",)
    context_from: tuple[str, ...] = ("",)  # see CONTEXT_SOURCES
    client_users: tuple[str, ...] = ("",)  # see CLIENT_USERS
    churn: tuple[str, ...] = ("",)  # see CHURN_MODES


@dataclass(frozen=True)
class SequenceSettings:
    """How much of a run goes to build sequences (``buildfuzz.sequences``)."""

    share: float = 0.0  # fraction of the run's budget; 0 turns sequences off
    max_steps: int = 8  # rule calls per sequence, its first (start) step included


@dataclass(frozen=True)
class Profile:
    name: str
    path: Path
    description: str
    rules: str
    engines: tuple[str, ...]
    builders: tuple[str, ...]
    engine: EngineAxes
    context: ContextAxes
    dockerfile: DockerfileAxes
    build: BuildAxes
    sequences: SequenceSettings = SequenceSettings()


def resolve_profile_path(name: str) -> Path:
    """Return the file of a profile given by name or by path."""
    if name.endswith(".toml") or "/" in name:
        return Path(name)
    return strategies_dir() / f"{name}.toml"


def available_profiles() -> list[str]:
    return sorted(path.stem for path in strategies_dir().glob("*.toml"))


def load_profile(name: str) -> Profile:
    """Load and validate a profile by name (``default``) or path."""
    path = resolve_profile_path(name)
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except FileNotFoundError:
        known = ", ".join(available_profiles()) or "none"
        raise DataFileError(
            path, f"profile {name!r} not found; available profiles: {known}"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise DataFileError(path, f"invalid TOML: {error}") from None
    except UnicodeDecodeError:
        raise DataFileError(path, "not a text file; a profile is UTF-8 TOML") from None
    except OSError as error:
        raise DataFileError(
            path, f"cannot read profile: {error.strerror}; give a profile file"
        ) from None

    try:
        return _profile_from_dict(path, data)
    except (TypeError, ValueError) as error:
        raise DataFileError(path, str(error)) from None


def _rules_name(profile: Path, rules: str) -> str:
    """Return a rule set's name, or its file's path relative to the profile's."""
    if rules.endswith(".toml") and not Path(rules).is_absolute():
        return str(profile.parent / rules)
    return rules


def _profile_from_dict(path: Path, data: dict[str, Any]) -> Profile:
    allowed = {"description", "rules", "engines", "builders", "context", "engine"}
    allowed |= {"dockerfile", "build", "sequences"}
    _reject_unknown(data, allowed, "top level")

    engine = _section(data, "engine", EngineAxes)
    context = _section(data, "context", ContextAxes)
    dockerfile = _section(data, "dockerfile", DockerfileAxes)
    build = _section(data, "build", BuildAxes)
    engines = _string_tuple(data.get("engines", ["26.1"]), "engines")
    builders = _string_tuple(data.get("builders", ["buildx-docker"]), "builders")
    if not engines or not builders:
        raise ValueError("engines and builders need at least one value each")

    return Profile(
        name=path.stem,
        path=path,
        description=str(data.get("description", "")),
        rules=_rules_name(path, str(data.get("rules", "expected"))),
        engines=engines,
        builders=builders,
        engine=engine,
        context=context,
        dockerfile=dockerfile,
        build=build,
        sequences=_sequence_settings(data.get("sequences", {})),
    )


MAX_SEQUENCE_STEPS = 50  # each build step builds twice, so longer ones take minutes


def _sequence_settings(section: Any) -> SequenceSettings:
    if not isinstance(section, dict):
        raise TypeError("[sequences] must be a table")
    _reject_unknown(section, {"share", "max_steps"}, "[sequences]")
    share = section.get("share", SequenceSettings.share)
    if (
        isinstance(share, bool)
        or not isinstance(share, int | float)
        or not 0 <= share <= 1
    ):
        raise ValueError(
            f"sequences.share: {share!r} is not a fraction of the budget; "
            "use a number from 0 (no sequences) to 1"
        )
    steps = section.get("max_steps", SequenceSettings.max_steps)
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"sequences.max_steps: {steps!r} is not an integer")
    if not 2 <= steps <= MAX_SEQUENCE_STEPS:
        raise ValueError(
            f"sequences.max_steps: {steps} is out of range; use 2 (a start and "
            f"one build) to {MAX_SEQUENCE_STEPS}"
        )
    return SequenceSettings(share=float(share), max_steps=steps)


def _section(data: dict[str, Any], name: str, axes_type: type) -> Any:
    section = data.get(name, {})
    if not isinstance(section, dict):
        raise TypeError(f"[{name}] must be a table")
    names = {item.name for item in fields(axes_type)}
    _reject_unknown(section, names, f"[{name}]")

    values: dict[str, Any] = {}
    for key, raw in section.items():
        values[key] = _convert(f"{name}.{key}", key, raw)

    return axes_type(**values)


def _convert(label: str, key: str, raw: Any) -> Any:
    if key.startswith("max_"):
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
            raise ValueError(f"{label} must be a whole number >= 0, not {raw!r}")
        return raw
    if not isinstance(raw, list) or not raw and key != "dockerignore":
        raise ValueError(f"{label} must be a non-empty list")

    if key == "kinds":
        return tuple(_enum(FileKind, value, label) for value in raw)
    if key == "outputs":
        return tuple(_enum(Output, value, label) for value in raw)
    if key == "build_args":
        pairs = []
        for pair in raw:
            if not (isinstance(pair, list) and len(pair) == 2):
                raise ValueError(f"{label} entries must be [name, value] pairs")
            pairs.append((str(pair[0]), str(pair[1])))
            secrets.check_argument(*pairs[-1])
        return tuple(pairs)
    if key in ("containerd_store", "dockerfile_dockerignore", "no_cache") or (
        key == "force_compression"
    ):
        if not all(isinstance(value, bool) for value in raw):
            raise ValueError(f"{label} must be a list of true and false")
        return tuple(raw)
    if key in ("data_root_mib", "memory_mib"):
        values = tuple(_integer(value, label) for value in raw)
        if any(value < 0 or 0 < value < 64 for value in values):
            raise ValueError(f"{label}: use 0 (no limit) or at least 64 MiB")
        return values
    if key == "mtimes_ns":
        return tuple(_integer(value, label) for value in raw)
    if key == "platforms":
        return tuple(_platform(value, label) for value in raw)
    if key in RANGES:
        return tuple(_bounded(value, label, *RANGES[key]) for value in raw)
    if key == "path_lengths":
        return tuple(_path_length(value, label) for value in raw)
    if key == "bulk_sizes":
        return tuple(_size_list(value, label) for value in raw)
    if key == "devices":
        return tuple(_device(value, label) for value in raw)
    if key == "xattrs":
        return tuple(_xattr_set(value, label) for value in raw)
    if key == "secrets":
        return tuple(_secret_set(value, label) for value in raw)
    if key == "names":
        return tuple(_file_name(value, label) for value in raw)
    if key == "paths":
        return tuple(_dockerfile_path(value, label) for value in raw)
    if key == "tags":
        return tuple(_string_tuple(value, label) for value in raw)
    if key in CHOICES:
        return tuple(_choice(value, CHOICES[key], label) for value in raw)
    if key == "oci_mediatypes":
        # TOML true and false mean the option's values "true" and "false".
        words = [str(v).lower() if isinstance(v, bool) else v for v in raw]
        return tuple(_choice(value, OCI_MEDIATYPES, label) for value in words)

    return _string_tuple(raw, label)


FROM_PLATFORMS = ("", "$BUILDPLATFORM", "$TARGETPLATFORM")

# Pools whose values are names from a fixed list.
CHOICES: dict[str, tuple[str, ...]] = {
    "bases": BASES,
    "instructions": INSTRUCTION_KINDS,
    "targets": TARGETS,
    "caches": CACHE_MODES,
    "attestations": ATTESTATIONS,
    "context_from": CONTEXT_SOURCES,
    "client_users": CLIENT_USERS,
    "churn": CHURN_MODES,
    "compressions": COMPRESSIONS,
    "from_platforms": FROM_PLATFORMS,
}

# Inclusive bounds of integer pools. Values beyond them only make builds slow.
RANGES = {
    "sizes": (0, 1 << 40),
    "modes": (0, 0o7777),
    "dir_modes": (0, 0o7777),
    "owners": (0, 2**32 - 2),  # 2^32-1 is "no id" to the kernel
    "sparse_sizes": (0, 1 << 40),
    "bulk_files": (0, 100_000),
    "bulk_depths": (0, 8),
    "stages": (1, 8),
    "layers": (0, 1000),
}


# Platforms of Docker images for Linux, as docker build --platform names them.
PLATFORMS = (
    "linux/amd64", "linux/386", "linux/arm64", "linux/arm/v5", "linux/arm/v6",
    "linux/arm/v7", "linux/riscv64", "linux/s390x", "linux/ppc64le",
    "linux/mips64le", "linux/loong64",
)  # fmt: skip


def _platform(value: Any, label: str) -> str:
    """Check a platform, or a comma-separated list of them (a multi-platform build)."""
    parts = value.split(",") if isinstance(value, str) and value else [value]
    if value != "" and any(part not in PLATFORMS for part in parts):
        raise ValueError(
            f'{label}: unknown platform {value!r}; use "" (the engine\'s own), '
            f"one of {', '.join(PLATFORMS)}, or several of them joined by commas"
        )
    if len(set(parts)) != len(parts):
        raise ValueError(f"{label}: platform {value!r} lists a platform twice")
    return str(value)


def _bounded(value: Any, label: str, low: int, high: int) -> int:
    number = _integer(value, label)
    if not low <= number <= high:
        raise ValueError(f"{label}: {number} is out of range; use {low} to {high}")
    return number


def _path_length(value: Any, label: str) -> int:
    length = _integer(value, label)
    if length != 0 and not 8 <= length <= 65536:
        raise ValueError(f"{label}: use 0 (no long path) or 8 to 65536 bytes")
    return length


def _size_list(value: Any, label: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{label} entries must be non-empty lists of sizes")
    return tuple(_bounded(size, label, 0, 1 << 30) for size in value)


def _device(value: Any, label: str) -> tuple[int, int]:
    major, _, minor = str(value).partition(":")
    if not (major.isdigit() and minor.isdigit()):
        raise ValueError(f"{label}: {value!r} is not a device number MAJOR:MINOR")
    if int(major) >= 1 << 12 or int(minor) >= 1 << 20:
        raise ValueError(f"{label}: {value!r} is out of range (major < 4096)")
    return int(major), int(minor)


def _xattr_set(value: Any, label: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise ValueError(f"{label} entries must be tables of names and values")
    pairs = []
    for name, text in value.items():
        # Only the user namespace: security.* and trusted.* would change how
        # the host treats the file, and user.* is what unprivileged tools set.
        if not name.startswith("user.") or name == "user." or "\x00" in name:
            raise ValueError(f"{label}: {name!r} is not a user.* attribute name")
        if not isinstance(text, str):
            raise ValueError(f"{label}: the value of {name!r} must be a string")
        pairs.append((name, text))
    size = sum(len(n.encode()) + len(t.encode()) for n, t in pairs)
    if size > MAX_XATTR_BYTES:
        raise ValueError(f"{label}: names and values exceed {MAX_XATTR_BYTES} bytes")
    return tuple(pairs)


def _secret_set(value: Any, label: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        example = '{ token = "env" }'
        raise ValueError(
            f"{label} entries must be tables of ids and sources, such as {example}"
        )
    pairs = []
    for secret_id, source in value.items():
        try:
            secrets.check_build_secret(secret_id, source)
        except ValueError as error:
            raise ValueError(f"{label}: {error}") from None
        pairs.append((secret_id, source))
    return tuple(sorted(pairs))  # the order a case's JSON keeps


def _dockerfile_path(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{label} must be a list of strings")
    for part in value.split("/"):
        _file_name(part, label)
    if value.split("/")[0] in (".dockerignore", BULK_DIR, DEEP_DIR):
        raise ValueError(f"{label}: {value!r} clashes with a generated file")
    # repro.sh passes the path inside double quotes.
    if any(char in value for char in '"$`\\') or not value.isprintable():
        raise ValueError(f"{label}: {value!r} needs quoting; use a plainer path")
    return value


def _enum(enum_type: Any, value: Any, label: str) -> Any:
    try:
        return enum_type(value)
    except ValueError:
        choices = ", ".join(member.value for member in enum_type)
        raise ValueError(
            f"{label}: unknown value {value!r}; use one of {choices}"
        ) from None


def _choice(value: Any, choices: tuple[str, ...], label: str) -> str:
    if value not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"{label}: unknown value {value!r}; use one of {listed}")
    return str(value)


def _file_name(value: Any, label: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{label} must be a list of strings")
    if value.startswith(BYTES_PREFIX):
        try:
            raw = bytes.fromhex(value.removeprefix(BYTES_PREFIX))
        except ValueError:
            raise ValueError(f"{label}: {value!r} is not valid hex") from None
        # Surrogate escapes, as os.fsdecode gives, keep the raw bytes.
        value = os.fsdecode(raw)
    if value in ("", ".", "..") or "/" in value:
        raise ValueError(
            f"{label}: {value!r} is not a usable file name; "
            "use a non-empty name without '/' other than '.' and '..'"
        )
    if "\x00" in value:
        raise ValueError(f"{label}: {value!r} contains a NUL byte")
    return value


def _integer(value: Any, label: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{label}: {value!r} is not an integer")
    return value


def _string_tuple(values: Any, label: str) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{label} must be a list of strings")
    return tuple(values)


def _reject_unknown(section: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ValueError(
            f"unknown key {unknown[0]!r} in {where}; "
            f"known keys: {', '.join(sorted(allowed))}"
        )
