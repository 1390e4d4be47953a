"""A real tmpfs of a few MiB, mounted by the test (we run as root), to fill up, grow and spoil.

A full file system is a fault no file can fake: SQLite must see ENOSPC from the kernel.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

MiB = 1024 * 1024


class SmallDisk:
    """A real tmpfs of `size` bytes at `path`, which the test can fill, grow and free."""

    def __init__(self, path: Path, size: int) -> None:
        self.path = path
        path.mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True
        )

    def free(self) -> int:
        stat = os.statvfs(self.path)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int = 0) -> Path:
        """A filler file taking all the free space but `leave` bytes."""
        filler = self.path / f"filler-{time.monotonic_ns()}"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            os.posix_fallocate(fd, 0, max(4096, self.free() - leave))
        finally:
            os.close(fd)
        return filler

    def make_read_only(self) -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(self.path)], check=True)

    def grow(self, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)
