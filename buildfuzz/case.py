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

import structlog

from buildfuzz import secrets
from buildfuzz.errors import DataFileError

log = structlog.get_logger(__name__)

CASE_SCHEMA = 1
DOCKERFILE = "Dockerfile"
# Top-level directories of the context that generated entries own: the bulk
# recipe's files, and the file whose path is made long on purpose.
BULK_DIR = "bulk"
DEEP_DIR = "deep"


class FileKind(StrEnum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    HARDLINK = "hardlink"
    FIFO = "fifo"
    SPARSE = "sparse"  # ``size`` bytes of holes: a file that takes no disk space
    CHAR_DEVICE = "char-device"
    BLOCK_DEVICE = "block-device"
    SOCKET = "socket"  # a unix socket node left behind by a closed listener
    ARCHIVE = "archive"  # a compressed tar, which ADD extracts (see context.py)


class Output(StrEnum):
    """Where the built image goes."""

    LOAD = "load"  # into the engine's image store (the classic builder's only output)
    TAR = "tar"  # type=tar, the root filesystem as a tar file
    LOCAL = "local"  # type=local, the root filesystem as a directory
    DOCKER_TAR = "docker-tar"  # type=docker to a file, then `docker load`
    OCI = "oci"  # type=oci, an OCI image layout as a tar file
    # type=image,push=true to the run's loopback registry, with the case's
    # compression, force_compression and oci_mediatypes.
    PUSH = "push"


# Build cache export and import (--cache-to, --cache-from): "inline" puts
# cache metadata into the image; "local" exports to a directory beside the
# context and imports from it.
CACHE_MODES = ("", "inline", "local")
# Attestations: "provenance-MODE" gives --provenance=mode=MODE, "sbom" an SBOM
# made by the scanner image that buildfuzz builds (buildfuzz/sbom_scanner.py),
# and "sbom-provenance-max" both. The classic builder rejects the flags.
ATTESTATIONS = ("", "provenance-min", "provenance-max", "sbom", "sbom-provenance-max")
# Layer compression of a pushed image; "" leaves the exporter's default (gzip).
COMPRESSIONS = ("", "gzip", "zstd", "estargz", "uncompressed")
# The oci-mediatypes option of a pushed image; "" leaves the option out.
OCI_MEDIATYPES = ("", "true", "false")
# Sources of the build context. "" names the context directory. "stdin-tar"
# sends it as a tar on stdin (context "-", --file inside the tar), and
# "stdin-dockerfile" sends the Dockerfile on stdin (--file -).
CONTEXT_SOURCES = ("", "stdin-tar", "stdin-dockerfile")
# The user that runs the docker client: "" is root, as buildfuzz itself, and
# "buildfuzz" the unprivileged user that ./dev.sh creates (client_user.py).
CLIENT_USERS = ("", "buildfuzz")
# Changes to a context file while the client sends the context: "append"
# grows it, and "rewrite" empties and refills it (see buildfuzz/churn.py).
CHURN_MODES = ("", "append", "rewrite")


@dataclass(frozen=True)
class FromLine:
    """The parts of a ``FROM [--platform=P] IMAGE [AS NAME]`` line."""

    image: str
    platform: str = ""  # the value of --platform, such as $BUILDPLATFORM
    alias: str = ""


def split_from(line: str) -> FromLine | None:
    """Return the parts of a FROM line, or None for another form."""
    words = line.split()
    if not words or words[0].upper() != "FROM":
        return None
    words = words[1:]
    platform = ""
    if words and words[0].startswith("--platform="):
        platform = words.pop(0).removeprefix("--platform=")
    if len(words) == 1:
        return FromLine(words[0], platform)
    if len(words) == 3 and words[1].upper() == "AS":
        return FromLine(words[0], platform, words[2])
    return None


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
    major: int = 0  # device number of a char-device or block-device
    minor: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()  # extended attributes, name and value


@dataclass(frozen=True)
class BulkRecipe:
    """Many regular files under ``bulk/``, described by a few numbers.

    ``bulk.bulk_files`` expands the recipe, and ``repro`` writes the same
    expansion as a shell loop; a case stores the recipe, never the files.
    """

    count: int
    sizes: tuple[int, ...] = (0,)  # each file's size is one of these
    depth: int = 2  # directory levels between bulk/ and each file
    seed: int = 0


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
    # Fields below were added after schema 1 was first written; to_dict()
    # leaves out those at their default, so older cases keep their JSON and id.
    bulk: BulkRecipe | None = None
    dockerfile_name: str = DOCKERFILE  # path of the Dockerfile in the context
    # Patterns of <dockerfile_name>.dockerignore, which BuildKit reads in place
    # of .dockerignore, or None for no such file.
    dockerfile_dockerignore: tuple[str, ...] | None = None
    target: str = ""  # the stage that --target builds; "" builds the last one
    no_cache: bool = False
    tags: tuple[str, ...] = ()  # tags given in addition to the case's own
    cache: str = ""  # one of CACHE_MODES
    attest: str = ""  # one of ATTESTATIONS
    # Build secrets (--secret), sorted by id: each an id and its source, "env"
    # or "file" (secrets.SECRET_SOURCES). No value is in the case (secrets.py).
    build_secrets: tuple[tuple[str, str], ...] = ()
    # Options of the pushed image (Output.PUSH only): compression=,
    # force-compression=true and oci-mediatypes=.
    compression: str = ""  # one of COMPRESSIONS
    force_compression: bool = False
    oci_mediatypes: str = ""  # one of OCI_MEDIATYPES
    context_from: str = ""  # one of CONTEXT_SOURCES
    client_user: str = ""  # one of CLIENT_USERS
    churn: str = ""  # one of CHURN_MODES
    schema: int = CASE_SCHEMA

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["build_args"] = dict(self.build_args)
        data["dockerignore"] = (
            None if self.dockerignore is None else list(self.dockerignore)
        )
        data["dockerfile"] = list(self.dockerfile)
        data["files"] = [_file_to_dict(entry) for entry in self.files]
        for name in OPTIONAL_FIELDS:
            if getattr(self, name) == getattr(Case, name):
                del data[name]
        if self.dockerfile_dockerignore is not None:
            data["dockerfile_dockerignore"] = list(self.dockerfile_dockerignore)
        if self.tags:
            data["tags"] = list(self.tags)
        if self.build_secrets:
            data["build_secrets"] = dict(self.build_secrets)
        if self.bulk is not None:
            data["bulk"]["sizes"] = list(self.bulk.sizes)
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

    @property
    def dockerfile_option(self) -> str | None:
        """Return the ``--file`` path in the context, or None for the default."""
        return None if self.dockerfile_name == DOCKERFILE else self.dockerfile_name

    def option_arguments(
        self, context: str, *, sbom_generator: str | None = None
    ) -> list[str]:
        """Return the build command's flags for ``--file``, ``--target``,
        ``--no-cache``, the extra tags, the cache, the attestations and the
        build secrets, with the context at ``context`` (a local cache and the
        files of build secrets go beside it). An SBOM is made by the image
        ``sbom_generator``, by default the scanner image that buildfuzz builds.
        """
        arguments = []
        if self.context_from == "stdin-tar":
            arguments += ["--file", self.dockerfile_name]  # a path in the tar
        elif self.context_from == "stdin-dockerfile":
            arguments += ["--file", "-"]
        elif self.dockerfile_option is not None:
            arguments += ["--file", f"{context}/{self.dockerfile_option}"]
        if self.target:
            arguments += ["--target", self.target]
        if self.no_cache:
            arguments.append("--no-cache")
        if self.output is Output.LOAD:
            for tag in self.tags:
                arguments += ["--tag", tag]
        if self.cache == "inline":
            arguments += ["--cache-to", "type=inline"]
        elif self.cache == "local":
            cache = f"{context}.cache"
            arguments += ["--cache-to", f"type=local,dest={cache}"]
            arguments += ["--cache-from", f"type=local,src={cache}"]
        if self.attest.startswith("sbom"):
            from buildfuzz.sbom_scanner import SCANNER_IMAGE

            arguments.append(f"--sbom=generator={sbom_generator or SCANNER_IMAGE}")
        if "provenance" in self.attest:
            arguments.append(f"--provenance=mode={self.attest.rpartition('-')[2]}")
        for secret_id, source in self.build_secrets:
            if source == "env":
                where = f"env={secrets.secret_variable(secret_id)}"
            else:
                where = f"src={secrets.secret_file(context, secret_id)}"
            arguments += ["--secret", f"id={secret_id},{where}"]
        return arguments

    def context_argument(self, context: str) -> str:
        """Return the build command's context: "-" for a tar on stdin."""
        return "-" if self.context_from == "stdin-tar" else context


# Case fields added after schema 1, in the order the minimizer resets them.
# to_dict() leaves them out at their default.
OPTIONAL_FIELDS = (
    "bulk",
    "dockerfile_dockerignore",
    "dockerfile_name",
    "target",
    "no_cache",
    "tags",
    "cache",
    "attest",
    "build_secrets",
    "compression",
    "force_compression",
    "oci_mediatypes",
    "context_from",
    "client_user",
    "churn",
)
_OPTIONAL_FILE_FIELDS = ("major", "minor", "xattrs")


def _file_to_dict(entry: ContextFile) -> dict[str, Any]:
    data = asdict(entry)
    for name in _OPTIONAL_FILE_FIELDS:
        if getattr(entry, name) == getattr(ContextFile, name):
            del data[name]
    if entry.xattrs:
        data["xattrs"] = dict(entry.xattrs)
    return data


def case_from_dict(data: Any, *, source: Path | str = "<case>") -> Case:
    """Build a case from parsed JSON, rejecting anything malformed."""
    if not isinstance(data, dict):
        raise DataFileError(source, "a case must be a JSON object")

    schema = data.get("schema")
    if "schema" not in data:
        raise DataFileError(
            source,
            f'case has no "schema" key; buildfuzz writes "schema": {CASE_SCHEMA} '
            "in every case, so add it to a case written by hand",
        )
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
        build_secrets = data.get("build_secrets", {})
        if not isinstance(build_secrets, dict):
            raise TypeError("build_secrets must be an object of ids and sources")
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
            bulk=_bulk_from_dict(data.get("bulk")),
            dockerfile_name=_string(
                data.get("dockerfile_name", DOCKERFILE), "dockerfile_name"
            ),
            dockerfile_dockerignore=_optional_strings(
                data.get("dockerfile_dockerignore"), "dockerfile_dockerignore"
            ),
            target=_string(data.get("target", ""), "target"),
            no_cache=_boolean(data.get("no_cache", False), "no_cache"),
            tags=tuple(_strings(data.get("tags", []), "tags")),
            cache=_choice(data.get("cache", ""), "cache", CACHE_MODES),
            attest=_choice(data.get("attest", ""), "attest", ATTESTATIONS),
            build_secrets=tuple(
                sorted(
                    (_string(k, "build_secrets"), _string(v, "build_secrets"))
                    for k, v in build_secrets.items()
                )
            ),
            compression=_choice(
                data.get("compression", ""), "compression", COMPRESSIONS
            ),
            force_compression=_boolean(
                data.get("force_compression", False), "force_compression"
            ),
            oci_mediatypes=_choice(
                data.get("oci_mediatypes", ""), "oci_mediatypes", OCI_MEDIATYPES
            ),
            context_from=_choice(
                data.get("context_from", ""), "context_from", CONTEXT_SOURCES
            ),
            client_user=_choice(
                data.get("client_user", ""), "client_user", CLIENT_USERS
            ),
            churn=_choice(data.get("churn", ""), "churn", CHURN_MODES),
        )
        check_context_path(case.dockerfile_name)
        for name, value in case.build_args:
            secrets.check_argument(name, value)
        for secret_id, source in case.build_secrets:
            secrets.check_build_secret(secret_id, source)
    except (TypeError, ValueError) as error:
        raise DataFileError(source, f"invalid case: {error}") from None

    return case


