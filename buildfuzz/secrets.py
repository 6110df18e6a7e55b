"""Secret values: registered once, redacted from everything buildfuzz writes.

A case never holds a secret value. A build argument whose value is
``env:NAME`` is read from the environment variable NAME when the build
runs, and repro scripts read the same variable. A build secret
(``--secret``) of a case is a secret id and a source, ``env`` or ``file``;
its value is made up once per process (``build_secret_value``). Values
registered here are replaced by ``***`` in log events, results files and
reports.
"""

import os
import re
import secrets as random_tokens
from collections.abc import Iterable

from buildfuzz.errors import UsageError

REDACTED = "***"
ENV_PREFIX = "env:"
MIN_LENGTH = 3  # shorter values would redact ordinary text

# Variables the docker client or its plugins read; a secret build argument
# cannot take their names (see check_argument).
_CLIENT_VARIABLES = frozenset(
    ("HOME", "PATH", "TMPDIR", "USER", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    + ("http_proxy", "https_proxy", "no_proxy", "ALL_PROXY", "all_proxy")
)
_CLIENT_PREFIXES = ("DOCKER_", "BUILDX_", "BUILDKIT_", "SSL_", "XDG_")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

# Sources of a build secret: ``env`` passes --secret id=ID,env=VAR with the
# value in the variable VAR, and ``file`` passes --secret id=ID,src=FILE.
SECRET_SOURCES = ("env", "file")
# The variable of an ``env`` secret is this prefix and the id, so an id
# takes only characters that a variable name can hold.
SECRET_VARIABLE_PREFIX = "BUILDFUZZ_SECRET_"
_SECRET_ID = re.compile(r"[A-Za-z0-9_]{1,64}")

_values: set[str] = set()
_build_secret_values: dict[str, str] = {}


def register(values: Iterable[str]) -> None:
    _values.update(value for value in values if len(value) >= MIN_LENGTH)


def register_environment(names: Iterable[str]) -> None:
    """Register the values of environment variables ``names`` as secrets."""
    for name in names:
        value = os.environ.get(name)
        if value is None:
            raise UsageError(
                f"--secret-env {name}: the environment variable {name} is not set; "
                "export it before running buildfuzz"
            )
        register([value])


def is_reference(value: str) -> bool:
    """Return whether a build argument's value names a secret (``env:NAME``)."""
    return value.startswith(ENV_PREFIX)


def check_argument(name: str, value: str) -> None:
    """Raise ValueError for a secret build argument the client cannot read.

    The build reads a secret from the client's environment under the
    argument's own name, so that name must not be one the client needs.
    """
    if not is_reference(value):
        return
    if (
        not _IDENTIFIER.fullmatch(name)
        or name in _CLIENT_VARIABLES
        or (name.startswith(_CLIENT_PREFIXES))
    ):
        raise ValueError(
            f"secret build argument {name!r} is passed to docker in the "
            "environment variable of that name, which docker itself reads or "
            "cannot hold; rename the argument (for example MY_TOKEN)"
        )


def check_build_secret(secret_id: str, source: str) -> None:
    """Raise ValueError for a build secret id or source that buildfuzz cannot pass."""
    if not _SECRET_ID.fullmatch(secret_id):
        raise ValueError(
            f"build secret id {secret_id!r} is invalid; use 1 to 64 letters, "
            "digits and underscores (for example token)"
        )
    if source not in SECRET_SOURCES:
        raise ValueError(
            f"build secret {secret_id!r} has source {source!r}; "
            f"use one of {', '.join(SECRET_SOURCES)}"
        )


def secret_variable(secret_id: str) -> str:
    """Return the environment variable of an ``env`` build secret."""
    return SECRET_VARIABLE_PREFIX + secret_id


def secret_file(context: str, secret_id: str) -> str:
    """Return the file of a ``file`` build secret, beside the context ``context``."""
    return f"{context}.secrets/{secret_id}"


def build_secret_value(secret_id: str) -> str:
    """Return the value of build secret ``secret_id``, registered for redaction.

    A value is random and the same for every build of this process, so that
    the leak oracle can look for it in whatever a build made.
    """
    value = _build_secret_values.setdefault(
        secret_id, f"bfsecret-{random_tokens.token_hex(12)}"
    )
    register([value])
    return value


def check_available(arguments: Iterable[tuple[str, str]], source: str) -> None:
    """Raise UsageError for a secret build argument whose variable is not set."""
    for name, value in arguments:
        variable = value.removeprefix(ENV_PREFIX)
        if is_reference(value) and variable not in os.environ:
            raise UsageError(
                f"{source}: build argument {name} takes its value from the "
                f"environment variable {variable}, which is not set; export it"
            )


def resolve(value: str) -> str:
    """Return a build argument's value, reading ``env:NAME`` references."""
    if not value.startswith(ENV_PREFIX):
        return value
    name = value.removeprefix(ENV_PREFIX)
    secret = os.environ.get(name, "")
    register([secret])
    return secret


def redact(text: str) -> str:
    # Longest first, so a secret that contains another is replaced whole.
    for secret in sorted(_values, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return text


def redact_bytes(data: bytes) -> bytes:
    for secret in sorted(_values, key=len, reverse=True):
        data = data.replace(
            secret.encode("utf-8", "surrogateescape"), REDACTED.encode()
        )
    return data
