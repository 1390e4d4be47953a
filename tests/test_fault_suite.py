"""The fault suite of issue 9: real faults on real parts, each case closed by its ledger.

Real parts throughout: the `edge-agent run` process, a private Mosquitto, the real
`edge-agent verify` process (helpers/ledger.py reads its state file), SIGKILL, strace's fault
injection, the tests' TCP fault proxy (helpers/fault_proxy.py, the one fake: no real network
fails on cue). Every case ends with a LEDGER line (taken / verified / duplicates / declared /
lost) and asserts lost = 0; the definitions are in helpers/ledger.py and tests/README.md.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.ledger import Taken, VerifyProcess
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto

pytestmark = pytest.mark.faults

OUTAGE_S = 30.0
"""The broker's outage, as the issue asks."""
KILLS = 20
"""SIGKILLs at random moments in one run."""


def simulated(points: int = 100, interval: str = "50ms") -> list[dict[str, Any]]:
    """`points` random signals every `interval`: 2,000 readings/s by default."""
    return [
        {
            "type": "simulated",
            "name": "sim",
            "interval": interval,
            "points": [{"name": f"p{i}", "signal": "random"} for i in range(points)],
        }
    ]


def buffered(agent: AgentProcess) -> int:
    return int(agent.status()["buffer"]["readings"])


async def test_broker_stopped_30s(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    agent = AgentProcess(agent_config(tmp_path, broker, keys, simulated()), tmp_path)
    agents.append(agent)
    async with VerifyProcess(broker, keys, tmp_path) as verify:
        agent.start()
        await wait_for(lambda: verify.progress() > 1000, 30, "first readings")
        broker.stop()
        stopped_at = time.monotonic()
        await wait_for(lambda: not agent.status()["mqtt"]["connected"], 10, "agent to notice")
        await asyncio.sleep(OUTAGE_S - (time.monotonic() - stopped_at))  # the fault's length
        backlog = buffered(agent)
        assert backlog > 20_000, "readings are buffered while the broker is away"
        broker.start()
        await wait_for(
            lambda: agent.status()["mqtt"]["connected"] and buffered(agent) < 2000,
            60,
            "the backlog to ship",
        )
        assert agent.stop() == 0, agent.log()
        taken = Taken.from_store(tmp_path / "buffer.db")
        await verify.collect(taken)
    verify.ledger(
        f"broker stopped {OUTAGE_S:g}s", taken, clean_stops=[agent], notes=f"backlog={backlog}"
    ).check()