def _choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        listed = ", ".join(repr(choice) for choice in choices)
        raise ValueError(f"{name} must be one of {listed}, not {value!r}")
    return str(value)


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
        major=_integer(item.get("major", 0), "files.major"),
        minor=_integer(item.get("minor", 0), "files.minor"),
        xattrs=_xattrs(item.get("xattrs", {})),
    )
    check_context_path(entry.path)
    if entry.kind is FileKind.HARDLINK:
        check_context_path(entry.target)

    return entry


def _bulk_from_dict(item: Any) -> BulkRecipe | None:
    if item is None:
        return None
    if not isinstance(item, dict):
        raise TypeError("bulk must be an object or null")
    unknown = sorted(set(item) - set(BulkRecipe.__dataclass_fields__))
    if unknown:
        raise TypeError(f"unknown bulk fields: {', '.join(unknown)}")
    sizes = item.get("sizes", [0])
    if not isinstance(sizes, list) or not sizes:
        raise TypeError("bulk.sizes must be a non-empty list of integers")
    recipe = BulkRecipe(
        count=_integer(item.get("count"), "bulk.count"),
        sizes=tuple(_integer(size, "bulk.sizes") for size in sizes),
        depth=_integer(item.get("depth", 2), "bulk.depth"),
        seed=_integer(item.get("seed", 0), "bulk.seed"),
    )
    if recipe.count < 0 or recipe.depth < 0 or min(recipe.sizes) < 0:
        raise ValueError("bulk count, sizes and depth must be >= 0")
    return recipe


def _xattrs(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise TypeError("files.xattrs must be an object of names and values")
    return tuple(
        (_string(name, "files.xattrs"), _string(text, "files.xattrs"))
        for name, text in value.items()
    )


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


def _optional_strings(values: Any, name: str) -> tuple[str, ...] | None:
    return None if values is None else tuple(_strings(values, name))


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

    case = case_from_dict(data, source=path)
    # buildfuzz always writes both; a hand-written case may leave them out.
    for name in ("engine", "builder"):
        if name not in data:
            log.warning(
                f"the case names no {name}; using the default",
                file=str(path),
                default=getattr(case, name),
            )
    return case


__all__ = [
    "BULK_DIR",
    "CASE_SCHEMA",
    "COMPRESSIONS",
    "CONTEXT_SOURCES",
    "DEEP_DIR",
    "DOCKERFILE",
    "OCI_MEDIATYPES",
    "BulkRecipe",
    "Case",
    "ContextFile",
    "FileKind",
    "Output",
    "case_from_dict",
    "check_context_path",
    "load_case",
]
