"""buildx builders of the docker-container and remote drivers.

These builders do not see the engine's image store, so the busybox base
and the registry bases of ``base_formats`` come from loopback registries.
The case's Dockerfile names them ``localhost/buildfuzz/NAME:TAG``; each
builder's buildkitd.toml makes 127.0.0.1:PORT the mirror of the registry
"localhost", so Dockerfiles stay the same for every builder and no request
leaves the machine.
"""

import hashlib
from pathlib import Path

import structlog
from python_on_whales import DockerClient, DockerException

from buildfuzz.base_formats import formats_in
from buildfuzz.base_publisher import (
    BasePublisher,
    install_credential_helper,
    registry_credentials,
    use_credential_helper,
)
from buildfuzz.buildkit_images import (
    HostBuildkitd,
    container_driver_options,
    publish_buildkit_image,
)
from buildfuzz.case import Case
from buildfuzz.definitions import BuilderDefinition
from buildfuzz.errors import EngineError
from buildfuzz.registry import LoopbackRegistry
from buildfuzz.sbom_scanner import import_scanner_image, publish_scanner_image
from buildfuzz.strategies import BUSYBOX_IMAGE

log = structlog.get_logger(__name__)

BASE_REPOSITORY = "buildfuzz/busybox"


def mirror_config(
    registry: LoopbackRegistry,
    extra: str = "",
    *,
    auth_registry: LoopbackRegistry | None = None,
) -> str:
    """Return a buildkitd.toml that serves "localhost" images from ``registry``.

    With ``auth_registry``, BuildKit tries it second: when a mirror returns
    404 for a repository, BuildKit goes on to the next mirror.
    """
    registries = [registry] if auth_registry is None else [registry, auth_registry]
    mirrors = ", ".join(f'"{each.address}"' for each in registries)
    text = f'[registry."localhost"]\n  mirrors = [{mirrors}]\n  http = true\n'
    text += "  insecure = true\n"
    for each in registries:
        text += f'[registry."{each.address}"]\n  http = true\n  insecure = true\n'
    return text + (f"\n{extra}\n" if extra else "")


