"""A stop during start-up (docs/contract.md §1, `run`): the real `edge-agent run` process.

After the configuration is read and before the agent runs, start-up can take long: the buffer's
integrity check reads the whole file (13 s at 512 MB from a cold page cache). A SIGTERM or
SIGINT then (systemctl stop while it starts) must end it as a stop does later: exit 0, the step
logged, the buffer closed and whole, no child left. It was killed by the signal's default action
(exit status -15).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.notify import NotifySocket
from helpers.ports import free_port
from helpers.processes import children

from edge_agent.demo.broker import Mosquitto
from edge_agent.store.sqlite import SealedBatch, Store

pytestmark = pytest.mark.e2e

MIB = 192
BATCH_BYTES = 2048
PER_APPEND = 1024 * 1024 // BATCH_BYTES
BATCHES = MIB * PER_APPEND
"""192 MiB of 2 KiB batches (the agent's are a few KiB): about 3 s to check from a cold cache
on this machine's disk (1.2 s to make). Large batches check ten times faster: the check walks
every cell, and a large batch is one cell with a chain of overflow pages read ahead."""


async def fill(path: Path) -> str:
    """A real buffer of BATCHES batches of random bytes, through the store's own API (its
    schema, counters and witness), PER_APPEND in one transaction; returns its epoch."""
    store = Store(path, max_bytes=4 * MIB * 1024 * 1024, max_age_s=86400.0)
    await store.open()
    try:
        for _ in range(MIB):
            data, now = os.urandom(PER_APPEND * BATCH_BYTES), time.time_ns()
            batch, seq = store.next_batch, store.next_seq
            await store.append(
                [
                    SealedBatch(
                        batch + i, seq + i, 1, now, data[i * BATCH_BYTES : (i + 1) * BATCH_BYTES]
                    )
                    for i in range(PER_APPEND)
                ]
            )
        return store.epoch
    finally:
        await store.close()


def drop_from_page_cache(path: Path) -> None:
    """The file's pages out of the page cache (written back first): its next read comes from the
    disk, as at a gateway's boot. Only this file's pages: the rest of the machine is untouched."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_while_the_buffer_is_checked_ends_the_agent_cleanly(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess], stop: int
) -> None:
    """The stop lands in the buffer's check (the agent has announced it, to systemd and in its
    log): exit 0 soon after, the step logged, nothing started; a restart runs on the buffer as it
    was. (No broker listens at mqtt.url: the restarted agent keeps what it buffered.)"""
    buffer = tmp_path / "buffer.db"
    epoch = asyncio.run(fill(buffer))
    drop_from_page_cache(buffer)
    sim = {"type": "simulated", "name": "sim", "interval": "1s", "points": 2}
    config = agent_config(
        tmp_path, broker, keys, [sim], mqtt={"url": f"mqtt://127.0.0.1:{free_port()}"}
    )
    notify = NotifySocket()
    try:
        agent = AgentProcess(config, tmp_path, env=notify.env)
        agents.append(agent)
        process = agent.spawn()
        notify.wait_for(lambda m: "STATUS=Checking the buffer" in m, 30, "of the buffer's check")
        assert children(process.pid) == [], "the configuration's reader is gone by now"
        began = time.monotonic()
        assert agent.stop(stop, timeout=30) == 0, agent.log()
        took = time.monotonic() - began
    finally:
        notify.close()
    log = agent.log()
    name = signal.Signals(stop).name
    assert "Checking the buffer" in log, log
    assert f"Stopped during start-up step=checking the buffer signal={name}" in log, log
    assert "Started" not in log and "Traceback" not in log, log
    assert took < 2.0, f"the check was not interrupted: stopped in {took:.1f}s"
    # The buffer's own files only (no quarantined copy); a -wal, if the check's read-only
    # connection left one, empty: nothing was written
    left = {p.name for p in tmp_path.iterdir() if p.name.startswith("buffer.db")}
    assert left <= {f"buffer.db{s}" for s in ("", "-committed", "-reserve", "-wal", "-shm")}, left
    wal = tmp_path / "buffer.db-wal"
    assert not wal.exists() or wal.stat().st_size == 0

    agent.start()
    buffered = agent.status()["buffer"]
    assert (buffered["epoch"], buffered["batches"]) == (epoch, BATCHES), buffered
    assert "Quarantined" not in agent.log()
    assert agent.stop() == 0, agent.log()
