"""End to end: the real `edge-agent run` process, a pymodbus device, Mosquitto and the verifier.

Faults are injected the way they happen on site: the broker goes away for 10 s, the agent is
killed with SIGKILL. The promise under test: every sealed reading arrives, signed, with no hole.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.verifier import running_verifier, status_command
from helpers.wait import wait_for

from edge_agent.consumer.completeness import Stream
from edge_agent.consumer.verify import Verifier
from edge_agent.demo.broker import Mosquitto
from edge_agent.demo.modbus_device import modbus_points, start_modbus_device

pytestmark = pytest.mark.e2e

OUTAGE_S = 10.0


def sealed_count(db_path: Path) -> int:
    """How many readings the agent sealed: its persisted next seq, minus one."""
    # Closed at once: a connection left to the garbage collector keeps SQLite's shared-memory
    # lock, so the crash of the next agent would not be recovered by the next reader.
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        (next_seq,) = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    return int(next_seq) - 1


def only_stream(verifier: Verifier) -> Stream:
    [stream] = verifier.tracker.streams.values()
    return stream


async def modbus_and_simulated(tmp_path: Path) -> tuple[list[dict[str, Any]], Any]:
    port, stop_device = await start_modbus_device()
    points = [{k: v for k, v in p.items() if k not in ("deadband", "heartbeat")}
              for p in modbus_points()]  # fmt: skip
    sources = [
        {"type": "modbus", "name": "plc", "host": "127.0.0.1", "port": port,
         "poll_interval": "100ms", "points": points},
        {"type": "simulated", "name": "sim", "interval": "100ms", "points": 20},
    ]  # fmt: skip
    return sources, stop_device


async def test_broker_outage_loses_nothing(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    sources, stop_device = await modbus_and_simulated(tmp_path)
    agent = AgentProcess(agent_config(tmp_path, broker, keys, sources), tmp_path)
    agents.append(agent)
    async with running_verifier(broker, keys) as verifier:
        agent.start()
        await wait_for(lambda: verifier.result.readings > 300, 30, "first readings")
        assert agent.status()["sources"]["plc"]["counts"]["requests"] > 0, "counted per device"

        broker.stop()
        outage_began = time.monotonic()
        await wait_for(lambda: not agent.status()["mqtt"]["connected"], 10, "agent to notice")
        await asyncio.sleep(OUTAGE_S - (time.monotonic() - outage_began))  # the fault's length
        buffered = agent.status()["buffer"]["readings"]
        assert buffered > 100, "readings are buffered while the broker is away"
        broker.start()

        await wait_for(
            lambda: (
                agent.status()["mqtt"]["connected"]
                and agent.status()["buffer"]["readings"] < buffered
            ),
            30,
            "backlog to ship",
        )
        assert agent.stop() == 0, agent.log()
        sealed = sealed_count(tmp_path / "buffer.db")
        await wait_for(lambda: only_stream(verifier).readings >= sealed, 30, "every reading")
        await wait_for(
            lambda: (
                verifier.result.statuses.get("site/test/test-gw/status") == '{"state": "offline"}'
            ),
            10,
            "the offline status of a clean stop",
        )

    stream = only_stream(verifier)
    assert verifier.result.rejected == 0
    assert stream.max_seq == sealed
    assert stream.holes() == []
    assert stream.evicted_count == 0
    assert "Broker connection lost" in agent.log()
    await stop_device()


async def test_sigkill_loses_nothing_that_was_sealed(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    sources, stop_device = await modbus_and_simulated(tmp_path)
    config = agent_config(tmp_path, broker, keys, sources, mqtt={"keepalive": "1s"})
    async with running_verifier(broker, keys) as verifier:
        first = AgentProcess(config, tmp_path)
        agents.append(first)
        first.start()
        await wait_for(lambda: verifier.result.readings > 300, 30, "first readings")
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        sealed_before_kill = sealed_count(tmp_path / "buffer.db")
        await wait_for(
            lambda: (
                verifier.result.statuses.get("site/test/test-gw/status") == '{"state": "offline"}'
            ),
            10,
            "the broker to publish the last will",
        )

        second = AgentProcess(config, tmp_path)
        agents.append(second)
        second.start()
        await wait_for(
            lambda: only_stream(verifier).max_seq > sealed_before_kill + 100, 30, "new readings"
        )
        assert second.stop() == 0, second.log()
        sealed = sealed_count(tmp_path / "buffer.db")
        await wait_for(lambda: only_stream(verifier).readings >= sealed, 30, "every reading")

    stream = only_stream(verifier)  # one stream: the epoch survived the kill
    assert verifier.result.rejected == 0
    assert stream.holes() == [], "every reading sealed before the kill arrived"
    assert stream.max_seq == sealed
    await stop_device()


async def test_health_endpoints_and_clean_stop(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    sources = [{"type": "simulated", "name": "sim", "interval": "100ms", "points": 5}]
    agent = AgentProcess(agent_config(tmp_path, broker, keys, sources), tmp_path)
    agents.append(agent)
    agent.start()
    with urllib.request.urlopen(f"{agent.health_url}/healthz", timeout=5) as response:
        assert response.status == 200
    await wait_for(lambda: agent.status()["sources"]["sim"]["up"], 10, "source up")
    status = agent.status()
    assert status["gateway"] == "test-gw"
    assert set(status["buffer"]) >= {"readings", "bytes", "oldest_age_s"}
    assert status["sources"]["sim"]["last_error"] is None
    with urllib.request.urlopen(f"{agent.health_url}/metrics", timeout=5) as response:
        metrics = response.read().decode()
    names = {line.split("{")[0].split(" ")[0] for line in metrics.splitlines()
             if line and not line.startswith("#")}  # fmt: skip
    assert names and all(name.startswith("edge_agent_") for name in names)
    assert not any(name.endswith("_created") for name in names)
    assert status_command(agent) == 0
    broker.stop()
    await wait_for(lambda: not agent.status()["mqtt"]["connected"], 10, "disconnect")
    assert status_command(agent) == 1, "degraded while the broker is away"
    assert agent.stop(signal.SIGTERM) == 0
    assert "Stopped cleanly" in agent.log()
    assert status_command(agent) == 2, "unreachable once stopped"


def test_start_up_failure_exits_instead_of_hanging(
    tmp_path: Path, broker: Mosquitto, keys: Path
) -> None:
    """The health port is taken: the agent says so and exits 1, its buffer closed."""
    sources = [{"type": "simulated", "name": "sim", "points": 1}]
    config = agent_config(tmp_path, broker, keys, sources)
    config["health"]["listen"] = f"127.0.0.1:{broker.port}"  # already bound by Mosquitto
    agent = AgentProcess(config, tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(agent.path)],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Could not start" in result.stderr and "address already in use" in result.stderr
