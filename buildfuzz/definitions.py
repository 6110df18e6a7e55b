"""Engine, client and builder definitions read from ``builders/``."""

import os
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from buildfuzz.case import Output
from buildfuzz.docker_context import context_host
from buildfuzz.errors import DataFileError
from buildfuzz.paths import builders_dir

BUILDER_KINDS = ("classic", "buildx")
ENGINE_SOURCES = ("debian", "binaries", "external", "dind")
# Debian releases whose docker.io a dind image can contain.
DIND_RELEASES = ("bookworm", "trixie")
EXTRA_BUILDERS_VARIABLE = "BUILDFUZZ_BUILDERS"
PRIVILEGED_CAPS = ("own", "kernel")
BUILDX_DRIVERS = ("docker", "docker-container", "remote", "kubernetes")


@dataclass(frozen=True)
class PackageSet:
    suite: str
    names: tuple[str, ...]


@dataclass(frozen=True)
class EngineDefinition:
    name: str
    description: str
    storage_driver: str
    packages: tuple[PackageSet, ...]
    features: tuple[tuple[str, bool], ...] = ()
    buildkit: str = ""
    storage_drivers: tuple[str, ...] = ("overlay2",)
    containerd_store: bool = False
    # Where the engine comes from. "debian": packages buildfuzz downloads.
    # "binaries": a directory of engine binaries (path). "external": a daemon
    # that already runs (host, or the endpoint of a docker context). "dind":
    # dockerd in a privileged container on the engine that host names.
    source: str = "debian"
    path: str = ""
    host: str = ""
    context: str = ""  # external: a docker context whose endpoint is the host
    release: str = ""  # dind: the Debian release of the image's docker.io
    # dind: the definition of the engine named by host, filled in on loading.
    host_engine: "EngineDefinition | None" = None
    # The capabilities dockerd requests for a privileged container: "kernel"
    # (every one the kernel defines, as 20.10 does) or "own" (only those that
    # dockerd itself has, as 26.1 does).
    privileged_caps: str = "own"
    # external: a throw-away daemon (a CI job's dind service) whose images
    # and build cache buildfuzz may fill, so every builder runs on it.
    disposable: bool = False
    # Run by the unprivileged user buildfuzz under RootlessKit, as rootless
    # Docker; for engines buildfuzz starts from packages or binaries.
    rootless: bool = False

    @property
    def sandboxed(self) -> bool:
        """Whether buildfuzz starts this engine itself and owns all its state."""
        return self.source != "external"


@dataclass(frozen=True)
class ClientDefinition:
    description: str
    packages: tuple[PackageSet, ...]


@dataclass(frozen=True)
class BuilderDefinition:
    name: str
    description: str
    kind: str
    driver: str = ""
    outputs: tuple[Output, ...] = (Output.LOAD,)
    buildkit: str = ""  # a version from builders/buildkit.toml, for built images
    buildkitd_flags: tuple[str, ...] = ()
    buildkitd_config: str = ""  # TOML appended to the builder's buildkitd.toml
    buildx: str = ""  # a buildx version built with Go; "" is Debian's buildx
    namespace: str = ""  # kubernetes driver: the namespace of its pods
    replicas: int = 0  # kubernetes driver: how many BuildKit pods
    # An existing buildkitd for the remote driver; buildfuzz never stops it.
    endpoint: str = ""
    cacert: str = ""
    cert: str = ""
    key: str = ""

    @property
    def classic(self) -> bool:
        return self.kind == "classic"


@dataclass(frozen=True)
class Definitions:
    engines: dict[str, EngineDefinition]
    client: ClientDefinition
    builders: dict[str, BuilderDefinition]


def load_definitions(directory: Path | None = None) -> Definitions:
    """Read ``engines.toml`` and ``builders.toml``, rejecting invalid entries."""
    directory = directory or builders_dir()
    engines_path = directory / "engines.toml"
    builders_path = directory / "builders.toml"
    engines_data = _read(engines_path)
    builders_data = _read(builders_path)

    try:
        engines = {
            name: _engine(name, raw)
            for name, raw in _table(engines_data, "engines").items()
        }
        engines = _link_dind_hosts(engines)
    except (TypeError, ValueError, KeyError) as error:
        raise DataFileError(engines_path, _describe(error)) from None
    try:
        client = ClientDefinition(
            description=str(builders_data["client"].get("description", "")),
            packages=_packages(builders_data["client"]["packages"]),
        )
        builders = {
            name: _builder(name, raw)
            for name, raw in _table(builders_data, "builders").items()
        }
    except (TypeError, ValueError, KeyError) as error:
        raise DataFileError(builders_path, _describe(error)) from None

    for path in extra_builder_files():
        builders.update(_extra_builders(path, builders))
    return Definitions(engines=engines, client=client, builders=builders)


