"""Platforms whose binaries this machine runs, natively or under qemu.

A RUN step of a build for a foreign platform runs the base image's binaries
of that platform. The kernel runs them only through a binfmt_misc handler,
such as the ``qemu-ARCH`` handlers that Debian's qemu-user-static and
binfmt-support register (``dev.sh`` installs and enables them). The handler
needs the F flag (fix_binary): the kernel then opens the emulator when the
handler is registered. Without it the kernel looks the emulator up in the
build container's file system, where it is missing, and the step fails with
"exec format error".
"""

import platform as host_platform
from dataclasses import dataclass
from pathlib import Path

BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")

# Platforms that a machine runs without emulation, by ``uname -m``. An amd64
# kernel runs i386 binaries unless it was built or booted without IA32
# emulation (CONFIG_IA32_EMULATION, the ia32_emulation boot option).
NATIVE_PLATFORMS = {
    "x86_64": ("linux/amd64", "linux/386"),
    "aarch64": ("linux/arm64",),
    "riscv64": ("linux/riscv64",),
    "s390x": ("linux/s390x",),
    "ppc64le": ("linux/ppc64le",),
}

# The platforms that each qemu-user-static handler emulates.
HANDLER_PLATFORMS = {
    "qemu-aarch64": ("linux/arm64",),
    "qemu-arm": ("linux/arm/v7", "linux/arm/v6", "linux/arm/v5"),
    "qemu-i386": ("linux/386",),
    "qemu-riscv64": ("linux/riscv64",),
    "qemu-s390x": ("linux/s390x",),
    "qemu-ppc64le": ("linux/ppc64le",),
    "qemu-mips64el": ("linux/mips64le",),
    "qemu-loongarch64": ("linux/loong64",),
}
PLATFORM_HANDLERS = {
    platform: handler
    for handler, platforms in HANDLER_PLATFORMS.items()
    for platform in platforms
}

FIX = (
    "install Debian's qemu-user-static and binfmt-support and enable the "
    "handler with update-binfmts --enable (./dev.sh does both)"
)


@dataclass(frozen=True)
class Handler:
    """A binfmt_misc handler, as its file under ``BINFMT_DIR`` describes it."""

    name: str
    enabled: bool
    interpreter: str
    flags: str

    @property
    def usable(self) -> bool:
        """Whether it runs binaries inside containers: enabled, with flag F."""
        return self.enabled and "F" in self.flags


def read_handler(path: Path) -> Handler | None:
    """Read the handler file ``path``, or return None if it cannot be read.

    The file's first line is "enabled" or "disabled"; other lines are
    ``KEY VALUE`` or ``flags: FLAGS``.
    """
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    if not lines:
        return None
    interpreter = flags = ""
    for line in lines[1:]:
        if line.startswith("interpreter "):
            interpreter = line.removeprefix("interpreter ").strip()
        elif line.startswith("flags:"):
            flags = line.removeprefix("flags:").strip()
    return Handler(path.name, lines[0].strip() == "enabled", interpreter, flags)


def qemu_handlers(directory: Path | None = None) -> list[Handler]:
    """Return the ``qemu-*`` handlers registered in ``directory``, by name.

    ``directory`` is ``BINFMT_DIR`` when None. The list is empty when
    binfmt_misc is not mounted there or is disabled as a whole (its
    ``status`` file reads "disabled").
    """
    directory = directory or BINFMT_DIR
    if not _binfmt_enabled(directory):
        return []
    handlers = (read_handler(path) for path in sorted(directory.glob("qemu-*")))
    return [handler for handler in handlers if handler is not None]


def _binfmt_enabled(directory: Path) -> bool:
    try:
        return (directory / "status").read_text().strip() == "enabled"
    except OSError:
        return False


def native_platforms(machine: str | None = None) -> tuple[str, ...]:
    """Return the platforms that ``machine`` (``uname -m``) runs natively."""
    return NATIVE_PLATFORMS.get(machine or host_platform.machine(), ())


def runnable_platforms(
    directory: Path | None = None, machine: str | None = None
) -> frozenset[str]:
    """Return the platforms whose binaries run here: native or emulated.

    An emulated platform needs a usable qemu handler in ``directory``
    (``BINFMT_DIR`` when None). Only the handlers of ``HANDLER_PLATFORMS``
    are read, because strategies call this for every case with a RUN step.
    """
    directory = directory or BINFMT_DIR
    platforms = set(native_platforms(machine))
    if not _binfmt_enabled(directory):
        return frozenset(platforms)
    for name, emulated in HANDLER_PLATFORMS.items():
        handler = read_handler(directory / name)
        if handler is not None and handler.usable:
            platforms.update(emulated)
    return frozenset(platforms)


def missing_emulation(
    platform: str, directory: Path | None = None, machine: str | None = None
) -> str | None:
    """Explain why RUN steps for ``platform`` cannot run here, or return None.

    "" is the engine's own platform, which always runs.
    """
    if not platform or platform in runnable_platforms(directory, machine):
        return None
    directory = directory or BINFMT_DIR
    handler = PLATFORM_HANDLERS.get(platform)
    if handler is None:
        return f"RUN steps for {platform} need emulation, but no qemu handler is known"
    found = {h.name: h for h in qemu_handlers(directory)}.get(handler)
    if found is None:
        state = f"no {handler} handler is registered in {directory}"
    elif not found.enabled:
        state = f"the {handler} handler in {directory} is disabled"
    else:
        state = f"the {handler} handler has flags {found.flags!r}, without F"
    return f"RUN steps for {platform} need qemu emulation, but {state}: {FIX}"
