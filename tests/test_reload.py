"""Reload on SIGHUP (docs/contract.md §1): the real `edge-agent run` process re-reads its file.

What an operator relies on: a valid edit applies sources, intervals, the log level and the signing
key while the agent runs, with every sealed reading delivered exactly once (no hole, no duplicate)
across it; an invalid edit is refused with its located problems and the agent runs on unchanged;
keys that need a restart are named. Also the log formats as the process writes them.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.notify import NotifySocket
from helpers.ports import free_port
from helpers.processes import forked_child
from helpers.wait import deadline, wait_for

from edge_agent.consumer.verify import Verifier, consume, consumer_client
from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.envelope import Batch, Opener
from edge_agent.seal.keys import key_id, load_public_key, write_keypair

pytestmark = pytest.mark.e2e


def sealed_count(db_path: Path) -> int:
    with sqlite3.connect(db_path) as db:
        (next_seq,) = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    return int(next_seq) - 1


@asynccontextmanager
async def verifier_for(broker: Mosquitto, *key_dirs: Path) -> AsyncIterator[tuple[Verifier, set]]:
    """A verifier trusting each key pair in `key_dirs`; also collects the key ids it saw."""
    verifier = Verifier(Opener([load_public_key(d / "signing.pub") for d in key_dirs]))
    kids: set[bytes] = set()

    def on_batch(batch: Batch | None, fresh: list[dict[str, Any]]) -> None:
        if batch is not None:
            kids.add(batch.kid)

    stop, subscribed = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        consume(
            verifier,
            lambda: consumer_client(broker.url, f"verifier-{broker.port}"),
            "site/test/#",
            on_batch,
            stop,
            subscribed=subscribed,
        )
    )
    async with deadline(10, "the verifier's subscription"):
        await subscribed.wait()
    try:
        yield verifier, kids
    finally:
        stop.set()
        async with deadline(10, "the verifier to stop"):
            await task


def sim(name: str, interval: str, points: int = 3) -> dict[str, Any]:
    return {"type": "simulated", "name": name, "interval": interval, "points": points}


async def test_reload_applies_sources_intervals_level_and_key_losing_nothing(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    config = agent_config(
        tmp_path, broker, keys, [sim("steady", "100ms"), sim("slow", "1s"), sim("gone", "100ms")]
    )
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    new_keys = tmp_path / "new-keys"
    write_keypair(new_keys)
    async with verifier_for(broker, keys, new_keys) as (verifier, kids):
        agent.start()
        await wait_for(lambda: verifier.result.readings > 100, 20, "first readings")
        steady_before = agent.status()["sources"]["steady"]["readings"]

        config["sources"] = [sim("steady", "100ms"), sim("slow", "100ms"), sim("added", "100ms")]
        config["signing"] = {"key_file": str(new_keys / "signing.key")}
        config["log"] = {"level": "debug"}
        config["mqtt"] = {**config["mqtt"], "keepalive": "20s"}  # needs a restart
        agent.write_config(config)
        lines = agent.reload()

        assert "sources+=added" in lines and "sources-=gone" in lines
        assert "sources~=slow" in lines, "a changed interval restarts that source"
        assert "signing.key" in lines and "log.level" in lines
        assert "need a restart to apply keys=mqtt.keepalive" in lines
        assert "category=key outcome=success action=rotated" in lines, "one audited key path"
        assert "category=reload outcome=success" in lines
        assert "steady" not in lines.split("Reloaded", 1)[1], "an unchanged source runs on"
        status = agent.status()
        assert set(status["sources"]) == {"steady", "slow", "added"}
        assert status["sources"]["steady"]["readings"] >= steady_before, "not restarted"
        # The new interval applies: `slow` now yields 3 readings per 100 ms, not per second.
        await wait_for(
            lambda: agent.status()["sources"]["slow"]["readings"] >= 30, 10, "the new interval"
        )
        await wait_for(lambda: agent.status()["sources"]["added"]["up"], 10, "the added source")
        new_kid = key_id(load_public_key(new_keys / "signing.pub"))
        await wait_for(lambda: new_kid in kids, 10, "batches signed with the new key")

        assert agent.stop() == 0, agent.log()
        sealed = sealed_count(tmp_path / "buffer.db")
        [stream] = verifier.tracker.streams.values()
        await wait_for(lambda: stream.readings >= sealed, 30, "every sealed reading")
    assert kids == {key_id(load_public_key(keys / "signing.pub")), new_kid}
    assert verifier.result.rejected == 0
    assert stream.max_seq == sealed and stream.holes() == [], "nothing dropped"
    assert stream.duplicates == 0, "nothing re-sent"
    assert "DEBUG" in agent.log(), "the new log level applies"


async def test_invalid_reload_is_refused_with_located_problems_and_the_agent_runs_on(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """Buffered readings (the broker is away) survive a refused and then an applied reload."""
    config = agent_config(tmp_path, broker, keys, [sim("a", "100ms")])
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    agent.start()
    broker.stop()
    await wait_for(lambda: agent.status()["buffer"]["readings"] > 50, 20, "a backlog")
    before = agent.status()["buffer"]

    text = agent.path.read_text()
    agent.write_config(text.replace("interval: 100ms", "interval: soon") + "bogus: 1\n")
    lines = agent.reload()
    assert "Reload refused, running configuration kept" in lines
    problems = [line for line in lines.splitlines() if "problem=" in line]
    assert any("agent.yaml:" in p and "sources[0].interval" in p for p in problems), lines
    assert any("bogus: unknown key" in p for p in problems), lines
    assert "category=config outcome=refused" in lines
    assert "category=reload outcome=refused" in lines
    assert "Traceback" not in lines
    after = agent.status()
    assert after["sources"]["a"]["up"], "the running configuration is kept"
    assert after["buffer"]["epoch"] == before["epoch"]
    assert after["buffer"]["readings"] >= before["readings"], "nothing buffered is dropped"

    agent.write_config(text.replace("interval: 100ms", "interval: 50ms"))
    assert "sources~=a" in agent.reload()
    assert agent.status()["buffer"]["readings"] >= before["readings"]
    missing = tmp_path / "no-such.key"
    config["signing"] = {"key_file": str(missing)}
    agent.write_config(config)
    lines = agent.reload()
    assert "Reload refused" in lines and f"file not found: {missing}" in lines
    assert "category=config outcome=refused" in lines, "the key's file is checked as at start"
    assert agent.status()["ready"]
    assert agent.stop() == 0, agent.log()


async def test_journal_and_json_formats_from_the_running_agent(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """Under journald (JOURNAL_STREAM names stderr): `<N>` prefixes and no timestamps of ours."""
    journal_dir, json_dir = tmp_path / "journal", tmp_path / "json"
    journal_dir.mkdir()
    json_dir.mkdir()
    log_path = journal_dir / "agent.log"
    log_path.touch()
    stat = os.stat(log_path)
    config = agent_config(journal_dir, broker, keys, [sim("a", "100ms")])
    journal = AgentProcess(
        config, journal_dir, env={"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
    )
    agents.append(journal)
    journal.start()
    assert journal.stop() == 0
    lines = journal.log().splitlines()
    assert lines and all(line[:3] in ("<6>", "<4>", "<3>", "<7>") for line in lines), lines
    assert any(line.startswith("<6>edge_agent.agent: Started gateway=test-gw") for line in lines)
    assert not any(line[3:7].isdigit() for line in lines), "no timestamp of our own"

    config = agent_config(json_dir, broker, keys, [sim("a", "100ms")])
    shipped = AgentProcess(config, json_dir, args=("--log-format", "json"))
    agents.append(shipped)
    shipped.start()
    assert shipped.stop() == 0
    entries = [json.loads(line) for line in shipped.log().splitlines()]
    assert any(e["message"].startswith("Started gateway=test-gw") for e in entries)
    assert {e["level"] for e in entries} <= {"debug", "info", "warning", "error"}


def modbus(name: str, port: int, unit: int, points: int) -> dict[str, Any]:
    """A Modbus source of `points` uint16 registers from 0, written as one block."""
    point = {"name": "r{address}", "register": "holding", "address": 0, "type": "uint16"}
    return {"type": "modbus", "name": name, "host": "127.0.0.1", "port": port, "unit_id": unit,
            "timeout": "200ms", "points": [{**point, "count": points}]}  # fmt: skip


def test_modbus_sources_are_read_in_a_child_process_at_start_and_at_reload(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """The file is read and validated in a child process (edge_agent/config/isolated.py) that
    hands back each Modbus source's points by column: the sources get every point, a reload
    tells a changed source from an unchanged one as before. (No device answers: a source runs,
    and logs its start, whether its device is there or not.)"""
    port = free_port()
    config = agent_config(
        tmp_path, broker, keys, [modbus("same", port, 1, 500), modbus("grown", port, 2, 100)]
    )
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    agent.start()
    started = agent.log()
    assert "device=same unit=1" in started and "points=500 requests=4" in started, started
    assert "device=grown unit=2" in started and "points=100 requests=1" in started, started

    config["sources"][1] = modbus("grown", port, 2, 250)
    agent.write_config(config)
    lines = agent.reload()
    assert "applied=sources~=grown" in lines, "only the changed source restarts"
    assert "device=grown unit=2" in lines and "points=250 requests=2" in lines, lines
    assert "device=same" not in lines
    assert "applied=nothing changed" in agent.reload(), "the same file is the same sources"
    assert "Configuration read in process" not in agent.log()
    assert agent.stop() == 0, agent.log()


def test_a_stop_during_a_reload_ends_the_agent_without_applying_it(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """SIGTERM while a reload's child process still reads the file (systemctl stop right after
    systemctl reload): the agent stops cleanly, the reload is dropped, and the reload's child
    is gone with the agent. It once applied the reload after the sources had been stopped,
    started them again, and never exited."""
    config = agent_config(tmp_path, broker, keys, [sim("a", "100ms")])
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    agent.start()
    config["sources"].append(sim("b", "100ms"))
    agent.write_config(config)
    assert agent.process is not None
    agent.process.send_signal(signal.SIGHUP)
    reader = forked_child(agent.process.pid, timeout=10)  # a fresh interpreter: ~0.5 s to import
    assert agent.stop(timeout=20) == 0, agent.log()
    log = agent.log()
    assert "Stopped cleanly" in log
    assert "Reloaded" not in log and "Source added by reload" not in log, log
    assert "Reload dropped: the agent is stopping" in log, log
    assert not Path(f"/proc/{reader}").exists(), "the reload's child outlived the agent"


def test_after_a_reload_systemd_status_counts_the_new_sources(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """READY=1 after a reload carries a STATUS= line of the configuration just applied (what
    `systemctl status` shows): it once counted the sources from before the reload ("0 of 1
    sources up" after reloading to 10 sources) until the next periodic update."""
    notify = NotifySocket()
    try:
        config = agent_config(tmp_path, broker, keys, [sim("s0", "100ms")])
        agent = AgentProcess(config, tmp_path, env=notify.env)
        agents.append(agent)
        agent.start()
        ready = notify.wait_for(lambda m: "READY=1" in m, 10, "READY=1 at start")
        assert "of 1 sources up" in ready, ready
        config["sources"] = [sim(f"s{i}", "100ms") for i in range(10)]
        agent.write_config(config)
        assert "Reloaded" in agent.reload(), agent.log()
        notify.wait_for(lambda m: "RELOADING=1" in m, 10, "RELOADING=1")
        ready = notify.wait_for(lambda m: "READY=1" in m, 10, "READY=1 after the reload")
        assert re.search(r"STATUS=.*; \d+ of 10 sources up;", ready), ready
        assert agent.stop() == 0, agent.log()
    finally:
        notify.close()
