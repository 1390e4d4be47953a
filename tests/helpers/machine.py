"""A Debian 12 machine booted with systemd as PID 1 (systemd-nspawn), for the `system` layer.

`debian_rootfs` builds a root file system with debootstrap once and keeps it in a cache
(`EDGE_AGENT_CI_CACHE`, default /var/cache/edge-agent-ci), keyed by suite, architecture and package
list; each test module boots a copy. `Machine` boots such a copy the way the issue asks on a host
without a running systemd: in a private mount namespace (`unshare -m`) with a tmpfs on /run, and
`systemd-nspawn --register=no --keep-unit -b`, with no network (`--private-network`), so that
everything installed inside is proven to need none. Commands run inside through `nsenter` into
the container's PID 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3.11")
"""What a Debian 12 gateway has and the .deb depends on (python3.11); no network inside."""
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def cache_dir() -> Path:
    return Path(os.environ.get("EDGE_AGENT_CI_CACHE", "/var/cache/edge-agent-ci"))


def debian_rootfs(arch: str = "amd64") -> Path:
    """The cached Debian 12 rootfs for `arch`, made with debootstrap when missing (minutes)."""
    key = hashlib.sha256(f"{SUITE} {arch} {MIRROR} {' '.join(PACKAGES)}".encode()).hexdigest()
    root = cache_dir() / f"rootfs-{SUITE}-{arch}-{key[:12]}"
    if (root / ".complete").exists():
        return root
    if root.exists():
        shutil.rmtree(root)  # an interrupted debootstrap
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--arch={arch}",
         f"--include={','.join(PACKAGES)}", SUITE, str(root), MIRROR],
        check=True, capture_output=True, timeout=1800,
    )  # fmt: skip
    (root / ".complete").touch()
    return root


def copy_rootfs(source: Path, target: Path) -> Path:
    """A private copy of a cached rootfs for one boot (cp -a keeps owners, modes, devices)."""
    subprocess.run(["cp", "-a", str(source), str(target)], check=True, timeout=600)
    (target / ".complete").unlink(missing_ok=True)
    return target


class Machine:
    """A booted container: `run` executes a command inside; `poweroff` ends it."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root = root
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self, timeout: float = 120.0) -> None:
        """Boot systemd as PID 1 and wait until `systemctl is-system-running` settles."""
        script = (
            "mount -t tmpfs tmpfs /run && exec systemd-nspawn --register=no --keep-unit --quiet "
            f"--private-network --console=passive -D {self.root} -b"
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                ["unshare", "-m", "sh", "-c", script], stdout=log, stderr=log
            )
        end = time.monotonic() + timeout
        state = ""
        while state not in ("running", "degraded"):
            # A separate process tree: its processes and `systemctl` are the only signals. The
            # container's PID 1 is nspawn's child named systemd; until it answers, try again.
            if self.process.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"the container did not boot (state {state!r}):\n{self.log()}")
            if not self.leader:
                self.leader = self._container_init()
            if self.leader:
                answer = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                                  timeout=max(1.0, end - time.monotonic()))  # fmt: skip
                state = answer.stdout.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.2)

    def _container_init(self) -> int:
        """The pid of the container's systemd (nspawn's child of that name), or 0 for not yet."""
        assert self.process is not None
        children = subprocess.run(
            ["ps", "--ppid", str(self.process.pid), "-o", "pid=,comm="],
            capture_output=True, text=True, check=False,
        ).stdout.split("\n")  # fmt: skip
        for line in children:
            pid, _, comm = line.strip().partition(" ")
            if comm.strip() == "systemd":
                return int(pid)
        return 0

    def run(
        self, command: list[str], *, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run `command` inside (all of the container's namespaces, a clean environment)."""
        assert self.leader, "boot first"
        result = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "env", "-i", f"PATH={PATH}", *command],
            capture_output=True, text=True, check=False, timeout=timeout,
        )  # fmt: skip
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result

    def sh(self, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-c", script], check=check)

    def path(self, inside: str) -> Path:
        """The host path of a file inside (the container's root is a directory here)."""
        return self.root / inside.lstrip("/")

    def poweroff(self, timeout: float = 60.0) -> None:
        if self.process is None:
            return
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self.run(["systemctl", "poweroff"], check=False, timeout=10)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.leader = 0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def build_deb(out: Path, *, arch: str = "amd64", revision: str = "1", lintian: bool = True) -> Path:
    """`packaging/build` into `out`; the .deb's path."""
    root = Path(__file__).resolve().parents[2]
    command = [str(root / "packaging" / "build"), "--arch", arch, "--revision", revision,
               "--out", str(out)]  # fmt: skip
    if not lintian:
        command.append("--no-lintian")
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=1200)
    if result.returncode != 0:
        raise AssertionError(f"packaging/build failed:\n{result.stdout}{result.stderr}")
    [deb] = out.glob(f"edge-agent_*-{revision}_{arch}.deb")
    return deb
