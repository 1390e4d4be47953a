"""Point catalogues (contract §4.12) through the real processes under reloads, outages and kills.

Real parts: `edge-agent run` with a simulated source, a private Mosquitto, the real
`edge-agent verify --json --state`. Each case ends with its ledger (helpers/ledger.py: every
reading taken is verified or declared, lost = 0) and checks that verify received readings under
the names the reload gave, with no batch left waiting for its catalogue.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.disk import MiB, SmallDisk
from helpers.ingest import IngestWorker, ingest
from helpers.ingest_fleet import prepare_database
from helpers.ledger import Taken, VerifyProcess, drained_ledger, sealed_in_store
from helpers.postgres import PostgresServer
from helpers.verifier import VerifyProcess as AckVerify
from helpers.verifier import ledger as ack_ledger
from helpers.verifier import settled, verify_processes
from helpers.wait import wait_for
from paho.mqtt import publish

from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.keys import write_keypair

pytestmark = pytest.mark.faults


def source(points: int, counters: int = 0) -> list[dict[str, Any]]:
    """One simulated source: `points` points read every 50 ms, the first `counters` of them
    integers (`counter`), the rest floats (`random`): a reload that changes `counters` changes
    those points' types."""
    return [
        {
            "type": "simulated",
            "name": "sim",
            "interval": "50ms",
            "points": [
                {"name": f"p{i}", "signal": "counter" if i < counters else "random"}
                for i in range(points)
            ],
        }
    ]


def answers(agent: AgentProcess) -> bool:
    """Whether the agent's /status answers (it is not ready while the broker is down)."""
    try:
        agent.status()
    except OSError:
        return False
    return True


def published_catalogues(log: str) -> set[str]:
    return set(re.findall(r"Published point catalogue digest=([0-9a-f]{32})", log))


