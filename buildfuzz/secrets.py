"""Secret values: registered once, redacted from everything buildfuzz writes.

A case never holds a secret value. A build argument whose value is
``env:NAME`` is read from the environment variable NAME when the build
runs, and repro scripts read the same variable. Values registered here are
replaced by ``***`` in log events, results files and reports.
"""

import os
from collections.abc import Iterable

from buildfuzz.errors import UsageError

REDACTED = "***"
ENV_PREFIX = "env:"
MIN_LENGTH = 3  # shorter values would redact ordinary text

_values: set[str] = set()


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
