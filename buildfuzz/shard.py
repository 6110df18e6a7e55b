"""Split one seeded campaign into disjoint shards."""

import re
from dataclasses import dataclass

from buildfuzz.errors import UsageError


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count``: it runs cases index-1, index-1+count, ...

    The shards of one seed run disjoint cases, and together the cases that
    a single run of that seed would run.
    """

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
        if match is None:
            raise UsageError(f"invalid --shard {text!r}; use K/N, for example 2/8")
        index, count = int(match.group(1)), int(match.group(2))
        if count == 0:
            raise UsageError(
                f"invalid --shard {text!r}; N must be 1 or more, as in 1/4"
            )
        if not 1 <= index <= count:
            raise UsageError(
                f"invalid --shard {text!r}; K must be from 1 to N, as in 1/{count}"
            )
        return cls(index, count)
