"""The docker CLI and buildx plugin that drive every build, and their config.

buildfuzz uses a private ``DOCKER_CONFIG`` (and so a private buildx state
directory) under the run directory, never the user's ``~/.docker``.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from python_on_whales import DockerClient

from buildfuzz.docker_context import remember_user_environment
from buildfuzz.errors import SetupError

# Variables that would make the CLI or buildx use the user's set-up instead
# of the sandbox one.
_USER_VARIABLES = (
    "DOCKER_HOST",
    "DOCKER_CONTEXT",
    "DOCKER_CONFIG",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "BUILDX_BUILDER",
    "BUILDX_CONFIG",
    "DOCKER_BUILDKIT",
    "DOCKER_DEFAULT_PLATFORM",
)


@dataclass(frozen=True)
class ClientTools:
    """Paths of the CLI binary, the buildx plugin and the private config."""

    cli: Path
    buildx: Path
    config_dir: Path

    @classmethod
    def prepare(
        cls, tree: Path, run_dir: Path, plugin: Path | None = None
    ) -> "ClientTools":
        """Set up the CLI with Debian's buildx, or with ``plugin`` instead.

        Each plugin gets a configuration directory of its own; the process'
        environment points at the one of Debian's buildx.
        """
        cli = tree / "usr" / "bin" / "docker"
        default = tree / "usr" / "libexec" / "docker" / "cli-plugins" / "docker-buildx"
        buildx = plugin or default
        for path, what in ((cli, "docker CLI"), (buildx, "buildx plugin")):
            if not path.exists():
                raise SetupError(
                    f"{what} not found at {path}; run `buildfuzz setup` to download it"
                )

        config_dir = run_dir / (
            "docker-config" if plugin is None else f"docker-config-{plugin.parent.name}"
        )
        plugins = config_dir / "cli-plugins"
        plugins.mkdir(parents=True, exist_ok=True)
        (plugins / "docker-buildx").unlink(missing_ok=True)
        shutil.copy2(buildx, plugins / "docker-buildx")
        (config_dir / "config.json").write_text("{}\n")
        if plugin is None:
            isolate_environment(config_dir)

        return cls(cli=cli, buildx=buildx, config_dir=config_dir)

    def docker(self, host: str) -> DockerClient:
        """Return a python-on-whales client for the daemon at ``host``."""
        return DockerClient(
            client_call=[str(self.cli)], host=host, config=str(self.config_dir)
        )


def isolate_environment(config_dir: Path) -> None:
    """Point every docker and buildx variable of this process at ``config_dir``.

    python-on-whales passes this process' environment to each CLI call.
    """
    remember_user_environment()
    for name in _USER_VARIABLES:
        os.environ.pop(name, None)
    os.environ["DOCKER_CONFIG"] = str(config_dir)
    os.environ["BUILDX_CONFIG"] = str(config_dir / "buildx")
    os.environ["DOCKER_CLI_HINTS"] = "false"
