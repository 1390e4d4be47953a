"""The real `edge-agent run` process under store faults: a full disk, a removed -wal, a bad file.

Real parts throughout: the agent process, a private Mosquitto, the real `edge-agent verify`
process, a tmpfs mounted by the test (root; unmounted in teardown), SIGKILL. The cases that
carry readings end with their ledger (helpers/ledger.py: lost = 0; what a full disk evicts is
declared, what a bad store loses is declared lost). The figures the issue asks for (time to
degrade after the disk fills, time to resume after room returns) are in the disk-full ledger.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers.agent import AgentProcess, agent_config, random_source
from helpers.disk import MiB, SmallDisk
from helpers.ledger import Taken, VerifyProcess, drained_ledger, sealed_in_store
from helpers.verifier import status_command
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.errors import StoreError
from edge_agent.store.sqlite import Store

pytestmark = pytest.mark.faults


def status_output(agent: AgentProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "status", "--url", agent.health_url],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[SmallDisk]:
    small = SmallDisk(tmp_path / "disk", 4 * MiB)
    yield small
    small.unmount()


async def test_full_disk_degrades_evicts_declares_and_resumes(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess], disk: SmallDisk
) -> None:
    config = agent_config(
        tmp_path, broker, keys, random_source(), store={"path": str(disk.path / "buffer.db")}
    )
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    async with VerifyProcess(broker, keys, tmp_path) as verify:
        agent.start()
        assert agent.process is not None
        pid = agent.process.pid
        await wait_for(lambda: verify.progress() > 1000, 30, "first readings")
        broker.stop()
        await wait_for(lambda: agent.status()["buffer"]["readings"] > 20_000, 30, "a backlog")

        filled_at = time.monotonic()
        filler = disk.fill()
        await wait_for(lambda: agent.status()["buffer"]["disk_full"], 20, "degraded health")
        degraded_s = time.monotonic() - filled_at
        report = status_output(agent)
        assert report.returncode == 1 and "buffer disk full" in report.stderr

        # It keeps taking readings, evicting the oldest: declared, never a stall.
        sealed = agent.status()["buffer"]["next_seq"]
        await wait_for(
            lambda: agent.status()["buffer"]["next_seq"] > sealed + 30_000, 30, "more readings"
        )
        status = agent.status()
        assert status["buffer"]["evicted_readings"] > 0
        assert status["buffer"]["held_back_s"] < 2.0
        assert status["sources"]["sim"]["up"]

        # The broker is back, the disk still full: acknowledged batches are deleted.
        broker.start()
        await wait_for(
            lambda: (
                agent.status()["mqtt"]["connected"]
                and agent.status()["buffer"]["readings"] < 10_000
            ),
            30,
            "the backlog to ship and be deleted",
        )
        status = agent.status()
        assert status["buffer"]["disk_full"], "the disk is still full and health says so"
        assert not any("cannot" in p for p in status["buffer"]["problems"])
        assert status_command(agent) == 1

        freed_at = time.monotonic()
        filler.unlink()
        await wait_for(lambda: status_command(agent) == 0, 20, "healthy again")
        resumed_s = time.monotonic() - freed_at
        evicted = agent.status()["buffer"]["evicted_readings"]
        assert agent.process.pid == pid, "the agent never restarted"
        ledger = await drained_ledger(
            verify,
            agent,
            "disk full (4 MiB tmpfs, broker down)",
            notes=f"degraded after {degraded_s:.2f}s, healthy {resumed_s:.2f}s after room"
            " returned;",
        )
    ledger.check()
    assert ledger.declared + ledger.declared_received == evicted > 0, "declared, not lost"
    assert ledger.declared_lost == 0
    log = agent.log()
    assert "Traceback" not in log
    assert log.count("Disk full: using the reserve") == 1, "one line per change of state"
    assert "Disk space available again" in log


async def test_buffer_alone_fills_a_2mib_disk_with_the_broker_down(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """The issue's case as measured: 2 MiB tmpfs, broker down, the backlog fills the disk."""
    disk = SmallDisk(tmp_path / "disk", 2 * MiB)
    try:
        config = agent_config(
            tmp_path, broker, keys, random_source(), store={"path": str(disk.path / "buffer.db")}
        )
        agent = AgentProcess(config, tmp_path)
        agents.append(agent)
        async with VerifyProcess(broker, keys, tmp_path) as verify:
            broker.stop()
            agent.start()
            await wait_for(lambda: agent.status()["buffer"]["disk_full"], 30, "a full disk")
            report = status_output(agent)
            assert report.returncode == 1 and "buffer disk full" in report.stderr
            sealed = agent.status()["buffer"]["next_seq"]
            await wait_for(
                lambda: agent.status()["buffer"]["next_seq"] > sealed + 50_000,
                30,
                "readings taken on the full disk",
            )
            status = agent.status()
            assert status["buffer"]["evicted_readings"] > 0
            assert status["buffer"]["held_back_s"] < 2.0, "the source is not stalled"
            disk.grow(16 * MiB)
            await wait_for(lambda: not agent.status()["buffer"]["disk_full"], 20, "room")
            broker.start()
            await wait_for(lambda: status_command(agent) == 0, 30, "healthy")
            ledger = await drained_ledger(verify, agent, "disk full (2 MiB tmpfs alone)")
    finally:
        disk.unmount()
    ledger.check()
    assert ledger.declared > 0 and ledger.declared_lost == 0, "evicted and declared, not lost"
    assert agent.log().count("Buffer full or expired") + agent.log().count("Disk full:") < 30, (
        "evictions are summed up, not one line each"
    )


