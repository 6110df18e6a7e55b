"""The endpoint of a docker context, read from the user's context store.

``docker context create`` keeps each context in
``$DOCKER_CONFIG/contexts/meta/<sha256 of the name>/meta.json`` (with
``~/.docker`` when DOCKER_CONFIG is unset). buildfuzz only reads that file;
it never creates, changes or selects a context. Read it before buildfuzz
points DOCKER_CONFIG at its private directory (buildfuzz.client), that is,
when the engine definitions are loaded.
"""

import hashlib
import json
import os
from pathlib import Path

# The schemes buildfuzz's clients (docker-py and the docker CLI) both reach
# without the context's own TLS files.
SCHEMES = ("unix://", "tcp://")
DEFAULT_HOST = "unix:///var/run/docker.sock"


class ContextError(ValueError):
    """A docker context that is missing or that buildfuzz cannot use."""


# The user's DOCKER_CONFIG and DOCKER_HOST, as they were before buildfuzz
# pointed its own process at a private configuration (client.py).
_user_environment: dict[str, str | None] = {}


def remember_user_environment() -> None:
    """Keep the user's docker variables for later context look-ups (once)."""
    if not _user_environment:
        for name in ("DOCKER_CONFIG", "DOCKER_HOST"):
            _user_environment[name] = os.environ.get(name)


def _user_variable(name: str) -> str | None:
    if _user_environment:
        return _user_environment[name]
    return os.environ.get(name)


def user_config_dir() -> Path:
    configured = _user_variable("DOCKER_CONFIG")
    return Path(configured) if configured else Path.home() / ".docker"


def context_host(name: str, config_dir: Path | None = None) -> str:
    """Return the docker endpoint of context ``name`` as a host URL."""
    config_dir = config_dir or user_config_dir()
    if name == "default":
        return _user_variable("DOCKER_HOST") or DEFAULT_HOST

    digest = hashlib.sha256(name.encode()).hexdigest()
    meta = config_dir / "contexts" / "meta" / digest / "meta.json"
    try:
        data = json.loads(meta.read_text())
    except FileNotFoundError:
        raise ContextError(
            f"docker context {name!r} not found in {config_dir}; "
            "`docker context ls` lists the contexts (DOCKER_CONFIG selects the store)"
        ) from None
    except (OSError, ValueError) as error:
        raise ContextError(
            f"cannot read docker context {name!r} ({meta}): {error}"
        ) from None

    endpoint = (data.get("Endpoints") or {}).get("docker") or {}
    host = str(endpoint.get("Host") or "")
    if not host:
        raise ContextError(f"docker context {name!r} has no docker endpoint")

    tls = config_dir / "contexts" / "tls" / digest / "docker"
    if tls.is_dir() and any(tls.iterdir()):
        raise ContextError(
            f"docker context {name!r} uses TLS files; buildfuzz reaches only "
            "contexts without TLS: give the daemon with --engine-host instead"
        )
    if not host.startswith(SCHEMES):
        raise ContextError(
            f"docker context {name!r} points at {host}; buildfuzz reaches only "
            f"{' and '.join(SCHEMES)} endpoints"
        )
    return host
