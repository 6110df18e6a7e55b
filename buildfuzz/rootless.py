"""Rootless engines: dockerd run by an unprivileged user, as rootless Docker.

buildfuzz runs as root, so it starts the daemon the way
``dockerd-rootless.sh`` does, as the user ``buildfuzz``: RootlessKit makes a
user namespace from the user's /etc/subuid and /etc/subgid ranges and a
network namespace that slirp4netns connects. dockerd inside has no bridge,
as every sandbox engine. RootlessKit and slirp4netns come with the engine's
packages; newuidmap and newgidmap (Debian's uidmap) must be installed,
because they are setuid root. ./dev.sh creates the user and installs them.

The user must reach the daemon's binaries and directory. The package tree
lives under root's cache, so each engine hard-links it (or copies it, across
file systems) into its own directory, which the user owns. The run
directory above it is opened for search (mode 0711), and every directory
above that must already allow it.

slirp4netns needs /dev/net/tun. When the device does not let the user open
it, buildfuzz adds an ACL entry for the user with setfacl (Debian's acl).

The daemon's network namespace has a loopback of its own, so it cannot pull
from the loopback registry, and neither can a builder container on it: only
the classic builder and the buildx docker driver run on rootless engines.
"""

import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import structlog

from buildfuzz.engine import SandboxEngine
from buildfuzz.errors import EngineError
from buildfuzz.workdir import OWNER_FILE

log = structlog.get_logger(__name__)

USER = "buildfuzz"
SUBID_FILES = (Path("/etc/subuid"), Path("/etc/subgid"))
# The size of the range that useradd gives each user (SUB_UID_COUNT of login.defs).
MIN_SUBIDS = 65536
TUN = Path("/dev/net/tun")
MAX_NAMESPACES = Path("/proc/sys/user/max_user_namespaces")
# Runs inside the namespaces before dockerd. RootlessKit's copy of /run keeps
# links to the host's /run/docker and /run/containerd, so they are removed.
CHILD_SCRIPT = """rm -f /run/docker /run/containerd /run/xtables.lock
exec "$@"
"""
SETUP_HINT = "run ./dev.sh, which creates the user and installs uidmap and acl"


def rootless_problem(user: str = USER) -> str | None:
    """Return why rootless engines cannot run here, or None when they can."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return f"user {user} does not exist; {SETUP_HINT}"
    for path in SUBID_FILES:
        if subid_count(path, user, account.pw_uid) < MIN_SUBIDS:
            return f"{path} gives user {user} fewer than {MIN_SUBIDS} ids; {SETUP_HINT}"
    for helper in ("newuidmap", "newgidmap"):
        if shutil.which(helper) is None:
            return f"{helper} not found; {SETUP_HINT}"
    if _max_namespaces() == 0:
        return f"user namespaces are off ({MAX_NAMESPACES} is 0)"
    if not TUN.exists():
        return f"{TUN} is missing (modprobe tun)"
    if not tun_open_to_all() and shutil.which("setfacl") is None:
        return f"{TUN} is closed to user {user} and setfacl is not found; {SETUP_HINT}"
    return None


def subid_count(path: Path, user: str, uid: int) -> int:
    """Return how many subordinate ids ``path`` gives ``user`` in all."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    total = 0
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (user, str(uid)):
            continue
        if fields[2].isdigit():
            total += int(fields[2])
    return total


def _max_namespaces() -> int:
    try:
        return int(MAX_NAMESPACES.read_text())
    except (OSError, ValueError):
        return -1  # unknown, so the daemon's start reports any problem


def tun_open_to_all() -> bool:
    return TUN.stat().st_mode & 0o006 == 0o006


