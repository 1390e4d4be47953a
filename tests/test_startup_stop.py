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

BATCHES = 192
BATCH_BYTES = 1024 * 1024
"""192 MiB of batches: about 3 s to check from a cold cache on this machine's disk (68 MB/s)."""


async def fill(path: Path, batches: int, size: int) -> str:
    """A real buffer of `batches` batches of `size` random bytes each, through the store's own
    API (its schema, counters and witness); returns its epoch."""
    store = Store(path, max_bytes=4 * batches * size, max_age_s=86400.0)
    await store.open()
    try:
        for _ in range(batches):
            batch = SealedBatch(
                store.next_batch, store.next_seq, 1, time.time_ns(), os.urandom(size)
            )
            await store.append([batch])
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
    epoch = asyncio.run(fill(buffer, BATCHES, BATCH_BYTES))
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
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("buffer.db"))
    assert left == ["buffer.db", "buffer.db-committed", "buffer.db-reserve"], left

    agent.start()
    buffered = agent.status()["buffer"]
    assert (buffered["epoch"], buffered["batches"]) == (epoch, BATCHES), buffered
    assert "Quarantined" not in agent.log()
    assert agent.stop() == 0, agent.log()
