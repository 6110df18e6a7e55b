"""Released Go programs (BuildKit, buildx) compiled from the Go module proxy.

Each release is downloaded by module path and version into the module
cache under ``~/.cache/buildfuzz/go``, compiled with the installed Go
toolchain, and the result is cached by its caller. Only the proxy and the
checksum database of the user's Go settings are used.
"""

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from buildfuzz.errors import SetupError
from buildfuzz.paths import cache_root
from buildfuzz.workdir import remove_tree

GO_FALLBACK = Path("/usr/local/go/bin/go")
GO_TIMEOUT = 3600.0
# The user's Go settings that buildfuzz keeps, because they choose where
# modules come from.
GO_NETWORK_VARIABLES = ("GOPROXY", "GOSUMDB", "GOPRIVATE", "GONOPROXY", "GONOSUMDB")


def go_toolchain() -> Path:
    """Return the ``go`` command: the one on PATH, else /usr/local/go/bin/go."""
    found = shutil.which("go")
    if found:
        return Path(found)
    if GO_FALLBACK.is_file() and os.access(GO_FALLBACK, os.X_OK):
        return GO_FALLBACK
    raise SetupError(
        "go toolchain not found on PATH nor at /usr/local/go/bin/go; "
        "install Go (https://go.dev/dl) or Debian's golang-go, "
        "to build BuildKit from source"
    )


def go_environment() -> dict[str, str]:
    go_root = cache_root() / "go"
    environment = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("GO", "CGO_"))
    }
    environment.update(
        GOPATH=str(go_root),
        GOMODCACHE=str(go_root / "mod"),
        GOCACHE=str(go_root / "build"),
        # Writable module files, so that a cache directory can be removed.
        GOFLAGS="-modcacherw",
        # Compile with the installed Go, never a toolchain the module names.
        GOTOOLCHAIN="local",
        # The user's `go env -w` settings do not apply.
        GOENV="off",
        CGO_ENABLED="0",
    )
    for name in GO_NETWORK_VARIABLES:
        if name in os.environ:
            environment[name] = os.environ[name]
    return environment


def run_go(
    go: Path,
    arguments: list[str],
    purpose: str,
    cwd: Path | None = None,
    *,
    check: bool = True,
) -> str:
    """Run ``go`` and return its output; with ``check``, raise SetupError on failure."""
    completed = subprocess.run(
        [str(go), *arguments],
        cwd=cwd,
        env=go_environment(),
        capture_output=True,
        text=True,
        timeout=GO_TIMEOUT,
        check=False,
    )
    if check and completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip().splitlines()
        raise SetupError(f"failed to {purpose}: {' | '.join(detail[-5:])}")
    return completed.stdout


def download_module(go: Path, module: str, version: str) -> dict[str, Any]:
    path = f"{module}@{version}"
    # A failed download still prints its JSON, whose Error is the clearest text.
    output = run_go(
        go,
        ["mod", "download", "-json", path],
        f"download {path}",
        cwd=Path("/"),
        check=False,
    )
    try:
        downloaded: dict[str, Any] = json.loads(output)
    except json.JSONDecodeError:
        run_go(go, ["mod", "download", path], f"download {path}", cwd=Path("/"))
        raise SetupError(f"failed to download {path}: no JSON from go") from None
    if downloaded.get("Error") or not downloaded.get("Dir"):
        error = " ".join(str(downloaded.get("Error")).split())
        raise SetupError(f"failed to download {path}: {error}")
    return downloaded


def version_tuple(text: str) -> tuple[int, ...]:
    """Turn ``v0.34.2``, ``1.26.8`` or ``go1.26rc1`` into comparable numbers."""
    match = re.match(r"(?:go|v)?(\d+)(?:\.(\d+))?(?:\.(\d+))?", text.strip())
    if not match:
        return (0, 0, 0)
    return tuple(int(part or 0) for part in match.groups())


def check_go_version(go: Path, program: str, go_mod: Path, fix: str) -> None:
    """Raise SetupError when ``go`` is older than the module's go directive."""
    directive = re.search(r"^go\s+(\S+)", go_mod.read_text(), re.MULTILINE)
    if directive is None:
        return
    required = directive.group(1)
    installed = run_go(go, ["env", "GOVERSION"], "read the Go version").strip()
    if version_tuple(required) > version_tuple(installed):
        raise SetupError(
            f"{program} needs Go {required} or newer, but {go} is {installed}; "
            f"install a newer Go or {fix}"
        )


def compile_release(
    module: str,
    version: str,
    output: Path,
    commands: Sequence[str],
    *,
    program: str,
    fix: str,
    tags: str = "",
    ldflags: Sequence[str] = (),
) -> None:
    """Compile ``module``'s ``./cmd/NAME`` programs of ``version`` into ``output``.

    ``go install MODULE/cmd/...@VERSION`` rejects modules whose go.mod has
    replace or exclude directives, so the build runs in a copy of the module.
    A module download keeps only vendor/modules.txt of a vendored release,
    so the dependencies always come from the module cache (-mod=mod).
    ``ldflags`` go to the linker after the version variables of
    ``MODULE/version``.
    """
    go = go_toolchain()
    downloaded = download_module(go, module, version)
    check_go_version(go, program, Path(downloaded["Dir"]) / "go.mod", fix)
    source = output / "source"
    shutil.copytree(downloaded["Dir"], source, symlinks=True)
    for path in (source, *source.rglob("*")):
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)
    package = f"{module}/version"
    linker = [f"-X {package}.Version={version}", f"-X {package}.Package={module}"]
    revision = downloaded.get("Origin", {}).get("Hash")
    if revision:
        linker.append(f"-X {package}.Revision={revision}")
    run_go(
        go,
        [
            "build", "-mod=mod", "-trimpath",
            *(["-tags", tags] if tags else []),
            "-ldflags", " ".join([*linker, *ldflags]),
            "-o", f"{output}/",
            *(f"./cmd/{name}" for name in commands),
        ],
        f"compile {program}",
        cwd=source,
    )  # fmt: skip
    shutil.rmtree(source)


@contextmanager
def staged_directory(directory: Path) -> Iterator[Path]:
    """Yield a staging directory that replaces ``directory`` when the block ends.

    A failed build leaves ``directory`` as it was and removes the staging one.
    """
    staging = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    remove_tree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
        remove_tree(directory)
        staging.rename(directory)
    finally:
        remove_tree(staging)