async def test_reloads_that_add_points_and_change_types_during_an_outage_lose_nothing(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    agent = AgentProcess(agent_config(tmp_path, broker, keys, source(20)), tmp_path)
    agents.append(agent)
    async with VerifyProcess(broker, keys, tmp_path) as verify:
        agent.start()
        await wait_for(lambda: verify.progress() > 500, 30, "first readings")
        broker.stop()
        steps = [source(30), source(30, counters=10), source(45, counters=25), source(10)]
        for sources in steps:
            sealed = agent.status()["buffer"]["next_seq"]
            agent.write_config({**agent.config, "sources": sources})
            assert "Reloaded" in agent.reload()
            await wait_for(
                lambda s=sealed: agent.status()["buffer"]["next_seq"] > s + 2000,
                30,
                "readings of the reloaded points",
            )
        broker.start()
        await wait_for(
            lambda: (
                agent.status()["mqtt"]["connected"] and agent.status()["buffer"]["readings"] < 1000
            ),
            60,
            "the backlog sent",
        )
        catalogues = published_catalogues(agent.log())
        ledger = await drained_ledger(
            verify, agent, "reloads adding points and types, broker down",
            notes=f"catalogues={len(catalogues)};",
        )  # fmt: skip
    ledger.check()
    err = verify.err.read_text()
    assert "PENDING CATALOGUE" not in err and "INCOMPLETE" not in err, err[-2000:]
    assert len(catalogues) <= 2 * len(steps) + 1, f"catalogue churn: {len(catalogues)}"


async def test_an_agent_killed_as_new_points_appear_sends_every_batch_with_its_catalogue(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """SIGKILL right after reloads that make new catalogues, the broker down: every buffered
    batch's catalogue is in the buffer after the restart and goes out before it."""
    agent = AgentProcess(agent_config(tmp_path, broker, keys, source(5)), tmp_path)
    agents.append(agent)
    taken = Taken()

    def up() -> bool:
        return answers(agent)

    async with VerifyProcess(broker, keys, tmp_path) as verify:
        agent.start()
        await wait_for(lambda: verify.progress() > 100, 30, "first readings")
        broker.stop()
        for points in (8, 12, 16):
            sealed = agent.status()["buffer"]["next_seq"]
            agent.write_config({**agent.config, "sources": source(points)})
            assert "Reloaded" in agent.reload()
            await wait_for(
                lambda s=sealed: agent.status()["buffer"]["next_seq"] > s + 50,
                30,
                "readings of the new points",
            )
            assert agent.process is not None
            agent.stop(signal.SIGKILL)
            taken.add(*sealed_in_store(Path(agent.config["store"]["path"])))
            agent.spawn()
            await wait_for(up, 20, "the restarted agent's /status")
        broker.start()
        ledger = await drained_ledger(verify, agent, "SIGKILL as new points appear", taken=taken)
    ledger.check()
    assert "undeliverable" not in agent.log()
    err = verify.err.read_text()
    assert "PENDING CATALOGUE" not in err and "INCOMPLETE" not in err, err[-2000:]


async def test_end_to_end_broker_killed_with_its_retained_catalogues_verify_ends_complete(
    tmp_path: Path, keys: Path, agents: list[AgentProcess]
) -> None:
    """end_to_end mode, verify running: the broker SIGKILLed (autosave every 30 min, so it loses
    its retained catalogues, verify's session and what it queued) right after a reload made a
    new catalogue. Everything unacknowledged is sent again with its catalogue: verify ends with
    exit 0, nothing pending for a catalogue, lost 0."""
    consumer = tmp_path / "consumer"
    write_keypair(consumer)
    (tmp_path / "mosquitto").mkdir()
    broker = Mosquitto(directory=tmp_path / "mosquitto", extra_config="autosave_interval 1800\n")
    broker.start()
    with verify_processes() as register:
        try:
            verify = register(AckVerify(broker, keys, tmp_path, ack_key=consumer / "signing.key"))
            verify.start()
            mqtt = {"ack": "end_to_end", "ack_keys": [str(consumer / "signing.pub")],
                    "ack_timeout": "2s"}  # fmt: skip
            config = agent_config(tmp_path, broker, keys, source(10), mqtt=mqtt)
            agent = AgentProcess(config, tmp_path)
            agents.append(agent)
            agent.start()
            epoch = agent.status()["buffer"]["epoch"]
            await wait_for(lambda: verify.stream(epoch).max_seq > 400, 20, "first readings")
            agent.write_config({**config, "sources": source(25, counters=10)})
            assert "Reloaded" in agent.reload()
            sealed = agent.status()["buffer"]["next_seq"]
            await wait_for(
                lambda: agent.status()["buffer"]["next_seq"] > sealed + 300, 20, "new points"
            )
            process = broker._process  # noqa: SLF001 - a SIGKILL, no save: a test-only fault
            assert process is not None
            process.kill()
            process.wait()
            broker._process = None  # noqa: SLF001
            broker.start()
            agent.write_config({**config, "sources": [{**source(1)[0], "interval": "1h"}]})
            assert "Reloaded" in agent.reload()
            taken = await settled(agent, verify, epoch, timeout=60)
            code = verify.stop()
            assert agent.stop() == 0
        finally:
            broker.stop()
    lost = ack_ledger(
        "end_to_end, broker SIGKILLed with its catalogues", taken, verify.stream(epoch)
    )
    log = verify.log()
    assert (lost, code) == (0, 0), log[-3000:]
    assert "PENDING CATALOGUE" not in log, log[-3000:]


async def test_ingest_two_workers_postgresql_down_as_a_new_catalogue_comes_and_one_killed(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """The real agent into two real `ingest run` workers: PostgreSQL stopped (immediate) while a
    reload makes a new catalogue (it reaches both workers while neither can store it), one worker
    SIGKILLed meanwhile, PostgreSQL back, the worker back: every reading sealed is stored once,
    under the name and type the reload gave, nothing parked, `ingest report` exit 0."""
    with PostgresServer() as server:
        dsn = server.create_database("flow")
        prepare_database(dsn, keys=[("test-gw", keys / "signing.pub")])
        workers = [
            IngestWorker(
                tmp_path,
                "--dsn",
                dsn,
                "--url",
                broker.url,
                "--topic-prefix",
                "site/test",
                "--client-id",
                name,
                name=name,
            )  # fmt: skip
            for name in ("w1", "w2")
        ]
        try:
            for worker in workers:
                worker.start()
            agent = AgentProcess(agent_config(tmp_path, broker, keys, source(10)), tmp_path)
            agents.append(agent)
            agent.start()
            await wait_for(lambda: stored(dsn) > 500, 30, "first readings stored")
            server.stop("immediate")
            agent.write_config({**agent.config, "sources": source(25, counters=10)})
            assert "Reloaded" in agent.reload()
            sealed = agent.status()["buffer"]["next_seq"]
            await wait_for(
                lambda: agent.status()["buffer"]["next_seq"] > sealed + 2000, 30, "new points"
            )
            assert workers[0].stop(signal.SIGKILL) == -signal.SIGKILL
            agent.write_config({**agent.config, "sources": [{**source(1)[0], "interval": "1h"}]})
            assert "Reloaded" in agent.reload()
            await wait_for(lambda: agent.status()["buffer"]["readings"] == 0, 30, "all sent")
            server.start()
            workers[0].start()
            epoch, last = sealed_in_store(Path(agent.config["store"]["path"]))
            await wait_for(lambda: stored(dsn) >= last, 60, "every reading stored")
            for worker in workers:
                assert worker.stop() == 0
            assert agent.stop() == 0
            totals = rows(dsn, "SELECT count(*), count(DISTINCT seq) FROM readings")[0]
            parked = rows(dsn, "SELECT count(*) FROM parked")[0][0]
            ints = rows(
                dsn,
                "SELECT count(*) FROM readings WHERE pt = 'p3' AND seq > %s"
                " AND v_num <> trunc(v_num)",
                sealed + 200,
            )[0][0]
            points = {r[0] for r in rows(dsn, "SELECT DISTINCT pt FROM readings")}
            report = ingest("report", "--dsn", dsn)
        finally:
            for worker in workers:
                if worker.process is not None:
                    worker.stop(signal.SIGKILL)
    print(f"\nLEDGER ingest, PostgreSQL down as a catalogue comes: taken={last} stored={totals}")
    assert totals == (last, last), f"taken={last} stored={totals}"
    assert parked == 0
    assert points == {f"p{i}" for i in range(25)}, points
    assert ints == 0, "p3 is a counter after the reload: integers"
    assert report.returncode == 0, report.stdout + report.stderr
    assert "PARKED" not in report.stdout, report.stdout


def stored(dsn: str) -> int:
    try:
        return int(rows(dsn, "SELECT count(*) FROM readings")[0][0])
    except psycopg.OperationalError:
        return 0


def rows(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


async def test_a_retained_catalogue_cleared_at_the_broker_is_published_again_on_reconnect(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """An operator clears the retained catalogue (an empty retained message) while batches that
    reference it are still to come; after the agent's next connection a consumer that
    subscribes late decodes them: the catalogue was published again, retained."""
    agent = AgentProcess(agent_config(tmp_path, broker, keys, source(10)), tmp_path)
    agents.append(agent)
    agent.start()
    await wait_for(lambda: published_catalogues(agent.log()), 20, "the catalogue published")
    (digest,) = published_catalogues(agent.log())
    publish.single(
        f"site/test/test-gw/catalogue/{digest}", b"", qos=1, retain=True,
        hostname="127.0.0.1", port=broker.port,
    )  # fmt: skip
    broker.stop()
    await wait_for(lambda: agent.status()["buffer"]["readings"] > 200, 20, "a backlog")
    broker.start()
    await wait_for(
        lambda: agent.status()["mqtt"]["connected"] and agent.status()["buffer"]["readings"] < 50,
        30,
        "the backlog sent",
    )
    async with VerifyProcess(broker, keys, tmp_path, name="late") as verify:
        await wait_for(lambda: verify.progress() > 300, 20, "readings decoded by a late consumer")
        verify.stop()
    err = verify.err.read_text()
    assert "PENDING CATALOGUE" not in err, err[-2000:]


async def test_verify_ends_on_sigterm_and_duration_while_the_agent_keeps_sending(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """`verify` runs 'until SIGINT, SIGTERM, --duration or --count' (contract §1): with a live
    agent publishing a batch every 200 ms it must end all the same, writing its state and
    printing its summary. (It kept draining as long as a message came within 0.3 s: behind a
    busy broker it never ended, and systemd's SIGKILL then lost the whole run's state.)"""
    agent = AgentProcess(agent_config(tmp_path, broker, keys, source(10)), tmp_path)
    agents.append(agent)
    agent.start()
    state = tmp_path / "verify-duration.json"
    command = [
        sys.executable, "-m", "edge_agent", "verify", "--url", broker.url, "--topic",
        "site/test/#", "--key", str(keys / "signing.pub"), "--client-id", "duration",
        "--state", str(state), "--quiet",
    ]  # fmt: skip
    ran = subprocess.run([*command, "--duration", "2"], capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert "verify ran" in ran.stderr, ran.stderr[-2000:]
    assert float(re.findall(r"verify ran ([\d.]+)s", ran.stderr)[0]) < 10, ran.stderr[-2000:]
    assert state.exists()
    with (tmp_path / "verify-term.err").open("wb") as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err)
    try:
        await wait_for(
            lambda: broker.log_path.read_text().count(" duration 1 site/test/#") >= 2,
            20,
            "verify's subscription",
        )
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert code in (0, 4), (tmp_path / "verify-term.err").read_text()[-2000:]
    assert "verify ran" in (tmp_path / "verify-term.err").read_text()


async def test_verify_keeps_what_it_had_queued_when_the_broker_restarts_under_its_backlog(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """verify comes back to a backlog of batches its session kept, and the broker restarts
    (cleanly) while verify works through it: what paho had already PUBACKed and queued is
    not sent again, so it must be verified, not dropped with the old connection (a hole in
    broker mode, where nobody sends it again). Measured: held before the change to consume()
    too (the queue was empty when the connection dropped): it guards the promise, it does not
    tell the versions apart."""
    config = agent_config(tmp_path, broker, keys, source(200), batch={"max_readings": 100})
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    async with VerifyProcess(broker, keys, tmp_path) as verify:
        verify.stop()  # its session keeps the batches from now on
        agent.start()
        await wait_for(lambda: agent.status()["buffer"]["next_seq"] > 60_000, 60, "a backlog")
        assert agent.stop() == 0
        taken = Taken.from_store(Path(config["store"]["path"]))
        await verify.start()
        await wait_for(lambda: verify.progress() > 2000, 30, "verify under way")
        broker.stop()
        broker.start()
        await verify.collect(taken)
        ledger = verify.ledger("broker restarted under verify's backlog", taken)
    ledger.check()


async def test_reloads_that_add_points_on_a_full_disk_evict_and_declare_lose_nothing(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """A 2 MiB tmpfs buffer, the broker down, full: reloads add points (a new catalogue each,
    whose room is made by evicting the oldest batches). When room and the broker return, every
    reading is verified or declared evicted, under the catalogues the buffer kept."""
    disk = SmallDisk(tmp_path / "disk", 2 * MiB)
    try:
        config = agent_config(
            tmp_path, broker, keys, source(300), store={"path": str(disk.path / "buffer.db")}
        )
        agent = AgentProcess(config, tmp_path)
        agents.append(agent)
        async with VerifyProcess(broker, keys, tmp_path) as verify:
            broker.stop()
            agent.start()
            await wait_for(lambda: agent.status()["buffer"]["disk_full"], 60, "a full disk")
            for points in (320, 340, 360):
                sealed = agent.status()["buffer"]["next_seq"]
                agent.write_config(
                    {**agent.config, "sources": source(points, counters=points // 3)}
                )
                assert "Reloaded" in agent.reload()
                await wait_for(
                    lambda s=sealed: agent.status()["buffer"]["next_seq"] > s + 20_000,
                    30,
                    "readings of the new points on the full disk",
                )
            assert agent.status()["buffer"]["evicted_readings"] > 0
            disk.grow(16 * MiB)
            await wait_for(lambda: not agent.status()["buffer"]["disk_full"], 20, "room")
            broker.start()
            ledger = await drained_ledger(verify, agent, "reloads adding points on a full disk")
    finally:
        disk.unmount()
    ledger.check()
    assert ledger.declared > 0 and ledger.declared_lost == 0, "evicted and declared, not lost"
    assert "undeliverable" not in agent.log()
    err = verify.err.read_text()
    assert "PENDING CATALOGUE" not in err and "INCOMPLETE" not in err, err[-2000:]
