"""The real `edge-agent run` process when the broker or the path to it stops answering.

Real parts: the agent process, a private Mosquitto frozen with SIGSTOP and thawed with SIGCONT,
the verifier. The half-open and slow paths go through tests/helpers/fault_proxy.py, a fake of
our own (no real part fails on cue like that). Every case prints its ledger line,
`taken / verified / duplicates / declared / lost`, with lost = taken - verified - declared, and
the times the issue asks for (to degraded health, to the dropped connection, to the reconnect).
Keep-alive and `mqtt.ack_stall` are small so that each case takes seconds; one case runs with
the defaults (30 s and 5 s), the field case of the issue.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers.agent import AgentProcess, agent_config, random_source
from helpers.fault_proxy import FaultProxy
from helpers.verifier import running_verifier
from helpers.wait import wait_for

from edge_agent.consumer.verify import Verifier
from edge_agent.demo.broker import Mosquitto

pytestmark = pytest.mark.faults


def steady_source() -> list[dict[str, Any]]:
    """About 1,000 readings/s."""
    return random_source(50)


def proxied_agent(
    tmp_path: Path,
    broker: Mosquitto,
    keys: Path,
    proxy: FaultProxy,
    agents: list[AgentProcess],
    **mqtt: Any,
) -> AgentProcess:
    """An agent (not started) of `steady_source` whose broker is reached through `proxy`, with
    these `mqtt` settings."""
    config = agent_config(
        tmp_path, broker, keys, steady_source(),
        mqtt={"url": f"mqtt://127.0.0.1:{proxy.port}", **mqtt},
    )  # fmt: skip
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    return agent


async def status_output(agent: AgentProcess) -> subprocess.CompletedProcess[str]:
    """`edge-agent status`, run in a thread: the proxy and the verifier on this loop go on."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "edge_agent", "status", "--url", agent.health_url],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def metric(agent: AgentProcess, name: str) -> float:
    """One unlabelled sample of /metrics."""
    with urllib.request.urlopen(f"{agent.health_url}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(f"{name} "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def committed_seq(db_path: Path) -> int:
    """The last seq the agent committed (read-only, no checkpoint)."""
    with sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True) as db:
        (next_seq,) = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    return int(next_seq) - 1


async def ledger(case: str, agent: AgentProcess, verifier: Verifier, db_path: Path) -> int:
    """Stop the agent cleanly, wait until every sealed reading is accounted for (or 30 s), print
    the ledger line and return `lost`."""
    # In a thread: the proxy and the verifier run on this loop and must keep serving.
    assert await asyncio.to_thread(agent.stop) == 0, agent.log()
    taken = committed_seq(db_path)

    def accounted() -> int:
        return sum(s.readings + s.evicted_count for s in verifier.tracker.streams.values())

    await wait_for(lambda: accounted() >= taken, 30, "every reading or its declaration")
    [stream] = verifier.tracker.streams.values()
    verified, declared = stream.readings, stream.evicted_count
    lost = taken - verified - declared
    print(
        f"\nledger {case}: taken={taken} / verified={verified} / duplicates={stream.duplicates}"
        f" / declared={declared} / lost={lost}"
    )
    assert stream.holes() == []
    assert verifier.result.rejected == 0
    return lost


class Freezer:
    """SIGSTOP and SIGCONT for the broker; `thaw` is safe to call twice."""

    def __init__(self, broker: Mosquitto) -> None:
        assert broker.pid is not None
        self.pid = broker.pid
        self.frozen = False

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen:
            os.kill(self.pid, signal.SIGCONT)
            self.frozen = False


@contextmanager
def freezer(broker: Mosquitto) -> Iterator[Freezer]:
    """A Freezer for `broker`, thawed on exit whatever happened."""
    control = Freezer(broker)
    try:
        yield control
    finally:
        control.thaw()


