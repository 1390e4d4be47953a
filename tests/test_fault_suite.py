"""The fault suite of issue 9: real faults on real parts, each case closed by its ledger.

Real parts throughout: the `edge-agent run` process, a private Mosquitto, the real
`edge-agent verify` process (helpers/ledger.py reads its state file), SIGKILL, strace's fault
injection, the tests' TCP fault proxy (helpers/fault_proxy.py, the one fake: no real network
fails on cue). Every case ends with a LEDGER line (taken / verified / duplicates / declared /
lost) and asserts lost = 0; the definitions are in helpers/ledger.py and tests/README.md.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.fault_proxy import FaultProxy
from helpers.ledger import Taken, VerifyProcess, drained_ledger, sealed_in_store
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
        ledger = await drained_ledger(
            verify, agent, f"broker stopped {OUTAGE_S:g}s", notes=f"backlog={backlog}"
        )
    ledger.check()


def spawn(agent: AgentProcess, prefix: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
    """`edge-agent run` on the agent's config, under `prefix` (strace), without waiting."""
    log = agent.log_path.open("ab")
    return subprocess.Popen(
        [*prefix, sys.executable, "-m", "edge_agent", "run", "--config", str(agent.path)],
        stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


async def test_agent_sigkilled_at_20_random_moments(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """One run, 20 SIGKILLs, each at a random moment after the agent came up (seeded)."""
    seed = int(os.environ.get("FAULT_SEED", time.time_ns() % 1_000_000))
    rng = random.Random(seed)
    print(f"\nSIGKILL moments: seed={seed} (FAULT_SEED={seed} repeats them)")
    config = agent_config(tmp_path, broker, keys, simulated(), mqtt={"keepalive": "1s"})
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    async with VerifyProcess(broker, keys, tmp_path) as verify:
        moments = []
        for _ in range(KILLS):
            await asyncio.to_thread(agent.start)
            moment = rng.uniform(0.0, 1.5)
            moments.append(moment)
            await asyncio.sleep(moment)  # the fault's moment, drawn from the seed
            assert agent.stop(signal.SIGKILL) == -signal.SIGKILL
        await asyncio.to_thread(agent.start)
        await wait_for(lambda: buffered(agent) < 2000, 60, "the backlog to ship")
        epoch = agent.status()["buffer"]["epoch"]
        ledger = await drained_ledger(
            verify,
            agent,
            f"agent SIGKILLed at {KILLS} random moments",
            notes=f"seed={seed} moments_s={','.join(f'{m:.2f}' for m in moments)}",
        )
    assert list(ledger.per_epoch) == [epoch], "one epoch: no kill spoiled the buffer"
    assert "Quarantined" not in agent.log()
    ledger.check()


STRACE = shutil.which("strace")


def killed_in_sync(agent: AgentProcess, n: int, trace: Path) -> str:
    """Run the agent under strace until its `n`th fdatasync of the buffer's WAL, which is
    answered with SIGKILL. Returns where it landed: `commit` when WAL frames were written just
    before it (the sync that ends a commit), `wal-header` when only the 32-byte header of a
    restarted WAL was (synced before the first commit's frames), `checkpoint` when it follows
    another sync (SQLite syncs the WAL again before a checkpoint copies it)."""
    assert STRACE is not None, "strace is not installed (scripts/setup --test)"
    wal = f"{agent.config['store']['path']}-wal"
    inject = f"inject=fdatasync:signal=KILL:when={n}"
    process = spawn(agent, (STRACE, "-f", "-y", "-P", wal, "-e", "trace=fdatasync,pwrite64",
                            "-e", inject, "-o", str(trace)))  # fmt: skip
    code = process.wait(timeout=120)
    assert code == -signal.SIGKILL, f"strace exited {code}:\n{agent.log()[-2000:]}"
    calls = [line.split(maxsplit=1)[1] for line in trace.read_text().splitlines()
             if "fdatasync(" in line or "pwrite64(" in line]  # fmt: skip
    syncs = [i for i, call in enumerate(calls) if call.startswith("fdatasync(")]
    assert len(syncs) == n, calls[-3:]
    before = calls[syncs[-1] - 1]
    if not before.startswith("pwrite64("):
        return "checkpoint"
    size = re.search(r", (\d+), \d+\)\s+= ", before)
    return "wal-header" if size is not None and size[1] == "32" else "commit"


def killed_in_commit(agent: AgentProcess, n: int, trace: Path, landed: list[str]) -> None:
    """`killed_in_sync` at `n`, and again one sync later while it lands elsewhere than in a
    commit (a commit's sync follows a WAL header's and precedes a checkpoint's); every landing is
    appended to `landed`."""
    for attempt in range(3):
        where = killed_in_sync(agent, n + attempt, trace.with_suffix(f".{attempt}.strace"))
        landed.append(f"{where}@{n + attempt}")
        if where == "commit":
            return
    raise AssertionError(f"no kill landed in a commit: {landed}")


def witness_seq(db_path: Path) -> int:
    """The last seq of the buffer's witness (`PATH-committed`), written after each commit."""
    _, _, next_seq = Path(f"{db_path}-committed").read_text().split()
    return int(next_seq) - 1


async def test_agent_killed_inside_a_commit(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """SIGKILL inside SQLite's commit (its fdatasync of the WAL), by strace's fault injection.

    strace counts only the fdatasyncs of the buffer's `-wal` file (`-P`). In the batch write:
    the broker is down, so every commit after the buffer's open appends sealed batches; each
    kill is shown to have landed inside one (the file holds a seq its witness, written when a
    commit returns, does not). In the ack delete: the source polls once an hour and one batch
    is in flight at a time, so after the open and the first poll (the first 3 or 4 syncs) each
    commit deletes a batch the broker acknowledged. A WAL sync may also be a restarted WAL's
    header (before a commit's frames) or a checkpoint's (after them); strace's record tells
    them apart, and such a kill is followed by one at the next sync (`killed_in_commit`). The
    ledger line lists where each kill landed.
    """
    config = agent_config(tmp_path, broker, keys, simulated(), mqtt={"keepalive": "1s"})
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    landed = []
    db_path = tmp_path / "buffer.db"
    async with VerifyProcess(broker, keys, tmp_path) as verify:
        broker.stop()
        for n in (15, 6, 25):
            killed_in_commit(agent, n, tmp_path / f"write-{n}", landed)
            # Inside an append's commit: its frames are in the WAL, but the witness (written
            # when a commit returns) is behind them.
            _, sealed = sealed_in_store(db_path)
            assert sealed > witness_seq(db_path), f"{landed}: not inside an append's commit"
        backlog = Taken.from_store(db_path).total
        broker.start()
        one_at_a_time = {"keepalive": "1s", "max_inflight": 1}  # a delete for each PUBACK
        agent.write_config(
            agent_config(tmp_path, broker, keys, simulated(interval="1h"), mqtt=one_at_a_time)
        )
        for n in (5, 8, 12):
            killed_in_commit(agent, n, tmp_path / f"delete-{n}", landed)
        agent.write_config(config)
        await asyncio.to_thread(agent.start)
        await wait_for(lambda: buffered(agent) < 2000, 60, "the backlog to ship")
        ledger = await drained_ledger(
            verify,
            agent,
            "agent killed inside a commit",
            notes=f"fdatasync kills {' '.join(landed)} (writes, then deletes); backlog={backlog}",
        )
    assert len(ledger.per_epoch) == 1 and "Quarantined" not in agent.log()
    ledger.check()


async def test_resets_and_half_open_links(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """Through the tests' TCP proxy: RSTs (the broker's side kept half-open, then reset too),
    then a silent path (nothing passes, nothing closes) for 8 s, then restored."""
    async with FaultProxy(broker.port) as proxy, VerifyProcess(broker, keys, tmp_path) as verify:
        config = agent_config(
            tmp_path, broker, keys, simulated(),
            mqtt={"url": f"mqtt://127.0.0.1:{proxy.port}", "keepalive": "2s"},
        )  # fmt: skip
        agent = AgentProcess(config, tmp_path)
        agents.append(agent)
        await asyncio.to_thread(agent.start)
        servers: tuple[Literal["keep", "reset"], ...] = ("keep", "keep", "reset")
        for server in servers:
            before = verify.progress()
            await wait_for(lambda: proxy.connections == 1, 20, "a connection through the proxy")
            proxy.reset(server=server)
            await wait_for(lambda b=before: verify.progress() > b + 2000, 30, "readings again")
        accepted = proxy.accepted
        proxy.silence()
        silenced_at = time.monotonic()
        await wait_for(lambda: not agent.status()["mqtt"]["connected"], 20, "a dead link seen")
        noticed_s = time.monotonic() - silenced_at
        await asyncio.sleep(8.0 - (time.monotonic() - silenced_at))  # the fault's length
        backlog = buffered(agent)
        proxy.restore()
        await wait_for(
            lambda: agent.status()["mqtt"]["connected"] and buffered(agent) < 2000,
            60,
            "the backlog to ship",
        )
        ledger = await drained_ledger(
            verify,
            agent,
            "resets and a half-open link",
            notes=f"3 resets; silent 8s, seen dead after {noticed_s:.1f}s, backlog={backlog}",
        )
    assert proxy.accepted > accepted, "the agent connected again"
    ledger.check()