def extra_builder_files() -> list[Path]:
    """Files named in BUILDFUZZ_BUILDERS (colon-separated) with more builders.

    They hold [builders.NAME] tables like builders/builders.toml, for
    builders of one machine, such as remote buildkitd endpoints.
    """
    value = os.environ.get(EXTRA_BUILDERS_VARIABLE, "")
    return [Path(part) for part in value.split(":") if part]


def _extra_builders(
    path: Path, existing: dict[str, BuilderDefinition]
) -> dict[str, BuilderDefinition]:
    data = _read(path)
    try:
        added = {
            name: _builder(name, raw) for name, raw in _table(data, "builders").items()
        }
    except (TypeError, ValueError, KeyError) as error:
        raise DataFileError(path, _describe(error)) from None
    clash = sorted(set(added) & set(existing))
    if clash:
        raise DataFileError(path, f"builder {clash[0]!r} is already defined")
    return added


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as stream:
            return tomllib.load(stream)
    except FileNotFoundError:
        raise DataFileError(path, "definition file not found") from None
    except tomllib.TOMLDecodeError as error:
        raise DataFileError(path, f"invalid TOML: {error}") from None


def _describe(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"missing key {error.args[0]!r}"
    return str(error)


def _table(data: dict[str, Any], name: str) -> dict[str, Any]:
    table = data.get(name)
    if not isinstance(table, dict) or not table:
        raise ValueError(f"[{name}.NAME] tables are missing")
    return table


def _packages(raw: Any) -> tuple[PackageSet, ...]:
    if not isinstance(raw, list) or not raw:
        raise ValueError("packages must be a non-empty list of {suite, names}")
    sets = []
    for item in raw:
        names = item["names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("packages.names must be a list of package names")
        sets.append(PackageSet(suite=str(item["suite"]), names=tuple(names)))
    return tuple(sets)


def _engine(name: str, raw: dict[str, Any]) -> EngineDefinition:
    keys = {"description", "storage_driver", "packages", "features", "buildkit"}
    keys |= {"storage_drivers", "containerd_store", "source", "path", "host"}
    keys |= {"privileged_caps", "context", "release", "disposable", "rootless"}
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise ValueError(f"engine {name!r}: unknown key {unknown[0]!r}")
    source = str(raw.get("source", "debian"))
    if source not in ENGINE_SOURCES:
        raise ValueError(
            f"engine {name!r}: unknown source {source!r}; "
            f"use {', '.join(ENGINE_SOURCES)}"
        )
    if source == "binaries" and not raw.get("path"):
        raise ValueError(f"engine {name!r}: source binaries needs path = DIRECTORY")
    if source == "external" and bool(raw.get("host")) == bool(raw.get("context")):
        raise ValueError(
            f"engine {name!r}: source external needs either host = URL or "
            "context = NAME (a docker context)"
        )
    if source != "external" and raw.get("context"):
        raise ValueError(f"engine {name!r}: context = NAME needs source external")
    if source == "dind":
        if not raw.get("host"):
            raise ValueError(
                f"engine {name!r}: source dind needs host = ENGINE, the engine "
                "its container runs on"
            )
        if raw.get("release") not in DIND_RELEASES:
            raise ValueError(
                f"engine {name!r}: source dind needs release = one of "
                f"{', '.join(DIND_RELEASES)} (the Debian release of its docker.io)"
            )
    elif raw.get("release"):
        raise ValueError(f"engine {name!r}: release = NAME needs source dind")
    disposable = raw.get("disposable", False)
    if not isinstance(disposable, bool) or (disposable and source != "external"):
        raise ValueError(
            f"engine {name!r}: disposable must be true or false, and true only "
            "with source external"
        )
    rootless = raw.get("rootless", False)
    if not isinstance(rootless, bool) or (
        rootless and source not in ("debian", "binaries")
    ):
        raise ValueError(
            f"engine {name!r}: rootless must be true or false, and true only "
            "with source debian or binaries"
        )
    privileged_caps = str(raw.get("privileged_caps", "own"))
    if privileged_caps not in PRIVILEGED_CAPS:
        raise ValueError(
            f"engine {name!r}: unknown privileged_caps {privileged_caps!r}; "
            f"use {', '.join(PRIVILEGED_CAPS)}"
        )
    features = raw.get("features", {})
    default_driver = str(raw.get("storage_driver", "overlay2"))
    if not isinstance(features, dict):
        raise ValueError(f"engine {name!r}: features must be a table")
    host = str(raw.get("host", ""))
    if source == "external" and raw.get("context"):
        # Read now, before buildfuzz points DOCKER_CONFIG at its own directory.
        host = context_host(str(raw["context"]))
    return EngineDefinition(
        name=name,
        description=str(raw.get("description", "")),
        storage_driver=str(raw.get("storage_driver", "overlay2")),
        packages=_packages(raw["packages"]) if source == "debian" else (),
        features=tuple((str(k), bool(v)) for k, v in features.items()),
        buildkit=str(raw.get("buildkit", "")),
        storage_drivers=tuple(
            _names(raw.get("storage_drivers", [default_driver]), "storage_drivers")
        ),
        containerd_store=bool(raw.get("containerd_store", False)),
        source=source,
        path=str(raw.get("path", "")),
        host=host,
        privileged_caps=privileged_caps,
        context=str(raw.get("context", "")),
        release=str(raw.get("release", "")),
        disposable=disposable,
        rootless=rootless,
    )


def _link_dind_hosts(
    engines: dict[str, EngineDefinition],
) -> dict[str, EngineDefinition]:
    """Give each dind engine the definition of the engine it runs on."""
    linked = dict(engines)
    for name, engine in engines.items():
        if engine.source != "dind":
            continue
        host = engines.get(engine.host)
        if host is None or host.source == "dind":
            choices = ", ".join(
                sorted(n for n, e in engines.items() if e.source != "dind")
            )
            raise ValueError(
                f"engine {name!r}: host {engine.host!r} is not an engine defined "
                f"here that is not itself dind; use one of {choices}"
            )
        linked[name] = replace(engine, host_engine=host)
    return linked


def _builder(name: str, raw: dict[str, Any]) -> BuilderDefinition:
    keys = {"description", "kind", "driver", "outputs", "buildkit"}
    keys |= {"buildkitd_flags", "buildkitd_config", "endpoint", "cacert", "cert", "key"}
    keys |= {"buildx", "namespace", "replicas"}
    unknown = sorted(set(raw) - keys)
    if unknown:
        raise ValueError(f"builder {name!r}: unknown key {unknown[0]!r}")
    kind = raw["kind"]
    if kind not in BUILDER_KINDS:
        raise ValueError(
            f"builder {name!r}: unknown kind {kind!r}; use {', '.join(BUILDER_KINDS)}"
        )
    driver = str(raw.get("driver", ""))
    if kind == "buildx" and driver not in BUILDX_DRIVERS:
        raise ValueError(
            f"builder {name!r}: unknown driver {driver!r}; "
            f"use {', '.join(BUILDX_DRIVERS)}"
        )
    if driver == "docker-container" and not raw.get("buildkit"):
        raise ValueError(
            f"builder {name!r}: the {driver} driver needs buildkit = VERSION, "
            "one of the versions in builders/buildkit.toml"
        )
    if driver == "remote" and bool(raw.get("buildkit")) == bool(raw.get("endpoint")):
        raise ValueError(
            f"builder {name!r}: the remote driver needs either buildkit = VERSION "
            "(a buildkitd that buildfuzz starts) or endpoint = URL (an existing one)"
        )
    outputs = []
    for value in raw.get("outputs", ["load"]):
        try:
            outputs.append(Output(value))
        except ValueError:
            choices = ", ".join(o.value for o in Output)
            raise ValueError(
                f"builder {name!r}: unknown output {value!r}; use one of {choices}"
            ) from None
    return BuilderDefinition(
        name=name,
        description=str(raw.get("description", "")),
        kind=kind,
        driver=driver,
        outputs=tuple(outputs),
        buildkit=str(raw.get("buildkit", "")),
        buildkitd_flags=tuple(
            _names(raw.get("buildkitd_flags", []), "buildkitd_flags")
        ),
        buildkitd_config=str(raw.get("buildkitd_config", "")),
        buildx=str(raw.get("buildx", "")),
        namespace=str(raw.get("namespace", "")),
        replicas=int(raw.get("replicas", 0)),
        endpoint=str(raw.get("endpoint", "")),
        cacert=str(raw.get("cacert", "")),
        cert=str(raw.get("cert", "")),
        key=str(raw.get("key", "")),
    )


def _names(values: object, key: str) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"{key} must be a list of names")
    return list(values)