async def silent_link_case(
    agent: AgentProcess, verifier: Verifier, silence: Callable[[], None], *, keepalive: float,
    ack_stall: float,
) -> tuple[float, float]:  # fmt: skip
    """Make the broker silent; return (seconds to degraded health, seconds to the drop)."""
    await wait_for(lambda: verifier.result.readings > 1000, 30, "first readings")
    assert (await status_output(agent)).returncode == 0
    silence()
    start = time.monotonic()
    await wait_for(
        lambda: agent.status()["mqtt"]["stalled"] is not None, ack_stall + 3, "stalled health"
    )
    stalled_s = time.monotonic() - start
    report = await status_output(agent)
    assert report.returncode == 1, report.stdout
    assert "DEGRADED: broker not acknowledging: no PUBACK for" in report.stderr
    assert "Broker not acknowledging" in agent.log(), "a log line when the stall is detected"
    await wait_for(
        lambda: not agent.status()["mqtt"]["connected"], 1.5 * keepalive, "the dropped connection"
    )
    dropped_s = time.monotonic() - start
    status = agent.status()
    assert "answered nothing" in status["mqtt"]["last_error"]
    assert status["mqtt"]["stalled"] is None, "stalled is about a live connection"
    return stalled_s, dropped_s


async def rejoined(agent: AgentProcess) -> float:
    """Wait until the agent is connected, acknowledged and healthy again; seconds it took."""
    start = time.monotonic()
    while (await status_output(agent)).returncode != 0:
        assert time.monotonic() - start < 40, f"not healthy again within 40 s: {agent.status()}"
        await asyncio.sleep(0.1)
    return time.monotonic() - start


@pytest.mark.parametrize(
    ("keepalive", "ack_stall"), [(4.0, 1.0), (None, None)], ids=["short", "defaults"]
)
async def test_a_frozen_broker_degrades_health_is_dropped_and_rejoined_losing_nothing(
    tmp_path: Path,
    broker: Mosquitto,
    keys: Path,
    agents: list[AgentProcess],
    keepalive: float | None,
    ack_stall: float | None,
) -> None:
    """The field case: Mosquitto SIGSTOPped. With the defaults (keep-alive 30 s, ack_stall
    5 s) the case takes about 40 s; it was 52 s to the first log line and never degraded."""
    mqtt = {"keepalive": f"{keepalive}s", "ack_stall": f"{ack_stall}s"} if keepalive else {}
    config = agent_config(tmp_path, broker, keys, steady_source(), mqtt=mqtt)
    keepalive, ack_stall = keepalive or 30.0, ack_stall or 5.0
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    async with running_verifier(broker, keys) as verifier:
        agent.start()
        with freezer(broker) as control:
            stalled_s, dropped_s = await silent_link_case(
                agent, verifier, control.freeze, keepalive=keepalive, ack_stall=ack_stall
            )
            await asyncio.sleep(1.0)  # the broker stays frozen after the drop, a little
            assert not agent.status()["mqtt"]["connected"]
            control.thaw()
        rejoin_s = await rejoined(agent)
        case = f"broker frozen (keepalive {keepalive:g}s, ack_stall {ack_stall:g}s)"
        lost = await ledger(case, agent, verifier, tmp_path / "buffer.db")
    print(
        f"frozen broker: degraded after {stalled_s:.2f}s (ack_stall {ack_stall:g}s), dropped"
        f" after {dropped_s:.2f}s (keepalive {keepalive:g}s), healthy {rejoin_s:.2f}s after"
        " SIGCONT"
    )
    assert stalled_s < ack_stall + 3
    assert dropped_s < 1.5 * keepalive
    assert lost == 0


