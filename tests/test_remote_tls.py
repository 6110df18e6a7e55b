"""Existing remote buildkitd endpoints over TCP with TLS client certificates."""

import shutil
from pathlib import Path

import pytest

from buildfuzz.buildkit_images import HostBuildkitd, newest_release
from buildfuzz.certs import make_certificates
from tests.conftest import PROFILES, REPO, buildfuzz

pytestmark = [pytest.mark.engine, pytest.mark.usefixtures("installed")]


def test_run_spreads_over_two_tls_endpoints(run_dir: Path, tmp_path: Path) -> None:
    certificates = make_certificates(run_dir / "tls")
    version = newest_release()
    daemons = [
        HostBuildkitd(version, run_dir / name, tls=certificates.server)
        for name in ("a", "b")
    ]
    client = certificates.client
    builders = tmp_path / "builders.toml"
    builders.write_text(
        "".join(
            f'[builders.tls-{name}]\nkind = "buildx"\ndriver = "remote"\n'
            f'endpoint = "{daemon.tcp_address}"\noutputs = ["load", "tar", "local"]\n'
            f'cacert = "{client.cacert}"\ncert = "{client.cert}"\n'
            f'key = "{client.key}"\n'
            for name, daemon in zip("ab", daemons, strict=True)
        )
    )
    profile = tmp_path / "tls.toml"
    profile.write_text(
        (PROFILES / "quiet.toml")
        .read_text()
        .replace(
            'builders = ["buildx-docker", "classic"]', 'builders = ["tls-a", "tls-b"]'
        )
    )
    for daemon in daemons:
        daemon.start()
    try:
        completed = buildfuzz(
            "run", "--budget", "30s", "--profile", str(profile),
            "--builders-file", str(builders),
            "--results", str(tmp_path / "results"), "--workdir", str(run_dir.parent),
            cwd=REPO,
        )  # fmt: skip
        still_running = [daemon._process.poll() is None for daemon in daemons]  # type: ignore[union-attr]
    finally:
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(run_dir / "tls", ignore_errors=True)

    assert completed.returncode == 0, completed.stderr[-2000:]
    counts = {
        line.split()[2]: int(line.split()[-1])
        for line in completed.stdout.splitlines()
        if line.strip().startswith("cases on")
    }
    assert counts.get("26.1/tls-a", 0) > 3, completed.stdout
    assert counts.get("26.1/tls-b", 0) > 3, completed.stdout
    assert still_running == [True, True]  # buildfuzz never stops them


def test_remote_needs_version_or_endpoint(tmp_path: Path) -> None:
    builders = tmp_path / "builders.toml"
    builders.write_text('[builders.x]\nkind = "buildx"\ndriver = "remote"\n')

    completed = buildfuzz(
        "run", "--budget", "1m", "--builders-file", str(builders), cwd=REPO
    )

    assert completed.returncode == 2
    assert "endpoint = URL" in completed.stderr
