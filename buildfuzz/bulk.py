"""The bulk recipe: many regular files under ``bulk/`` from a few numbers.

A case with thousands of files cannot list them one by one: Hypothesis
draws at most 8 KiB of choices for one case, and the case's JSON would be
huge. A ``BulkRecipe`` names the count, the sizes, the nesting depth and a
seed instead. ``bulk_files`` expands it in Python, and ``shell_commands``
writes the same expansion as a bash loop for ``repro.sh``. Both use only
integer arithmetic that bash evaluates the same way (64-bit signed, and no
intermediate value here comes near 2**63), so both give the same tree.
"""

from collections.abc import Iterator

from buildfuzz.case import BULK_DIR, BulkRecipe

FANOUT = 8  # subdirectories per level: d0 to d7
# mtime of every bulk file and directory: 2023-11-14, the ContextFile default.
BULK_MTIME_NS = 1_700_000_000_000_000_000
FILE_MODE = 0o644
DIR_MODE = 0o755
_MULTIPLIER = 2_654_435_761  # odd, so i -> hash is a bijection modulo 2**32
_SEED_MULTIPLIER = 1_000_003


def file_hash(recipe: BulkRecipe, index: int) -> int:
    """Return the 32-bit number that names, places and sizes file ``index``."""
    return (recipe.seed * _SEED_MULTIPLIER + index * _MULTIPLIER) % 2**32


def bulk_files(recipe: BulkRecipe) -> Iterator[tuple[str, int]]:
    """Yield the context path and size of every file of ``recipe``.

    A file's name is its hash in hex, which is unique per file. Each
    directory level uses three bits of the hash, and the size index uses
    bits 24 and up.
    """
    for index in range(recipe.count):
        value = file_hash(recipe, index)
        parts = [BULK_DIR]
        for level in range(recipe.depth):
            parts.append(f"d{(value >> (3 * level)) % FANOUT}")
        parts.append(f"{value:08x}")
        yield "/".join(parts), recipe.sizes[(value >> 24) % len(recipe.sizes)]


def bulk_dirs(recipe: BulkRecipe) -> list[str]:
    """Return every directory of the expanded recipe, parents before children."""
    directories = {BULK_DIR}
    for path, _ in bulk_files(recipe):
        parts = path.split("/")
        for end in range(2, len(parts)):
            directories.add("/".join(parts[:end]))
    return sorted(directories, key=lambda path: (path.count("/"), path))


def shell_commands(recipe: BulkRecipe, content: str, mtime: str) -> list[str]:
    """Return bash lines that create the recipe's files under ``$ctx``.

    ``content`` is a file in the script's work directory with at least
    ``max(recipe.sizes)`` bytes of the recipe's content, and every file is
    a prefix of it. ``mtime`` is the ``touch -d`` argument for every entry.
    """
    sizes = " ".join(str(size) for size in recipe.sizes)
    levels = recipe.depth
    return [
        f'mkdir -p "$ctx/{BULK_DIR}"',
        f"bulk_sizes=({sizes})",
        f"for ((i = 0; i < {recipe.count}; i++)); do",
        f"  x=$(( ({recipe.seed} * {_SEED_MULTIPLIER} + i * {_MULTIPLIER})"
        " % 4294967296 ))",
        f'  dir="$ctx/{BULK_DIR}"',
        f"  for ((level = 0; level < {levels}; level++)); do",
        f'    dir="$dir/d$(( (x >> (3 * level)) % {FANOUT} ))"',
        "  done",
        '  [ -d "$dir" ] || mkdir -p "$dir"',
        "  printf -v name '%08x' \"$x\"",
        f'  head -c "${{bulk_sizes[(x >> 24) % {len(recipe.sizes)}]}}" '
        f'{content} > "$dir/$name"',
        "done",
        f'chown -R 0:0 "$ctx/{BULK_DIR}"',
        f'find "$ctx/{BULK_DIR}" -type d -exec chmod {DIR_MODE:04o} {{}} +',
        f'find "$ctx/{BULK_DIR}" -type f -exec chmod {FILE_MODE:04o} {{}} +',
        f'find "$ctx/{BULK_DIR}" -exec touch -h -d {mtime} {{}} +',
    ]
