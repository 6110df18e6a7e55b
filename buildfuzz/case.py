"""The case model: everything that decides one build, as a plain value.

A case round-trips through JSON unchanged. Paths are ``str`` and may hold
bytes that are not UTF-8 as surrogate escapes (``os.fsdecode``), which JSON
stores as ``\\udcXX`` escapes.
"""

import hashlib
import json
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any

from buildfuzz.errors import DataFileError

CASE_SCHEMA = 1


class FileKind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    FIFO = "fifo"


class Output(StrEnum):
    """Where the built image goes."""

    LOAD = "load"  # into the engine's image store (the classic builder's only output)
    TAR = "tar"  # type=tar, the root filesystem as a tar file
    LOCAL = "local"  # type=local, the root filesystem as a directory
    DOCKER_TAR = "docker-tar"  # type=docker to a file, then `docker load`


@dataclass(frozen=True)
class ContextFile:
    """One entry of the build context, relative to the context root."""

    path: str
    kind: FileKind = FileKind.FILE
    size: int = 0
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 1_700_000_000_000_000_000
    seed: int = 0
    target: str = ""  # symlink target, or the context path a hardlink points at


@dataclass(frozen=True)
class Case:
    """One build: its context, Dockerfile, builder and options."""

    files: tuple[ContextFile, ...] = ()
    dockerignore: tuple[str, ...] | None = None
    dockerfile: tuple[str, ...] = ("FROM scratch",)
    engine: str = "26.1"
    storage_driver: str = ""  # "" is the engine definition's own driver
    containerd_store: bool = False
    data_root_mib: int = 0  # size of a private data-root file system; 0: no limit
    memory_mib: int = 0  # memory limit of the daemon's cgroup; 0: no limit
    builder: str = "buildx-docker"
    platform: str = ""
    build_args: tuple[tuple[str, str], ...] = ()
    output: Output = Output.LOAD
    schema: int = CASE_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["build_args"] = dict(self.build_args)
        data["dockerignore"] = (
            None if self.dockerignore is None else list(self.dockerignore)
        )
        data["dockerfile"] = list(self.dockerfile)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def with_changes(self, **changes: Any) -> "Case":
        return replace(self, **changes)

    @property
    def id(self) -> str:
        """A short content hash that names the case in logs."""
        return hashlib.sha256(
            self.to_json().encode("utf-8", "surrogatepass")
        ).hexdigest()[:10]

    @property
    def engine_label(self) -> str:
        """The engine and its non-default options, such as ``26.1+vfs``."""
        options = [self.storage_driver]
        options.append("containerd" if self.containerd_store else "")
        options.append(f"disk{self.data_root_mib}m" if self.data_root_mib else "")
        options.append(f"mem{self.memory_mib}m" if self.memory_mib else "")
        return "+".join([self.engine, *[o for o in options if o]])

    @property
    def dockerfile_text(self) -> str:
        return "\n".join(self.dockerfile) + "\n"


def case_from_dict(data: Any, *, source: Path | str = "<case>") -> Case:
    """Build a case from parsed JSON, rejecting anything malformed."""
    if not isinstance(data, dict):
        raise DataFileError(source, "a case must be a JSON object")

    schema = data.get("schema")
    if schema != CASE_SCHEMA:
        raise DataFileError(
            source,
            f"case schema {schema!r} is not supported (this buildfuzz reads "
            f"schema {CASE_SCHEMA}); replay it with the buildfuzz that wrote it",
        )

    known = set(Case.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise DataFileError(source, f"unknown case fields: {', '.join(unknown)}")

    try:
        files = tuple(_file_from_dict(item, source) for item in data.get("files", []))
        dockerignore = data.get("dockerignore")
        build_args = data.get("build_args", {})
        if not isinstance(build_args, dict):
            raise TypeError("build_args must be an object")
        case = Case(
            files=files,
            dockerignore=None
            if dockerignore is None
            else tuple(_strings(dockerignore, "dockerignore")),
            dockerfile=tuple(_strings(data.get("dockerfile", []), "dockerfile")),
            engine=_string(data.get("engine", Case.engine), "engine"),
            storage_driver=_string(data.get("storage_driver", ""), "storage_driver"),
            containerd_store=_boolean(
                data.get("containerd_store", False), "containerd_store"
            ),
            data_root_mib=_integer(data.get("data_root_mib", 0), "data_root_mib"),
            memory_mib=_integer(data.get("memory_mib", 0), "memory_mib"),
            builder=_string(data.get("builder", Case.builder), "builder"),
            platform=_string(data.get("platform", ""), "platform"),
            build_args=tuple(
                (_string(k, "build_args"), _string(v, "build_args"))
                for k, v in build_args.items()
            ),
            output=Output(data.get("output", Output.LOAD)),
        )
    except (TypeError, ValueError) as error:
        raise DataFileError(source, f"invalid case: {error}") from None

    return case


def _file_from_dict(item: Any, source: Path | str) -> ContextFile:
    if not isinstance(item, dict):
        raise TypeError("each entry of files must be an object")
    unknown = sorted(set(item) - set(ContextFile.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown file fields: {', '.join(unknown)}")

    entry = ContextFile(
        path=_string(item.get("path"), "files.path"),
        kind=FileKind(item.get("kind", FileKind.FILE)),
        size=_integer(item.get("size", 0), "files.size"),
        mode=_integer(item.get("mode", 0o644), "files.mode"),
        uid=_integer(item.get("uid", 0), "files.uid"),
        gid=_integer(item.get("gid", 0), "files.gid"),
        mtime_ns=_integer(item.get("mtime_ns", ContextFile.mtime_ns), "files.mtime_ns"),
        seed=_integer(item.get("seed", 0), "files.seed"),
        target=_string(item.get("target", ""), "files.target"),
    )
    check_context_path(entry.path)
    if entry.kind is FileKind.HARDLINK:
        check_context_path(entry.target)

    return entry


def check_context_path(path: str) -> None:
    """Raise ValueError unless ``path`` is a relative path inside the context."""
    pure = PurePosixPath(path)
    if not pure.parts or pure.is_absolute() or ".." in pure.parts or "\x00" in path:
        raise ValueError(f"file path {path!r} must be relative and stay inside")


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {value!r}")
    return value


def _integer(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, not {value!r}")
    return value


def _boolean(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false, not {value!r}")
    return value


def _strings(values: Any, name: str) -> list[str]:
    if not isinstance(values, list):
        raise TypeError(f"{name} must be a list of strings")
    return [_string(value, name) for value in values]


def load_case(path: Path) -> Case:
    """Read a case from ``path``: a ``case.json`` or a finding directory."""
    if path.is_dir():
        path = path / "case.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataFileError(
            path, "case file not found; give a finding directory or a case.json"
        ) from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataFileError(path, f"cannot read case file: {error}") from None

    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataFileError(
            path, f"case file is not valid JSON (line {error.lineno}): {error.msg}"
        ) from None

    return case_from_dict(data, source=path)


__all__ = [
    "CASE_SCHEMA",
    "Case",
    "ContextFile",
    "FileKind",
    "Output",
    "case_from_dict",
    "check_context_path",
    "load_case",
]
