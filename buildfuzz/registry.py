"""A private image registry on 127.0.0.1 for builds that push and pull.

It runs Debian's ``docker-registry`` (the CNCF distribution registry 2.8),
fetched into the cache like the engines, with its storage, configuration
and log in a directory of the run. dockerd and BuildKit treat registries
on ``localhost`` as plain-HTTP ones, so images named ``localhost:PORT/...``
need neither TLS nor daemon settings.
"""

import base64
import json
import secrets
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

import structlog

from buildfuzz.definitions import PackageSet
from buildfuzz.errors import EngineError, SetupError
from buildfuzz.packages import ensure_tree
from buildfuzz.workdir import log_tail, remove_tree, stop_process

log = structlog.get_logger(__name__)

REGISTRY_TREE = "registry"
REGISTRY_PACKAGES = (PackageSet(suite="bookworm", names=("docker-registry",)),)
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
# Another process may take the free port before the registry binds it.
START_ATTEMPTS = 3
# The registry checks the bcrypt hash on every request with credentials, and
# a push makes dozens of requests, so a low cost keeps a loopback registry fast.
BCRYPT_ROUNDS = 5
CATALOG_PAGE = 1000  # the maximum that the registry accepts by default


def registry_binary() -> Path:
    """Return the cached ``docker-registry`` binary, downloading it if missing."""
    binary = ensure_tree(REGISTRY_TREE, REGISTRY_PACKAGES) / "usr/bin/docker-registry"
    if not binary.is_file():
        raise SetupError(
            f"docker-registry not found at {binary}; remove "
            f"{binary.parents[2]} so that the next run downloads it again"
        )
    return binary


def htpasswd_line(username: str, password: str) -> str:
    """Return an htpasswd line with a bcrypt hash, the only hash the registry reads."""
    if not username or ":" in username:
        raise SetupError(
            f"registry user name {username!r} is not valid; "
            "give a non-empty name without ':'"
        )
    try:
        import bcrypt
    except ImportError:
        raise SetupError(
            "the bcrypt Python package is missing; "
            "reinstall buildfuzz with: pip install -e ."
        ) from None
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS))
    return f"{username}:{hashed.decode()}\n"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listened on a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class LoopbackRegistry:
    """One ``docker-registry serve`` listening on 127.0.0.1 only.

    With ``username`` and ``password`` it requires HTTP basic authentication
    for every request.
    """

    def __init__(
        self,
        base: Path,
        name: str = "registry",
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        if (username is None) != (password is None):
            raise SetupError(
                f"registry {name}: give both a user name and a password, or neither"
            )
        self.directory = base / name
        self.name = name
        self.username = username
        self.password = password
        self.log_path = self.directory / "registry.log"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, where the registry listens."""
        return f"127.0.0.1:{self._running_port()}"

    @property
    def host(self) -> str:
        """``localhost:PORT``, the name to put in image references."""
        return f"localhost:{self._running_port()}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def image(self, repository: str, tag: str = "latest") -> str:
        """Return the reference of ``repository:tag`` on this registry."""
        return f"{self.host}/{repository}:{tag}"

    def _running_port(self) -> int:
        if not self.port:
            raise EngineError(f"registry {self.name} is not started; call start()")
        return self.port

    def start(self) -> None:
        binary = registry_binary()
        self.directory.mkdir(parents=True)
        (self.directory / "storage").mkdir()
        auth = ""
        if self.username is not None and self.password is not None:
            htpasswd = self.directory / "htpasswd"
            htpasswd.write_text(htpasswd_line(self.username, self.password))
            auth = f"auth:\n  htpasswd:\n    realm: buildfuzz\n    path: {htpasswd}\n"

        started = time.monotonic()
        try:
            for attempt in range(1, START_ATTEMPTS + 1):
                self.port = free_port()
                config = self.directory / "config.yml"
                config.write_text(self._config(auth))
                self._launch(binary, config)
                if self._wait_until_ready(last_attempt=attempt == START_ATTEMPTS):
                    break
        except BaseException:
            self.stop()
            raise
        log.info(
            "registry started",
            registry=self.name,
            address=self.address,
            auth=self.username is not None,
            seconds=round(time.monotonic() - started, 1),
        )

    def _config(self, auth: str) -> str:
        return (
            "version: 0.1\n"
            "log:\n"
            "  level: info\n"
            "  formatter: text\n"
            "storage:\n"
            "  filesystem:\n"
            f"    rootdirectory: {self.directory / 'storage'}\n"
            "  delete:\n"
            "    enabled: true\n"
            "http:\n"
            f"  addr: 127.0.0.1:{self.port}\n"
            f"  secret: {secrets.token_hex(16)}\n"
            f"{auth}"
        )

    def _launch(self, binary: Path, config: Path) -> None:
        with self.log_path.open("ab") as log_file:
            self._process = subprocess.Popen(
                [str(binary), "serve", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                start_new_session=True,
            )

    def _wait_until_ready(self, last_attempt: bool) -> bool:
        """Return True once /v2/ responds, or False if another process took the port."""
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                if "address already in use" in self.log_tail() and not last_attempt:
                    return False
                raise EngineError(
                    f"registry {self.name} exited with status "
                    f"{self._process.returncode}: {self.log_tail()}",
                    log_path=self.log_path,
                )
            if self.probe() in (200, 401):
                return True
            time.sleep(0.1)

        raise EngineError(
            f"registry {self.name} did not respond on {self.address} within "
            f"{START_TIMEOUT:.0f} s; see {self.log_path}",
            log_path=self.log_path,
        )

    def probe(self, username: str | None = None, password: str | None = None) -> int:
        """Return the HTTP status of ``GET /v2/``, or 0 without a response."""
        status, _ = self._get("/v2/", username, password)
        return status

    def catalog(self) -> list[str]:
        """Return the names of the repositories stored in the registry."""
        # The registry returns 100 names per page unless the request sets n.
        path = f"/v2/_catalog?n={CATALOG_PAGE}"
        status, body = self._get(path, self.username, self.password)
        if status != 200:
            raise EngineError(
                f"registry {self.name} returned status {status} for GET {path}; "
                f"see {self.log_path}",
                log_path=self.log_path,
            )
        repositories: list[str] = json.loads(body).get("repositories") or []
        return repositories

    def _get(
        self, path: str, username: str | None, password: str | None
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}")
        if username is not None:
            request.add_unredirected_header(
                "Authorization", _basic_authorization(username, password or "")
            )
        # An empty proxy handler, so that a proxy set in the environment is not used.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=5) as response:
                return int(response.status), response.read()
        except urllib.error.HTTPError as error:
            return int(error.code), b""
        except OSError:
            return 0, b""

    def log_tail(self, lines: int = 5) -> str:
        return log_tail(self.log_path, lines, "(no registry log)")

    def stop(self) -> None:
        """Stop the registry and delete its images, even if it is already gone."""
        stop_process(self._process, STOP_TIMEOUT, f"registry {self.name}")
        self._process = None
        remove_tree(self.directory)
        log.info("registry stopped", registry=self.name)

    def __enter__(self) -> "LoopbackRegistry":
        self.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _basic_authorization(username: str, password: str) -> str:
    token = base64.b64encode(f"{username}:{password}".encode()).decode()
    return f"Basic {token}"
