"""`edge-agent verify` as an operator runs it: exit 0 when complete, 3 on an unknown key."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.keys import write_keypair

pytestmark = pytest.mark.e2e


def start_verify(broker: Mosquitto, key: Path, client_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "verify", "--url", broker.url, "--topic",
         "site/test/#", "--key", str(key), "--client-id", client_id, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


async def test_verify_passes_a_complete_stream_and_rejects_an_unknown_key(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    write_keypair(tmp_path / "other")
    good = start_verify(broker, keys / "signing.pub", "verify-good")
    wrong = start_verify(broker, tmp_path / "other" / "signing.pub", "verify-wrong")
    # Both subscribe with persistent sessions before the agent publishes anything.
    sources = [{"type": "simulated", "name": "sim", "interval": "50ms", "points": 10}]
    agent = AgentProcess(agent_config(tmp_path, broker, keys, sources), tmp_path)
    agents.append(agent)

    def both_subscribed() -> bool:  # Mosquitto logs "<client id> <qos> <filter>"
        log = broker.log_path.read_text()
        return "verify-good 1 site/test/#" in log and "verify-wrong 1 site/test/#" in log

    def all_shipped() -> bool:
        status = agent.status()
        return status["buffer"]["readings"] == 0 and status["sources"]["sim"]["readings"] > 100

    await wait_for(both_subscribed, 20, "verifiers' subscriptions")
    agent.start()
    await wait_for(all_shipped, 20, "readings shipped")
    assert agent.stop() == 0
    good.send_signal(signal.SIGINT)
    wrong.send_signal(signal.SIGINT)
    good_out, good_err = good.communicate(timeout=30)
    _, wrong_err = wrong.communicate(timeout=30)
    assert good.returncode == 0, good_err
    assert "OK:" in good_err and "holes=0" in good_err
    assert wrong.returncode == 3, wrong_err
    assert "unknown key id" in wrong_err
