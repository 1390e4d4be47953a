"""The real `edge-agent run` process while its wall clock is stepped: forward a day, back an hour.

The agent runs under libfaketime (Debian's `faketime`, installed by `scripts/setup --test`) with
DONT_FAKE_MONOTONIC=1, so only CLOCK_REALTIME moves; the step is written to the file named by
FAKETIME_TIMESTAMP_FILE, which FAKETIME_NO_CACHE makes the library read at every call. The
broker (a private Mosquitto) and the verifier run on the true clock. What a plant engineer relies
on: order by `seq` kept, batches keep flowing, reading times are those read (stepped), retention
by age measures true ages (no eviction from a forward step, none held off by a backward one),
the step logged once with its size and counted in /status, and every reading accounted for:
the ledger line `taken / verified / duplicates / declared / lost` is printed, lost 0.

libfaketime makes every hand-off between threads slow (measured: 200 `asyncio.to_thread` calls
take 4.6 s under it, 0.01 s without), and the store works in a thread: under it the agent's
buffer trails by a few seconds (`oldest_age_s` 3-8 s, 0 without it), which the bounds below
allow for.
"""

from __future__ import annotations

import asyncio
import glob
import re
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.ledger import stop_drained
from helpers.wait import deadline, wait_for

from edge_agent.clock import boot_id
from edge_agent.consumer.verify import Verifier, consume, consumer_client
from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.envelope import Batch, Opener
from edge_agent.seal.keys import load_public_key

pytestmark = pytest.mark.faults

S = 1_000_000_000
DAY, HOUR = 86400, 3600
MAX_AGE_S = 10
"""store.max_age of the retention case: longer than the agent takes to report a step, loaded."""


def libfaketime() -> str:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))
    assert found, "libfaketime is missing: scripts/setup --test installs Debian's faketime"
    return found[0]


class SteppedClock:
    """The agent's wall clock, as an offset from the true clock that the test steps."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "faketime"
        self.offset_s = 0
        self._write()

    def env(self) -> dict[str, str]:
        return {
            "LD_PRELOAD": libfaketime(),
            "DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
        }

    def step(self, seconds: int) -> None:
        self.offset_s += seconds
        self._write()

    def _write(self) -> None:
        """Replace the file whole: libfaketime reads it at every call, and a file caught
        truncated mid-write reads as no offset at all (the true clock for that call, a step
        back and forth that the agent did not make)."""
        partial = self.path.with_suffix(".partial")
        partial.write_text(f"{self.offset_s:+d}\n")
        partial.replace(self.path)


@dataclass
class Received:
    """What the verifier passed on: each fresh reading's seq and time, each batch's clock."""

    ts_by_seq: dict[int, int] = field(default_factory=dict)
    batches: list[Batch] = field(default_factory=list)

    def on_batch(self, batch: Batch | None, fresh: list[dict[str, Any]]) -> None:
        if batch is not None:
            self.batches.append(batch)
            self.ts_by_seq.update((r["seq"], r["ts"]) for r in fresh)


@asynccontextmanager
async def verifying(broker: Mosquitto, keys: Path) -> AsyncIterator[tuple[Verifier, Received]]:
    """The verifier of `edge-agent verify`, subscribed on entry, keeping what it passed on."""
    verifier = Verifier(Opener([load_public_key(keys / "signing.pub")]))
    received = Received()
    stop, subscribed = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        consume(verifier, lambda: consumer_client(broker.url, f"verifier-{broker.port}"),
                "site/test/#", received.on_batch, stop, subscribed=subscribed)
    )  # fmt: skip
    async with deadline(10, "the verifier's subscription"):
        await subscribed.wait()
    try:
        yield verifier, received
    finally:
        stop.set()
        async with deadline(10, "the verifier to stop"):
            await task


def source(points: int = 20) -> list[dict[str, Any]]:
    """About 400 readings/s, stamped by the gateway's clock when read."""
    return [{"type": "simulated", "name": "sim", "interval": "50ms",
             "points": [{"name": f"p{i}", "signal": "ramp"} for i in range(points)]}]  # fmt: skip


