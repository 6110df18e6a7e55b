"""TLS certificates for buildkitd endpoints on loopback, made with openssl."""

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from buildfuzz.errors import SetupError

DAYS = 30


@dataclass(frozen=True)
class TlsFiles:
    cacert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class Certificates:
    server: TlsFiles
    client: TlsFiles


def make_certificates(directory: Path) -> Certificates:
    """Create a CA, a server certificate for 127.0.0.1 and a client certificate."""
    if shutil.which("openssl") is None:
        raise SetupError("openssl not found; install it with: apt-get install openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(DAYS),
        "-subj", "/CN=buildfuzz test CA", "-keyout", ca_key, "-out", ca_cert,
    )  # fmt: skip
    server = _signed(directory, "server", ca_key, ca_cert, server=True)
    client = _signed(directory, "client", ca_key, ca_cert, server=False)
    return Certificates(server=server, client=client)


def _signed(
    directory: Path, name: str, ca_key: Path, ca_cert: Path, *, server: bool
) -> TlsFiles:
    key, request, cert = (directory / f"{name}{s}" for s in (".key", ".csr", ".pem"))
    extensions = directory / f"{name}.ext"
    if server:
        extensions.write_text(
            "subjectAltName = IP:127.0.0.1, DNS:localhost\n"
            "extendedKeyUsage = serverAuth\n"
        )
    else:
        extensions.write_text("extendedKeyUsage = clientAuth\n")
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=buildfuzz {name}",
        "-keyout", key, "-out", request,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", request, "-CA", ca_cert, "-CAkey", ca_key,
        "-CAcreateserial", "-days", str(DAYS), "-extfile", extensions, "-out", cert,
    )  # fmt: skip
    return TlsFiles(cacert=ca_cert, cert=cert, key=key)


def _openssl(*arguments: object) -> None:
    completed = subprocess.run(
        ["openssl", *map(str, arguments)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise SetupError(f"openssl {arguments[0]} failed: {completed.stderr.strip()}")
