"""mqtt.ack: end_to_end with the real parts (docs/contract.md §4.10): a private Mosquitto, the
real `edge-agent run` process and the real `edge-agent verify --ack-key` process.

- batches leave the buffer only once the consumer acknowledged them, and the buffer drains to 0;
- an agent restarted learns from the retained acknowledgement what the consumer already holds.
"""

from __future__ import annotations

import copy
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.verifier import VerifyProcess, ledger, settled, verify_processes
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.keys import write_keypair

pytestmark = pytest.mark.e2e


@pytest.fixture
def started() -> Iterator[Callable[[VerifyProcess], VerifyProcess]]:
    """Wraps each VerifyProcess of a test: killed at the end if still running."""
    with verify_processes() as register:
        yield register


def source(interval: str = "100ms") -> list[dict[str, Any]]:
    return [{"type": "simulated", "name": "sim", "interval": interval, "points": 20}]


def end_to_end_config(
    tmp_path: Path, broker: Mosquitto, keys: Path, consumer_pub: Path, timeout: str = "2s"
) -> dict[str, Any]:
    return agent_config(
        tmp_path, broker, keys, source(),
        mqtt={"ack": "end_to_end", "ack_keys": [str(consumer_pub)], "ack_timeout": timeout},
    )  # fmt: skip


def quiet(config: dict[str, Any]) -> dict[str, Any]:
    """The same config with the source polling once an hour: no new readings from now on."""
    changed = copy.deepcopy(config)
    changed["sources"] = source("1h")
    return changed


def consumer_keys(tmp_path: Path) -> Path:
    directory = tmp_path / "consumer"
    write_keypair(directory)
    return directory


async def test_batches_leave_the_buffer_only_once_the_consumer_acknowledged_them(
    tmp_path: Path,
    broker: Mosquitto,
    keys: Path,
    agents: list[AgentProcess],
    started: Callable[[VerifyProcess], VerifyProcess],
) -> None:
    consumer = consumer_keys(tmp_path)
    verify = started(VerifyProcess(broker, keys, tmp_path, ack_key=consumer / "signing.key"))
    verify.start()
    config = end_to_end_config(tmp_path, broker, keys, consumer / "signing.pub")
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    agent.start()
    await wait_for(lambda: agent.status()["mqtt"]["ack"]["deleted_batches"] > 0, 15,
                   "the consumer's first acknowledgement")  # fmt: skip

    # The consumer goes away: the broker still PUBACKs, but nothing leaves the buffer.
    assert verify.stop() == 0
    deleted = agent.status()["mqtt"]["ack"]["deleted_batches"]
    await wait_for(lambda: agent.status()["mqtt"]["ack"]["unacked_batches"] >= 10, 15,
                   "batches PUBACKed and kept")  # fmt: skip
    status = agent.status()
    assert status["mqtt"]["ack"]["deleted_batches"] == deleted
    assert status["buffer"]["batches"] >= status["mqtt"]["ack"]["unacked_batches"] >= 10
    assert status["mqtt"]["ack"]["unacked_oldest_age_s"] > 0
    shown = subprocess.run(
        [sys.executable, "-m", "edge_agent", "status", "--url", agent.health_url],
        capture_output=True, text=True, check=False,
    ).stdout  # fmt: skip
    assert re.search(r"consumer  \d+ batches sent, not yet acknowledged", shown), shown

    # No new readings; the consumer comes back, acknowledges, and the buffer drains to 0.
    agent.write_config(quiet(config))
    assert "Reloaded" in agent.reload()
    verify.start()
    epoch = agent.status()["buffer"]["epoch"]
    taken = await settled(agent, verify, epoch)
    status = agent.status()
    assert status["mqtt"]["ack"]["unacked_batches"] == 0
    assert sum(status["mqtt"]["ack"]["refused"].values()) == 0
    assert verify.stop() == 0, verify.log()
    assert agent.stop() == 0
    assert ledger("end_to_end, consumer away and back", taken, verify.stream(epoch)) == 0


async def test_a_restarted_agent_learns_from_the_retained_acknowledgement(
    tmp_path: Path,
    broker: Mosquitto,
    keys: Path,
    agents: list[AgentProcess],
    started: Callable[[VerifyProcess], VerifyProcess],
) -> None:
    """The agent first trusts the wrong consumer key (an operator's mistake): it keeps every
    batch. Restarted with the right key, the retained acknowledgement empties the buffer at once,
    without sending anything again (the consumer sees no duplicate)."""
    consumer = consumer_keys(tmp_path)
    stranger = tmp_path / "stranger"
    write_keypair(stranger)
    verify = started(VerifyProcess(broker, keys, tmp_path, ack_key=consumer / "signing.key"))
    verify.start()
    config = end_to_end_config(tmp_path, broker, keys, stranger / "signing.pub", timeout="60s")
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    agent.start()
    await wait_for(lambda: agent.status()["buffer"]["batches"] >= 10, 15, "a backlog")
    agent.write_config(quiet(config))
    assert "Reloaded" in agent.reload()
    status = agent.status()
    assert status["mqtt"]["ack"]["refused"]["unknown_key"] > 0
    epoch = status["buffer"]["epoch"]
    await wait_for(
        lambda: verify.stream(epoch).readings == agent.status()["buffer"]["next_seq"] - 1,
        15,
        "the consumer to hold it all",
    )
    backlog = agent.status()["buffer"]["batches"]
    before = agent.status()["buffer"]["next_seq"] - 1
    assert backlog >= 10
    assert agent.stop(signal.SIGTERM) == 0

    fixed = quiet(config)
    fixed["mqtt"]["ack_keys"] = [str(consumer / "signing.pub")]
    agent.write_config(fixed)
    agent.start()
    await wait_for(lambda: agent.status()["buffer"]["batches"] == 0, 10,
                   "the retained acknowledgement to empty the buffer")  # fmt: skip
    status = agent.status()
    assert status["mqtt"]["ack"]["accepted"] >= 1
    assert status["mqtt"]["ack"]["deleted_batches"] >= backlog
    # The restarted source polls once more: wait until that, too, is acknowledged.
    await wait_for(lambda: agent.status()["buffer"]["next_seq"] - 1 >= before + 20, 10,
                   "the restarted source's first poll")  # fmt: skip
    taken = await settled(agent, verify, epoch)
    assert verify.stop() == 0, verify.log()
    stream = verify.stream(epoch)
    assert stream.duplicates == 0, "nothing was sent again"
    assert ledger("end_to_end, agent restarted", taken, stream) == 0