def taken(db_path: Path) -> int:
    """Readings the stopped agent sealed: every reading it took (a clean stop seals them all)."""
    with sqlite3.connect(f"{db_path.as_uri()}?mode=ro", uri=True) as db:
        (next_seq,) = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    return int(next_seq) - 1


async def ledger(
    agent: AgentProcess, verifier: Verifier, received: Received, name: str
) -> dict[str, int]:
    """Stop the agent with nothing left buffered (`stop_drained`: a clean stop right after the
    broker's return may leave a backlog, durable but unsent), wait until every seq it took is
    verified or declared, print the ledger.

    `declared` counts the declared readings that were not received too (a batch in flight when
    the broker went away may arrive and be evicted as well): each reading counts once.
    """
    await stop_drained(agent)
    count = taken(Path(agent.config["store"]["path"]))

    def declared() -> set[int]:
        return {seq for b in received.batches for first, last in b.evicted
                for seq in range(first, last + 1)} - received.ts_by_seq.keys()  # fmt: skip

    def accounted() -> bool:
        return len(received.ts_by_seq) + len(declared()) >= count

    await wait_for(accounted, 20, "every reading verified or declared")
    line = {"taken": count, "verified": len(received.ts_by_seq),
            "duplicates": verifier.result.duplicates, "declared": len(declared())}  # fmt: skip
    line["lost"] = count - line["verified"] - line["declared"]
    print(f"ledger {name}: taken / verified / duplicates / declared / lost = "
          f"{line['taken']} / {line['verified']} / {line['duplicates']} / {line['declared']} / "
          f"{line['lost']}")  # fmt: skip
    assert all(stream.holes() == [] for stream in verifier.tracker.streams.values())
    return line


def logged_steps(agent: AgentProcess) -> list[float]:
    """The sizes of the steps the agent logged, in seconds, in order."""
    return [float(m) for m in re.findall(r"Wall clock stepped.* step_s=([-+][0-9.]+)", agent.log())]


