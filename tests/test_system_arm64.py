"""The arm64 .deb in an arm64 Debian 12 rootfs, under qemu-user-static (the optional CI stage).

Built on amd64 from manylinux aarch64 wheels, the package must install offline on arm64 and its
Python (Debian's python3.11 for arm64) must load every compiled module: `edge-agent --version`,
`check-config`, and a keygen (the cryptography wheel) prove it. Not booted: systemd under
emulation would take minutes and prove nothing the amd64 stage does not.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from helpers.machine import build_deb, copy_rootfs, debian_rootfs

pytestmark = [pytest.mark.system, pytest.mark.timeout(3600)]

CONFIG = """\
gateway: {id: arm-gw}
signing: {key_file: /etc/edge-agent/signing.key}
sources:
  - {type: simulated, name: sim, interval: 1s, points: 2}
"""


def inside(root: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """Run a command in the arm64 rootfs (not booted), with no network."""
    script = (
        "mount -t tmpfs tmpfs /run && exec systemd-nspawn --register=no --keep-unit --quiet "
        '--private-network --pipe -D "$0" "$@"'
    )
    return subprocess.run(
        ["unshare", "-m", "sh", "-c", script, str(root), *command],
        capture_output=True, text=True, check=False, timeout=1200,
    )  # fmt: skip


def test_the_arm64_package_installs_offline_and_runs(tmp_path: Path) -> None:
    deb = build_deb(tmp_path / "debs", arch="arm64", lintian=False)
    root = copy_rootfs(debian_rootfs("arm64"), tmp_path / "root")
    assert inside(root, "dpkg", "--print-architecture").stdout.strip() == "arm64"
    (root / "root" / deb.name).write_bytes(deb.read_bytes())
    install = inside(root, "apt-get", "install", "-y", f"/root/{deb.name}")
    assert install.returncode == 0, install.stdout + install.stderr
    assert "Setting up edge-agent (0.1.0-1)" in install.stdout
    version = inside(root, "edge-agent", "--version")
    assert version.stdout.strip() == "edge-agent 0.1.0", version.stderr
    (root / "etc/edge-agent/agent.yaml").write_text(CONFIG)
    check = inside(root, "edge-agent", "check-config", "/etc/edge-agent/agent.yaml")
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip() == "/etc/edge-agent/agent.yaml: valid (1 sources)"
    imports = inside(
        root, "/opt/edge-agent/bin/python", "-c",
        "import pydantic_core, cryptography.hazmat.bindings._rust, zstandard, yaml._yaml, "
        "aiohttp, asyncua, pymodbus; import platform; print(platform.machine())",
    )  # fmt: skip
    assert imports.stdout.strip() == "aarch64", imports.stderr