class BuilderPool:
    """Create builders on first use and remove them when the session ends."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._registry: LoopbackRegistry | None = None
        self._auth_registry: LoopbackRegistry | None = None
        self._publisher: BasePublisher | None = None
        self._pushed_base = False
        # The SBOM scanner image: pushed to the registry, imported into engines.
        self._pushed_scanner = False
        self._scanner_engines: set[str] = set()
        self._images: dict[str, str] = {}
        self._hosts: dict[str, HostBuildkitd] = {}
        # (engine label, builder name) -> (client, buildx builder name)
        self._builders: dict[tuple[str, str], tuple[DockerClient, str]] = {}

    def builder(
        self, engine_label: str, docker: DockerClient, definition: BuilderDefinition
    ) -> str | None:
        """Return the buildx builder name for ``definition`` on an engine."""
        if definition.classic or definition.driver == "docker":
            return None
        key = (engine_label, definition.name)
        if key in self._builders:
            return self._builders[key][1]
        if definition.driver == "kubernetes":
            return self._kubernetes(key, docker, definition)
        if definition.driver not in ("docker-container", "remote"):
            raise EngineError(
                f"builder {definition.name}: unknown driver {definition.driver}"
            )

        registry = self._ensure_registry(docker)
        # NOTE: an existing remote buildkitd keeps its own configuration, so
        # it finds the busybox base only if it mirrors "localhost" itself.
        name = "bf-" + hashlib.sha256("/".join(key).encode()).hexdigest()[:10]
        config = self.run_dir / f"{name}.toml"
        config.write_text(
            mirror_config(
                registry,
                definition.buildkitd_config,
                auth_registry=self._auth_registry,
            )
        )
        self._trust_helper(docker)
        try:
            if definition.driver == "docker-container":
                image = self._image(docker, registry, definition.buildkit)
                docker.buildx.create(
                    name=name,
                    driver="docker-container",
                    driver_options=container_driver_options(image),
                    buildkitd_flags=" ".join(definition.buildkitd_flags) or None,
                    config=config,
                    bootstrap=True,
                )
            elif definition.endpoint:
                # An existing buildkitd: buildx only gets an entry in the
                # private configuration, and the daemon is never stopped.
                options = {
                    key: value
                    for key, value in (
                        ("cacert", definition.cacert),
                        ("cert", definition.cert),
                        ("key", definition.key),
                    )
                    if value
                }
                docker.buildx.create(
                    definition.endpoint,
                    name=name,
                    driver="remote",
                    driver_options=options,
                    bootstrap=True,
                )
            else:
                host = self._host(definition, config.read_text())
                docker.buildx.create(
                    host.address, name=name, driver="remote", bootstrap=True
                )
        except DockerException as error:
            raise EngineError(
                f"cannot create builder {definition.name}: "
                f"{_text(error.stderr) or error}"
            ) from None
        self._builders[key] = (docker, name)
        log.info("builder created", builder=definition.name, engine=engine_label)
        return name

    def _kubernetes(
        self,
        key: tuple[str, str],
        docker: DockerClient,
        definition: BuilderDefinition,
    ) -> str:
        """Create a kubernetes-driver builder on the cluster of the user's kubeconfig.

        Its pods belong to that cluster; buildfuzz removes the builder (and so
        its deployment) at the end, in the namespace the definition names.
        """
        # NOTE: not run by the tests: no cluster can be reached from here.
        name = "bf-" + hashlib.sha256("/".join(key).encode()).hexdigest()[:10]
        options = {
            "namespace": definition.namespace or "default",
            "replicas": str(definition.replicas or 1),
        }
        if definition.buildkit:
            options["image"] = f"moby/buildkit:{definition.buildkit}"
        try:
            docker.buildx.create(
                name=name, driver="kubernetes", driver_options=options, bootstrap=True
            )
        except DockerException as error:
            raise EngineError(
                f"cannot create builder {definition.name} on the Kubernetes cluster: "
                f"{_text(error.stderr) or error}"
            ) from None
        self._builders[key] = (docker, name)
        return name

    def provide_bases(
        self,
        engine_label: str,
        docker: DockerClient,
        case: Case,
        definition: BuilderDefinition,
    ) -> None:
        """Make the registry bases of ``case`` reachable for its builder.

        The first case that names a base builds and pushes it. The classic
        builder and the docker driver read the engine's image store, so the
        engine pulls the base and tags it with the Dockerfile's name.
        """
        bases = formats_in(case.dockerfile)
        if not bases:
            return
        self._ensure_registry(docker)
        assert self._publisher is not None
        self._trust_helper(docker)
        self._publisher.provide(
            engine_label,
            docker,
            bases,
            platform=case.platform,
            engine_store=definition.classic or definition.driver == "docker",
        )

    def provide_scanner(
        self, engine_label: str, docker: DockerClient, definition: BuilderDefinition
    ) -> None:
        """Make the SBOM scanner image reachable for builder ``definition``.

        The docker driver's BuildKit looks the image up in the engine's image
        store; the docker-container and remote builders fetch it from the
        loopback registry. The classic builder makes no SBOMs.
        """
        if definition.classic:
            return
        if definition.driver == "docker":
            if engine_label not in self._scanner_engines:
                import_scanner_image(docker)
                self._scanner_engines.add(engine_label)
            return
        registry = self._ensure_registry(docker)
        if not self._pushed_scanner:
            publish_scanner_image(docker, registry)
            self._pushed_scanner = True

    def _trust_helper(self, docker: DockerClient) -> None:
        if self._auth_registry is not None:
            hosts = [self._auth_registry.host, self._auth_registry.address]
            use_credential_helper(docker, hosts)

    def registry_host(self, docker: DockerClient) -> str:
        """Return the loopback registry's ``localhost:PORT``, starting it first."""
        return self._ensure_registry(docker).host

    def _ensure_registry(self, docker: DockerClient) -> LoopbackRegistry:
        if self._registry is None:
            self._registry = LoopbackRegistry(self.run_dir)
            self._registry.start()
            # The second registry requires login, for the busybox-auth base.
            username, password = registry_credentials()
            install_credential_helper(self.run_dir / "bin")
            self._auth_registry = LoopbackRegistry(
                self.run_dir, "registry-auth", username, password
            )
            self._auth_registry.start()
            self._publisher = BasePublisher(
                self.run_dir, self._registry, self._auth_registry
            )
        if not self._pushed_base:
            mirrored = self._registry.image(BASE_REPOSITORY, "1")
            docker.image.tag(BUSYBOX_IMAGE, mirrored)
            docker.image.push(mirrored, quiet=True)
            self._pushed_base = True
        return self._registry

    def _image(
        self, docker: DockerClient, registry: LoopbackRegistry, version: str
    ) -> str:
        if version not in self._images:
            self._images[version] = publish_buildkit_image(docker, registry, version)
        return self._images[version]

    def _host(self, definition: BuilderDefinition, config_text: str) -> HostBuildkitd:
        host = self._hosts.get(definition.name)
        if host is None:
            host = HostBuildkitd(definition.buildkit, self.run_dir, config_text)
            host.start()
            self._hosts[definition.name] = host
        return host

    def forget_engine(self, engine_label: str) -> None:
        """Drop the builders of an engine that is being stopped."""
        if self._publisher is not None:
            self._publisher.forget_engine(engine_label)
        self._scanner_engines.discard(engine_label)
        for key in [key for key in self._builders if key[0] == engine_label]:
            docker, name = self._builders.pop(key)
            _remove(docker, name)

    def close(self) -> None:
        for docker, name in self._builders.values():
            _remove(docker, name)
        self._builders.clear()
        for host in self._hosts.values():
            host.stop()
        self._hosts.clear()
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None
        for registry in (self._registry, self._auth_registry):
            if registry is not None:
                registry.stop()
        self._registry = self._auth_registry = None
        self._pushed_base = False
        self._pushed_scanner = False


def _remove(docker: DockerClient, name: str) -> None:
    try:
        docker.buildx.remove(name)
    except DockerException as error:
        log.warning("cannot remove builder", builder=name, error=_text(error.stderr))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace").strip()
    return str(value or "").strip()