@pytest.mark.parametrize("step_s", [DAY, -HOUR], ids=["forward-a-day", "back-an-hour"])
async def test_a_step_keeps_order_flow_and_times_read_and_is_logged_once(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess], step_s: int
) -> None:
    clock = SteppedClock(tmp_path)
    agent = AgentProcess(agent_config(tmp_path, broker, keys, source()), tmp_path, env=clock.env())
    agents.append(agent)
    async with verifying(broker, keys) as (verifier, received):
        agent.start()
        await wait_for(lambda: verifier.result.readings > 200, 20, "readings before the step")
        clock.step(step_s)
        stepped_at = time.monotonic()
        await wait_for(lambda: agent.status()["clock"]["steps"] == 1, 5, "the step in /status")
        detected_s = time.monotonic() - stepped_at
        before = verifier.result.readings
        await wait_for(lambda: verifier.result.readings > before + 400, 10, "readings after it")
        status = agent.status()
        assert status["clock"]["last_step_s"] == pytest.approx(step_s, abs=0.5)
        assert 0 <= status["buffer"]["oldest_age_s"] < 30  # never negative, never the step
        assert status["buffer"]["evicted_readings"] == 0 and status["buffer"]["held_back_s"] == 0
        assert status["buffer"]["problems"] == []
        shown = subprocess.run(
            [sys.executable, "-m", "edge_agent", "status", "--url", agent.health_url],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert shown.returncode == 0, shown.stderr  # a step is no health problem
        assert f", 1 steps, last {step_s:+.3f}s" in shown.stdout, shown.stdout
        line = await ledger(agent, verifier, received, f"clock step {step_s:+d}s")
    assert line["lost"] == 0 and line["declared"] == 0

    # Order by seq kept, and times as read: the readings' times jump once, by the step.
    times = [received.ts_by_seq[seq] for seq in range(1, line["taken"] + 1)]
    jumps = [b - a for a, b in zip(times, times[1:], strict=False) if abs(b - a) > 10 * S]
    assert len(jumps) == 1 and jumps[0] / S == pytest.approx(step_s, abs=2)
    assert abs(times[-1] / S - (time.time() + step_s)) < 30
    # Each batch says its clock: this boot, monotonic time increasing with the batch number,
    # and `sealed - mono` moving once, by the step (what a consumer can detect by itself).
    ordered = sorted({b.batch: b for b in received.batches}.values(), key=lambda b: b.batch)
    assert all(b.clock is not None and b.clock.boot == boot_id() for b in ordered)
    monos = [b.clock.mono for b in ordered if b.clock is not None]
    assert monos == sorted(monos)
    (gateway,) = verifier.clock.gateways.values()
    assert [round(s / S) for s in gateway.steps()] == [step_s]
    summary = "\n".join(verifier.summary()[1])
    assert "steps=1" in summary

    assert logged_steps(agent) == pytest.approx([step_s], abs=0.1)  # once, with its size
    print(f"clock step {step_s:+d}s: detected in {detected_s:.2f}s; {summary.splitlines()[1]}")


async def test_retention_by_age_measures_true_ages_through_steps(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """max_age 10s, the broker down from the start: a forward step of 2 h evicts nothing (no
    batch is 10 s old yet), a step back of 1 h holds nothing off (batches go once 10 s old,
    though their wall times then lie an hour ahead); what retention drops it declares."""
    clock = SteppedClock(tmp_path)
    config = agent_config(tmp_path, broker, keys, source(), store={"max_age": f"{MAX_AGE_S}s"})
    agent = AgentProcess(config, tmp_path, env=clock.env())
    agents.append(agent)
    async with verifying(broker, keys) as (verifier, received):
        broker.stop()  # the verifier's session keeps what it will miss
        agent.start()
        # Sources start as the agent turns ready, and a batch is sealed at least max_delay
        # after its first reading: every batch is younger than this (1 s to spare).
        outage = time.monotonic() - 1.0
        await wait_for(lambda: agent.status()["buffer"]["readings"] > 200, 10, "a backlog")
        clock.step(2 * HOUR)
        await wait_for(lambda: agent.status()["clock"]["steps"] == 1, 5, "the forward step")
        status = agent.status()
        assert time.monotonic() - outage < MAX_AGE_S, "too slow to tell a step from a true age"
        assert status["buffer"]["evicted_readings"] == 0  # nothing is 2 h old
        assert 0 <= status["buffer"]["oldest_age_s"] < MAX_AGE_S

        clock.step(-HOUR)
        await wait_for(lambda: agent.status()["clock"]["steps"] == 2, 5, "the backward step")
        # Retention goes on by true age: batches older than max_age go, though their wall times
        # now lie an hour ahead of the clock.
        await wait_for(lambda: agent.status()["buffer"]["evicted_readings"] > 0, 20, "eviction")
        status = agent.status()
        assert 0 <= status["buffer"]["oldest_age_s"] < MAX_AGE_S + 3
        evicted_after_s = time.monotonic() - outage
        broker.start()
        await wait_for(lambda: agent.status()["mqtt"]["connected"], 15, "the broker back")
        line = await ledger(agent, verifier, received, f"max_age {MAX_AGE_S}s, steps +2h then -1h")
    assert line["lost"] == 0 and line["declared"] > 0
    assert MAX_AGE_S <= evicted_after_s < MAX_AGE_S + 20  # held off, it would take an hour
    assert logged_steps(agent) == pytest.approx([2 * HOUR, -HOUR], abs=0.1)
    print(f"retention: first eviction seen {evicted_after_s:.1f}s into the outage, max_age "
          f"{MAX_AGE_S}s")  # fmt: skip
