"""Whether an engine can start privileged containers on this machine.

The buildx docker-container driver always runs BuildKit in a privileged
container (buildx driver/docker-container/driver.go), and a dind engine runs
dockerd in one. For such a container,
dockerd 20.10 requests every capability the kernel defines. runc cannot
raise a capability that is missing from its own bounding set, so where
buildfuzz runs without one (in a container, or in a VM sandbox that drops
one), the container fails with "unable to apply caps: operation not
permitted". Newer dockerd (26.1 here) requests only the capabilities that
it has itself (moby's oci/caps/utils_linux.go, initCaps).
"""

from pathlib import Path

from buildfuzz.definitions import EngineDefinition

# Capability numbers of linux/capability.h, in order.
NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
    "CAP_FSETID", "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE", "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_IPC_LOCK", "CAP_IPC_OWNER",
    "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT", "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD",
    "CAP_LEASE", "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE", "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ", "CAP_PERFMON", "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)  # fmt: skip
STATUS = Path("/proc/self/status")
LAST_CAP = Path("/proc/sys/kernel/cap_last_cap")


def name_of(number: int) -> str:
    return NAMES[number] if number < len(NAMES) else f"capability {number}"


def missing_from_bounding_set(
    status: str | None = None, last_cap: int | None = None
) -> list[int]:
    """Return the capabilities that the kernel defines but this process lacks.

    ``status`` is the text of /proc/self/status and ``last_cap`` the content
    of /proc/sys/kernel/cap_last_cap; both are read when not given.
    """
    if status is None:
        status = STATUS.read_text()
    if last_cap is None:
        last_cap = int(LAST_CAP.read_text())
    bounding = next(
        int(line.split(":", 1)[1], 16)
        for line in status.splitlines()
        if line.startswith("CapBnd:")
    )
    return [cap for cap in range(last_cap + 1) if not bounding >> cap & 1]


def privileged_problem(
    definition: EngineDefinition, missing: list[int] | None = None
) -> str | None:
    """Return why ``definition`` cannot start privileged containers here."""
    if definition.privileged_caps != "kernel":
        return None
    if missing is None:
        missing = missing_from_bounding_set()
    if not missing:
        return None
    names = ", ".join(name_of(cap) for cap in missing)
    return (
        f"engine {definition.name} cannot start privileged containers here: its "
        "dockerd requests every capability the kernel defines, and the "
        f"capability bounding set of this process lacks {names} (runc: unable "
        "to apply caps: operation not permitted)"
    )
