"""Local base images, made without any registry."""

import io
import tarfile
from pathlib import Path

from python_on_whales import DockerClient

from buildfuzz.strategies import BUSYBOX_IMAGE

BUSYBOX_APPLETS = ("sh", "ls", "cat", "echo", "mkdir", "rm", "cp", "stat", "true")


def busybox_rootfs_tar(busybox: Path, destination: Path) -> Path:
    """Write a root filesystem tar with a static busybox and its applet links."""
    with tarfile.open(destination, "w", format=tarfile.PAX_FORMAT) as archive:
        for directory in ("bin", "tmp", "etc"):
            info = tarfile.TarInfo(directory)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if directory == "tmp" else 0o755
            archive.addfile(info)
        info = archive.gettarinfo(str(busybox), arcname="bin/busybox")
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        with busybox.open("rb") as stream:
            archive.addfile(info, stream)
        for applet in BUSYBOX_APPLETS:
            link = tarfile.TarInfo(f"bin/{applet}")
            link.type = tarfile.SYMTYPE
            link.linkname = "busybox"
            archive.addfile(link)
        passwd = b"root:x:0:0:root:/root:/bin/sh\n"
        info = tarfile.TarInfo("etc/passwd")
        info.size = len(passwd)
        archive.addfile(info, io.BytesIO(passwd))
    return destination


def import_busybox(docker: DockerClient, busybox: Path, work_dir: Path) -> None:
    """Import the busybox base image into the engine behind ``docker``."""
    tar_path = busybox_rootfs_tar(busybox, work_dir / "busybox-rootfs.tar")
    docker.image.import_(
        tar_path,
        BUSYBOX_IMAGE,
        changes=["ENV PATH=/bin", 'CMD ["/bin/sh"]'],
    )
    tar_path.unlink()