def grant_tun(user: str) -> None:
    """Let ``user`` open /dev/net/tun, with an ACL entry if it is needed."""
    if tun_open_to_all():
        return
    done = subprocess.run(
        ["setfacl", "-m", f"u:{user}:rw", str(TUN)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise EngineError(
            f"failed to give user {user} access to {TUN}: {done.stderr.strip()}"
        )


def closed_ancestor(directory: Path, account: pwd.struct_passwd) -> Path | None:
    """Return the first directory above ``directory`` that ``account`` cannot enter."""
    for parent in reversed(directory.parents):
        info = parent.stat()
        if info.st_uid == account.pw_uid:
            allowed = info.st_mode & stat.S_IXUSR
        elif info.st_gid == account.pw_gid:
            allowed = info.st_mode & stat.S_IXGRP
        else:
            allowed = info.st_mode & stat.S_IXOTH
        if not allowed:
            return parent
    return None


def open_run_directory(directory: Path) -> None:
    """Let others pass (not list) the directories from the run's down to ``directory``.

    They are buildfuzz's own: the run directory, with its owner file, and
    those below it. Directories above it are left as they are.
    """
    for parent in directory.parents:
        parent.chmod(parent.stat().st_mode | 0o011)
        if (parent / OWNER_FILE).exists():
            return


def link_tree(source: Path, destination: Path, *, dirs_exist_ok: bool = False) -> None:
    """Hard-link the files of ``source`` under ``destination``.

    Files are copied instead where a link cannot be made (another file
    system). Links share the inode, so nothing of the tree is written.
    """
    shutil.copytree(
        source,
        destination,
        symlinks=True,
        copy_function=_link_or_copy,
        dirs_exist_ok=dirs_exist_ok,
    )


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


class RootlessEngine(SandboxEngine):
    """A sandbox dockerd that the user ``buildfuzz`` runs under RootlessKit.

    ``buildfuzz.dind.sandbox_engine`` makes one for a definition with
    ``rootless = true``.
    """

    user = USER

    @property
    def _tree_copy(self) -> Path:
        return self.directory / "tree"

    def _prepare_directory(self) -> None:
        problem = rootless_problem(self.user)
        if problem is not None:
            raise EngineError(f"rootless engine {self.name} cannot run here: {problem}")
        account = pwd.getpwnam(self.user)
        open_run_directory(self.directory)
        closed = closed_ancestor(self.directory, account)
        if closed is not None:
            raise EngineError(
                f"rootless engine {self.name}: user {self.user} cannot enter "
                f"{closed} (mode {closed.stat().st_mode & 0o7777:04o}); allow it "
                f"with chmod o+x {closed}, or give a --workdir that it can enter"
            )
        grant_tun(self.user)
        link_tree(self.tree, self._tree_copy)
        for name in ("home", "xdg", "root", "exec"):
            (self.directory / name).mkdir(exist_ok=True)
        (self.directory / "xdg").chmod(0o700)
        (self.directory / "child.sh").write_text(CHILD_SCRIPT)
        for path in (self.directory, *self.directory.iterdir()):
            if path.name != "tree":
                os.chown(path, account.pw_uid, account.pw_gid)

    def _command(self, dockerd: Path) -> list[str]:
        state = self.directory / "xdg" / "rootlesskit"
        return [
            "setpriv",
            f"--reuid={self.user}",
            f"--regid={self.user}",
            "--init-groups",
            str(self._tree_copy / "usr/bin/rootlesskit"),
            f"--state-dir={state}",
            "--net=slirp4netns",
            "--mtu=65520",
            "--disable-host-loopback",
            "--port-driver=builtin",
            "--copy-up=/etc",
            "--copy-up=/run",
            "--propagation=rslave",
            "/bin/sh",
            str(self.directory / "child.sh"),
            str(self._tree_copy / dockerd.relative_to(self.tree)),
            *self._daemon_arguments(),
        ]

    def _environment(self, tree: Path | None = None) -> dict[str, str]:
        environment = super()._environment(self._tree_copy)
        environment["HOME"] = str(self.directory / "home")
        environment["XDG_RUNTIME_DIR"] = str(self.directory / "xdg")
        return environment
