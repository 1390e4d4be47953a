"""`edge-agent demo` as a user runs it: a real process, all three device kinds, both brokers.

(The broker choice and the view, in process: test_demo_parts.py.)"""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

EDGE_AGENT = [sys.executable, "-m", "edge_agent"]


def run_demo(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGE_AGENT, "demo", "--no-tui", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def verified_by_kind(stdout: str) -> dict[str, int]:
    """{'simulated': 120, ...} from the summary's `source NAME (KIND): N readings verified`."""
    found = re.findall(r"source \S+ \((\w+)\): (\d+) readings verified", stdout)
    return {kind: int(count) for kind, count in found}


def assert_complete(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert re.search(r"OK: \d+ batches verified, complete", result.stdout), result.stdout
    assert "holes=0" in result.stdout
    counts = verified_by_kind(result.stdout)
    assert set(counts) == {"simulated", "modbus", "opcua"}, result.stdout
    assert all(n > 0 for n in counts.values()), result.stdout


def test_demo_runs_every_device_and_verifies_complete() -> None:
    result = run_demo("--duration", "8", timeout=120)
    assert_complete(result)
    assert "sources sim=up" in result.stdout  # the --no-tui status line was printed
    # the agent sends catalogue batches (batch.catalogue defaults to true): the verifier got one
    assert re.search(r" catalogues=[1-9]", result.stdout), result.stdout


def test_demo_embedded_broker_survives_an_outage() -> None:
    """amqtt forgets sessions on restart; the demo re-creates the verifier's, so no hole."""
    import amqtt  # noqa: F401 - the embedded broker; a test extra, so never skipped

    result = run_demo("--broker", "embedded", "--outage", "--duration", "22", timeout=150)
    assert_complete(result)
    assert "broker embedded (amqtt), MQTT 3.1.1" in result.stdout
    during = [line for line in result.stdout.splitlines() if "outage=" in line]
    assert during, result.stdout
    assert any(int(m) > 0 for m in re.findall(r"buffer=(\d+)r", "\n".join(during)))
    assert re.search(r"mqtt=up buffer=0r", result.stdout.split(during[-1])[1]), result.stdout
