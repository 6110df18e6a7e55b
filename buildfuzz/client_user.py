"""A docker client run by an unprivileged user, as on a developer's machine.

buildfuzz runs as root, so a case with ``client_user = "buildfuzz"`` runs its
build command through ``setpriv`` as that user (./dev.sh creates it). The
client then reads the context with the user's rights. A file of mode 0600
owned by root, or a directory of mode 0700, is unreadable to it, as it is
to a developer who builds a checkout that contains such files.

The user may use the daemon, as a member of the docker group may: the
group of the daemon's socket becomes the user's group. The CLI and the
buildx plugin live under root's cache, so they are hard-linked (or copied)
into a directory of the run that the user owns, with a docker
configuration directory of its own. The case directory belongs to the
user, so that it can write outputs there, and the directories of the run
above it let the user pass.

Only builders that need no buildx builder of their own run such cases: the
classic builder and the buildx docker driver. Builders of the other
drivers are registered in root's buildx configuration.
"""

import hashlib
import os
import pwd
import shutil
from pathlib import Path

from buildfuzz.errors import EngineError
from buildfuzz.rootless import closed_ancestor, link_tree, open_run_directory
from buildfuzz.workdir import OWNER_FILE

USER = "buildfuzz"


def user_exists(user: str = USER) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


def user_client_problem(workdir: Path, user: str = USER) -> str | None:
    """Return why the user cannot run clients in ``workdir``, or None."""
    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return f"user {user} does not exist; run ./dev.sh to create it"
    probe = workdir.absolute() / "run"
    while not probe.parent.exists():
        probe = probe.parent
    closed = closed_ancestor(probe, account)
    if closed is None:
        return None
    return (
        f"user {user} cannot enter {closed}; allow it with chmod o+x {closed}, "
        "or give a --workdir that it can enter"
    )


class UserClient:
    """The docker CLI and buildx plugins of one run, as the user runs them."""

    def __init__(self, run_dir: Path, user: str = USER) -> None:
        self.user = user
        self.directory = run_dir / "client-user"
        self._ready: set[Path] = set()

    def _account(self, case_id: str) -> pwd.struct_passwd:
        try:
            return pwd.getpwnam(self.user)
        except KeyError:
            raise EngineError(
                f"case {case_id} runs its client as user {self.user}, which does "
                "not exist; run ./dev.sh to create it"
            ) from None

    def wrap(
        self, command: list[str], case_dir: Path, case_id: str
    ) -> tuple[list[str], dict[str, str]]:
        """Return ``command`` as the user runs it, and the environment it needs.

        ``command`` starts with the client's arguments (CLI, ``--config DIR``,
        ``--host unix://SOCKET``), as python-on-whales gives them.
        """
        account = self._account(case_id)
        cli, config = Path(command[0]), Path(command[command.index("--config") + 1])
        host = command[command.index("--host") + 1]
        user_cli, user_config = self._client_files(cli, config, account)
        if host.startswith("unix://"):
            self._open_socket(Path(host.removeprefix("unix://")), account)
        # The user writes the outputs there, and reads the files of build secrets.
        closed = closed_ancestor(case_dir, account)
        if closed is not None and not (closed / OWNER_FILE).exists():
            raise EngineError(
                f"case {case_id} runs its client as user {self.user}, which cannot "
                f"enter {closed}; allow it with chmod o+x {closed}, or give a "
                "--workdir that it can enter"
            )
        os.chown(case_dir, account.pw_uid, account.pw_gid)
        for secrets_dir in case_dir.glob("*.secrets"):
            for path in (secrets_dir, *secrets_dir.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
        open_run_directory(case_dir / "context")
        self._share_builders(config, user_config, account)

        words = [str(user_cli), "--config", str(user_config), *command[3:]]
        prefix = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}"]
        environment = {
            "HOME": str(self.directory),
            "DOCKER_CONFIG": str(user_config),
            "BUILDX_CONFIG": str(user_config / "buildx"),
        }
        return [*prefix, "--init-groups", *words], environment

    def share(self, cli: Path, config: Path, host: str) -> tuple[Path, Path] | None:
        """Let the user run ``cli`` with ``config`` against the daemon at ``host``.

        Return the user's links to the CLI and the configuration directory,
        which root may use as well, or None when the user does not exist.
        """
        try:
            account = pwd.getpwnam(self.user)
        except KeyError:
            return None
        user_cli, user_config = self._client_files(cli, config, account)
        if host.startswith("unix://"):
            self._open_socket(Path(host.removeprefix("unix://")), account)
        return user_cli, user_config

    def _client_files(
        self, cli: Path, config: Path, account: pwd.struct_passwd
    ) -> tuple[Path, Path]:
        """Link the CLI and buildx plugin of ``config`` into the user's directory."""
        plugin = config / "cli-plugins" / "docker-buildx"
        digest = hashlib.sha256(str(config).encode()).hexdigest()[:8]
        user_config = self.directory / f"config-{digest}"
        user_cli = self.directory / "bin" / "docker"
        if user_config not in self._ready:
            link_tree(cli.parent, user_cli.parent, dirs_exist_ok=True)
            link_tree(plugin.parent, user_config / "cli-plugins", dirs_exist_ok=True)
            (user_config / "config.json").write_text("{}\n")
            for path in (self.directory, *self.directory.rglob("*")):
                os.chown(path, account.pw_uid, account.pw_gid, follow_symlinks=False)
            open_run_directory(self.directory)
            self._ready.add(user_config)
        return user_cli, user_config

    @staticmethod
    def _share_builders(
        config: Path, user_config: Path, account: pwd.struct_passwd
    ) -> None:
        """Copy root's buildx builder definitions into the user's buildx state.

        buildfuzz creates the docker-container and remote builders as root;
        without their definitions the user's client finds no such builder.
        """
        source = Path(os.environ.get("BUILDX_CONFIG") or config / "buildx")
        instances = user_config / "buildx" / "instances"
        shutil.rmtree(instances, ignore_errors=True)
        if not (source / "instances").is_dir():
            return
        shutil.copytree(source / "instances", instances)
        for path in (instances.parent, instances, *instances.rglob("*")):
            os.chown(path, account.pw_uid, account.pw_gid)

    def _open_socket(self, socket: Path, account: pwd.struct_passwd) -> None:
        """Give the user access to the daemon socket, as the docker group has."""
        info = socket.stat()
        if info.st_uid != account.pw_uid and info.st_gid != account.pw_gid:
            os.chown(socket, -1, account.pw_gid)
            socket.chmod(0o660)
        open_run_directory(socket)