async def test_wal_removed_after_sigkill_is_declared_lost(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """The issue's case: broker down, SIGKILL, `rm buffer.db-wal`, start again.

    The ledger counts the old epoch's readings that never left as declared lost (the new
    epoch's first batch declares the old one ended), apart from evictions.
    """
    config = agent_config(tmp_path, broker, keys, random_source(), mqtt={"keepalive": "1s"})
    db_path = tmp_path / "buffer.db"
    first = AgentProcess(config, tmp_path)
    agents.append(first)
    async with VerifyProcess(broker, keys, tmp_path) as verify:
        first.start()
        old_epoch = first.status()["buffer"]["epoch"]
        await wait_for(lambda: verify.progress() > 1000, 30, "first readings")
        broker.stop()
        await wait_for(lambda: first.status()["buffer"]["readings"] > 30_000, 30, "a backlog")
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        epoch, last_seq = sealed_in_store(db_path)
        assert epoch == old_epoch
        taken = Taken()
        taken.add(old_epoch, last_seq)
        wal = Path(f"{db_path}-wal")
        assert wal.stat().st_size > 0
        wal.unlink()
        broker.start()

        second = AgentProcess(config, tmp_path)
        agents.append(second)
        second.start()
        [quarantine] = second.status()["buffer"]["quarantined"]
        assert quarantine["epoch"] == old_epoch and quarantine["last_seq"] == last_seq
        assert "went backwards" in quarantine["reason"]
        new_epoch = second.status()["buffer"]["epoch"]
        assert new_epoch != old_epoch
        assert "moved aside" in status_output(second).stdout
        before = verify.progress()
        await wait_for(lambda: verify.progress() > before + 1000, 30, "the new epoch's readings")
        ledger = await drained_ledger(
            verify, second, "corrupt store at start (-wal removed after SIGKILL)", taken=taken
        )
    ledger.check()
    old_taken, old_received, old_declared = ledger.per_epoch[old_epoch]
    assert ledger.declared_lost == old_declared == last_seq - old_received > 10_000, (
        "the unreceived tail is declared lost"
    )
    summary = verify.err.read_text().split("verify ran")[-2]  # its last run's summary
    [line] = [line for line in summary.splitlines() if line.startswith("LOST:")]
    assert f"epoch={old_epoch}" in line and f"readings={old_declared}" in line
    assert "quarantined" in line and "went backwards" in line
    assert "Quarantined a bad buffer" in second.log()
    assert list(tmp_path.glob("buffer.db.corrupt-*")), "the old file is kept"


async def test_random_bytes_as_buffer_are_quarantined_at_start(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    (tmp_path / "buffer.db").write_bytes(random.Random(7).randbytes(8192))
    agent = AgentProcess(agent_config(tmp_path, broker, keys, random_source(10)), tmp_path)
    agents.append(agent)
    agent.start()
    [quarantine] = agent.status()["buffer"]["quarantined"]
    assert "not a database" in quarantine["reason"]
    assert Path(quarantine["moved_to"]).read_bytes() == random.Random(7).randbytes(8192)
    with urllib.request.urlopen(f"{agent.health_url}/metrics", timeout=5) as response:
        assert "edge_agent_store_quarantined_total 1.0" in response.read().decode()
    assert agent.stop() == 0


def run_once(agent: AgentProcess) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(agent.path)],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip


def random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(8192))


