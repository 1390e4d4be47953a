"""`edge-agent check-config` as an operator runs it, in its own process: every problem on its own
line with file, line and key path; exit 0 valid, 1 invalid, 2 unreadable; never a traceback.

(The same rules in process: test_config.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

MINIMAL = """
gateway: {id: gw1}
sources:
  - {type: simulated, name: sim}
"""


def test_five_mistakes_are_all_reported_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "gateway:\n"
        "  id: pit3 gw\n"  # 2: space not allowed
        "store:\n"
        "  max_bytes: lots\n"  # 4: not a size
        "mqtt:\n"
        "  url: http://broker:1883\n"  # 6: wrong scheme
        "  colour: blue\n"  # 7: unknown key
        "sources:\n"
        "  - type: modbus\n"
        "    name: plc\n"
        "    host: 10.0.0.5\n"
        "    points:\n"
        "      - {name: a, register: holding, address: 1, type: float33}\n"  # 13: bad type
    )
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    expected = [
        (2, "gateway.id"),
        (4, "store.max_bytes"),
        (6, "mqtt.url"),
        (7, "mqtt.colour"),
        (13, "sources[0].points[0].type"),
    ]
    for line_no, key in expected:
        assert any(
            line.startswith(f"{path}:{line_no}:") and f": {key}: " in line for line in lines
        ), (line_no, key, lines)
    assert "5 problems" in lines[-1]


def test_check_config_exit_codes(tmp_path: Path, keys: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL + f"signing: {{key_file: {keys / 'signing.key'}}}\n")

    def run(path: Path) -> int:
        return subprocess.run(
            [sys.executable, "-m", "edge_agent", "check-config", str(path)],
            capture_output=True,
            check=False,
        ).returncode

    assert run(good) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway: {}\n")
    assert run(bad) == 1
    assert run(tmp_path / "absent.yaml") == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"gateway: {id: g}\n\xff\xfe junk\n", "not UTF-8"),
        (b'gateway: {id: g}\nx: "\x01"\n', "unacceptable character"),
        (b"gateway: {id: !!int abc}\n", "gateway.id: invalid value"),
        (b"gateway: !!python/object:os.system x\n", "could not determine a constructor"),
        (b"gateway: {id: " + b"9" * 5000 + b"}\n", "gateway.id: invalid value"),
        (b"a: " + b"[" * 5000 + b"\n", "nested too deeply"),
        (b"store: {max_age: .inf}\n", "store.max_age: Input should be a finite number"),
        (b"mqtt: {keepalive: 70000}\n", "mqtt.keepalive"),
        (b'health: {listen: "127.0.0.1:99999"}\n', "health.listen: port must be 1-65535"),
    ],
)
def test_hostile_files_get_problems_not_tracebacks(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr


def test_a_missing_file_is_said_to_be_missing(tmp_path: Path) -> None:
    """Found by the acceptance check: a file that does not exist was reported as `not a regular
    file`, which sends the operator looking for a directory or a device."""
    missing = tmp_path / "agent.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", str(missing)],
        capture_output=True, text=True, check=False, timeout=20,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == f"{missing}: cannot read: No such file or directory\n"


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.yaml"
    os.mkfifo(fifo)
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", str(fifo)],
        capture_output=True, text=True, check=False, timeout=20,
    )  # fmt: skip
    assert result.returncode == 2
    assert "not a regular file" in result.stderr


@pytest.mark.parametrize("key", ["signing.key_file", "mqtt.password_file"])
def test_a_file_behind_a_folder_this_user_may_not_enter_is_a_problem(
    tmp_path: Path, keys: Path, key: str
) -> None:
    """Field case (issue 12): under systemd, `check-config` met a secret in a directory it could
    not search (root-only /etc/edge-agent/credentials) and reported the config file itself as
    unreadable. It is a located problem of the key that names the file. Root without its
    permission-bypassing capabilities plays the unprivileged user here."""
    secret = tmp_path / "secret"
    secret.mkdir(mode=0o700)
    os.chown(secret, 65534, 65534)  # nobody's: root without CAP_DAC_* may not enter it
    files = {"signing.key_file": str(keys / "signing.key"), "mqtt.password_file": None}
    section, name = key.split(".")
    files[key] = str(secret / "the-file")
    text = MINIMAL + f"signing: {{key_file: {files['signing.key_file']}}}\n"
    if section == "mqtt":
        text += f"mqtt: {{password_file: {files[key]}}}\n"
    path = tmp_path / "agent.yaml"
    path.write_text(text)
    result = subprocess.run(
        ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
         sys.executable, "-m", "edge_agent", "check-config", str(path)],
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert f"{key}: file not readable: {secret / 'the-file'}" in result.stderr
    assert "cannot read" not in result.stderr and "Traceback" not in result.stderr