async def test_a_half_open_path_degrades_health_is_dropped_and_rejoined_losing_nothing(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """Traffic dropped without a close (a dead switch): the same mechanism catches it."""
    async with FaultProxy(broker.port) as proxy:
        agent = proxied_agent(tmp_path, broker, keys, proxy, agents, keepalive="4s", ack_stall="1s")
        async with running_verifier(broker, keys) as verifier:
            agent.start()
            stalled_s, dropped_s = await silent_link_case(
                agent, verifier, proxy.silence, keepalive=4.0, ack_stall=1.0
            )
            proxy.restore()
            rejoin_s = await rejoined(agent)
            lost = await ledger("half-open path", agent, verifier, tmp_path / "buffer.db")
    print(
        f"half-open path: degraded after {stalled_s:.2f}s, dropped after {dropped_s:.2f}s,"
        f" healthy {rejoin_s:.2f}s after the path returned"
    )
    assert stalled_s < 1.0 + 3 and dropped_s < 1.5 * 4.0
    assert lost == 0


@pytest.mark.parametrize(
    ("bandwidth", "min_rate"), [(64 * 1024, 700), (4 * 1024, 250)], ids=["ample", "too-narrow"]
)
async def test_a_slow_link_keeps_delivering_is_never_called_stalled_and_loses_nothing(
    tmp_path: Path,
    broker: Mosquitto,
    keys: Path,
    agents: list[AgentProcess],
    bandwidth: int,
    min_rate: int,
) -> None:
    """A satellite-like path, 300 ms each way: with a few times the bandwidth the data needs
    (about 8 KiB/s), and with half of it, where the backlog grows but PUBACKs keep coming: slow
    is not stalled, and nothing is lost either way."""
    async with FaultProxy(broker.port) as proxy:
        agent = proxied_agent(tmp_path, broker, keys, proxy, agents, keepalive="2s", ack_stall="1s")
        async with running_verifier(broker, keys) as verifier:
            agent.start()
            await wait_for(lambda: verifier.result.readings > 1000, 30, "first readings")
            proxy.slow(bandwidth=bandwidth, latency=0.3)
            connects = metric(agent, "edge_agent_mqtt_connects_total")
            before, start = verifier.result.readings, time.monotonic()
            backlog = []
            while time.monotonic() - start < 8.0:
                status = agent.status()
                assert status["mqtt"]["stalled"] is None, status["mqtt"]
                assert status["mqtt"]["connected"], status["mqtt"]
                backlog.append(status["buffer"]["readings"])
                await asyncio.sleep(0.1)
            rate = (verifier.result.readings - before) / (time.monotonic() - start)
            drain = agent.status()["buffer"]["drain"]
            assert metric(agent, "edge_agent_mqtt_connects_total") == connects, "no reconnect"
            assert metric(agent, "edge_agent_mqtt_stalls_total") == 0
            assert rate > min_rate, f"delivering on the slow link: {rate:.0f} readings/s"
            if bandwidth > 8 * 1024:
                assert max(backlog[len(backlog) // 2 :]) < 5000, "the backlog does not grow"
            else:
                assert backlog[-1] > 2000 and drain["eta_s"] is None, "growing, not draining"
            proxy.restore()
            case = f"slow link ({bandwidth // 1024} KiB/s, 300 ms)"
            lost = await ledger(case, agent, verifier, tmp_path / "buffer.db")
    print(f"{case}: {rate:.0f} readings/s delivered, max backlog {max(backlog)} readings,"
          f" never stalled; drain {drain}")  # fmt: skip
    assert lost == 0


async def test_status_says_how_fast_a_backlog_drains_and_when_it_will_be_gone(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """After an outage: /status, /metrics and `edge-agent status` give the drain rate and an
    estimate. A 50 ms path (the proxy) and two batches in flight make the drain last seconds."""
    async with FaultProxy(broker.port) as proxy:
        proxy.slow(latency=0.05)
        agent = proxied_agent(tmp_path, broker, keys, proxy, agents, max_inflight=2)
        async with running_verifier(broker, keys) as verifier:
            agent.start()
            await wait_for(lambda: verifier.result.readings > 1000, 30, "first readings")
            broker.stop()
            await wait_for(lambda: agent.status()["buffer"]["readings"] > 15_000, 40, "a backlog")
            outage = agent.status()["buffer"]
            assert outage["drain"]["eta_s"] is None, "not draining while the broker is away"
            assert outage["drain"]["acked_readings_s"] == 0
            assert outage["oldest_age_s"] > 10
            broker.start()
            seen: list[dict[str, Any]] = []

            def draining() -> bool:
                drain = agent.status()["buffer"]["drain"]
                seen.append(drain)
                return drain["eta_s"] is not None and drain["eta_s"] > 1 and drain["window_s"] >= 1

            await wait_for(draining, 30, "an estimate while draining")  # fmt: skip
            drain = seen[-1]
            assert drain["acked_readings_s"] >= drain["net_readings_s"] > 0
            assert metric(agent, "edge_agent_drain_readings_per_second") > 0
            assert "readings/s acknowledged" in (await status_output(agent)).stdout
            await wait_for(
                lambda: agent.status()["buffer"]["readings"] < 1000, 60, "the backlog gone"
            )
            lost = await ledger("drain health", agent, verifier, tmp_path / "buffer.db")
    print(f"drain while catching up: {drain}")
    assert lost == 0
