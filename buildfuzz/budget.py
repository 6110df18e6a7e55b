"""Parse durations such as ``90s``, ``10m`` or ``1h30m``."""

import re

from buildfuzz.errors import UsageError

_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
MAX_SECONDS = 30 * 86400


def parse_duration(text: str, *, option: str = "--budget") -> float:
    """Return the number of seconds in a duration like ``1h30m``.

    Units are d, h, m and s, largest first, each at most once. A bare number
    is rejected because its unit would be a guess.
    """
    value = text.strip().lower()
    match = _DURATION.fullmatch(value)
    if not value or match is None or not any(match.groups()):
        raise UsageError(
            f"invalid duration for {option}: {text!r}; "
            "use a number with a unit, for example 90s, 10m, 1h or 1h30m"
        )

    seconds = sum(
        int(amount) * _UNITS[unit]
        for amount, unit in zip(match.groups(), "dhms", strict=True)
        if amount
    )
    if seconds <= 0:
        raise UsageError(
            f"invalid duration for {option}: {text!r} is zero; give a positive "
            "duration such as 90s or 10m"
        )
    if seconds > MAX_SECONDS:
        raise UsageError(
            f"invalid duration for {option}: {text!r} is longer than 30 days"
        )

    return float(seconds)


def format_duration(seconds: float) -> str:
    """Format seconds as a short duration such as ``1h30m`` or ``42s``."""
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else ""]
    if secs or not (hours or minutes):
        parts.append(f"{secs}s")

    return "".join(parts)


_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str, *, option: str) -> int:
    """Return the bytes in a size such as ``500M``, ``2G`` or ``1.5GiB``."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise UsageError(
            f"invalid size for {option}: {text!r}; use a number with K, M, G or T, "
            "for example 2G"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