def healthy_store(path: Path) -> None:
    """A sound store without its reserve: opening it read-only fails after the connection."""

    async def create() -> None:
        store = Store(path, max_bytes=MiB, max_age_s=60)
        await store.open()
        await store.close()
        store.reserve_path.unlink()

    asyncio.run(create())


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        # The bytes, made a failure: quarantine is impossible on a read-only disk.
        (random_bytes, "cannot move the bad buffer"),
        # A sound file the agent cannot write: fails after the store's thread started.
        (healthy_store, "unable to open database file"),
    ],
)
def test_a_store_that_cannot_be_opened_exits_1_with_one_line(
    tmp_path: Path,
    broker: Mosquitto,
    keys: Path,
    content: Callable[[Path], None],
    expected: str,
) -> None:
    disk = SmallDisk(tmp_path / "disk", 2 * MiB)
    try:
        content(disk.path / "buffer.db")
        disk.make_read_only()
        config = agent_config(
            tmp_path, broker, keys, random_source(10), store={"path": str(disk.path / "buffer.db")}
        )
        started = time.monotonic()
        result = run_once(AgentProcess(config, tmp_path))
        took = time.monotonic() - started
    finally:
        disk.unmount()
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    audits = [line for line in lines if " Audit " in line]
    [line] = [line for line in lines if line not in audits]
    assert "Could not start" in line and re.search(expected, line) and "buffer.db" in line
    if content is random_bytes:  # the quarantine was attempted: a security-relevant failure
        [event] = audits
        assert "category=store outcome=failure action=quarantined" in event
    else:
        assert audits == []
    assert took < 15, f"exited after {took:.1f}s"


def test_a_buffer_path_that_is_a_directory_exits_1_at_once(
    tmp_path: Path, broker: Mosquitto, keys: Path
) -> None:
    """Another instance: any error while opening the store ends the process with one line."""
    (tmp_path / "buffer.db").mkdir()
    config = agent_config(tmp_path, broker, keys, random_source(10))
    result = run_once(AgentProcess(config, tmp_path))
    assert result.returncode == 1, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Could not start" in line and "buffer.db" in line


async def test_a_failed_open_stops_the_stores_thread(tmp_path: Path) -> None:
    """The root of the hang: a failure after the connection's thread started must stop it."""
    disk = SmallDisk(tmp_path / "disk", 2 * MiB)
    try:
        await asyncio.to_thread(healthy_store, disk.path / "buffer.db")
        disk.make_read_only()
        store = Store(disk.path / "buffer.db", max_bytes=MiB, max_age_s=60)
        with pytest.raises(StoreError, match="unable to open database file"):
            await store.open()
        await wait_for(
            lambda: not [t for t in threading.enumerate() if "connection_worker" in t.name],
            5,
            "the store's thread to end",
        )
    finally:
        disk.unmount()
