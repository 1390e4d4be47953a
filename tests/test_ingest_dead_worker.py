"""A worker SIGKILLed and never restarted: the agents' `end_to_end` re-sends bring its share in.

docs/cloud.md ("A dead worker's share"): Mosquitto 2.0 keeps a disconnected persistent member of
a shared subscription in the group, and goes on queueing its share of the batches in its
session; nothing hands them to the live workers. Agents in `mqtt.ack: end_to_end` mode send
again whatever no consumer acknowledged within `mqtt.ack_timeout`, a re-send is dispatched to a
member afresh, and so the dead worker's share still reaches a live worker, from the agents'
buffers, and is stored once.

All real: Mosquitto, PostgreSQL (helpers/postgres.py), two `edge-agent ingest run` workers of
one group, two `edge-agent run` agents with a simulated source. One worker is SIGKILLed while
PostgreSQL shows its COPY running (its group's transaction open, its messages not PUBACKed),
and stays dead; the agents seal MORE readings each after that, are stopped, and drained by a
run with an idle source (every sealed batch acknowledged end to end). Then: each agent's sealed
seqs (its buffer file) are in `readings` exactly once, `coverage` holds them all, `ingest
report` exits 0. Non-vacuous: the dead worker's session is taken over at the end and must hold
batches sealed after the kill (batches it never saw, whose readings therefore reached the
database only through a re-send to the live worker), and the agents must have re-sent.
"""

from __future__ import annotations

import re
import threading
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import psycopg
import pytest
from helpers.agent import AgentProcess
from helpers.fleet import agent_fleet
from helpers.ingest_fleet import FleetWorker, kill_mid_copy, ledger, prepare_database, report
from helpers.ledger import sealed_in_store
from helpers.wait import wait_for
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.consumer.catalogues import CatalogueBook, is_catalogue_topic
from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.catalogue import CatalogueMissingError
from edge_agent.seal.envelope import Batch, Opener
from edge_agent.seal.keys import load_public_key, write_keypair

pytestmark = pytest.mark.faults

PREFIX = "site/dead"
ACK_TIMEOUT = "2s"
MORE = 3000
"""Readings each agent seals after the kill (about 7.5 s at 20 points every 50 ms)."""
_RESENT = re.compile(r"^edge_agent_batches_resent_total (\S+)$", re.MULTILINE)
_STOPPED = re.compile(r"Stopped cleanly buffered_readings=(\d+)")


def resent(agent: AgentProcess) -> int:
    """The agent's `edge_agent_batches_resent_total` (this run's: a counter starts at 0)."""
    with urllib.request.urlopen(f"{agent.health_url}/metrics", timeout=5) as response:
        found = _RESENT.search(response.read().decode())
    assert found is not None, "no edge_agent_batches_resent_total in /metrics"
    return int(float(found.group(1)))


def stop_counting(agent: AgentProcess) -> int:
    """Read the run's re-sends, then stop the agent cleanly (exit 0); the re-sends."""
    count = resent(agent)
    assert agent.stop() == 0, agent.log()[-3000:]
    return count


def drained(agent: AgentProcess) -> bool:
    """Nothing left in the buffer: every sealed batch acknowledged end to end and deleted."""
    status = agent.status()
    return bool(status["buffer"]["batches"] == 0 and status["mqtt"]["ack"]["unacked_batches"] == 0)


def held_in_session(broker: Mosquitto, client_id: str, keys: Opener) -> list[Batch]:
    """Take over the session of `client_id` (clean start off) and return the batches the broker
    held in it, opened (every copy: a batch re-sent to the dead member again is there twice).

    The broker sends a resumed session's queued messages right after CONNACK (its in-flight
    window is unlimited), before a message published later to this client: a marker it
    publishes to itself, once its own subscription is in place, ends the wait. The agents'
    point catalogues (§4.12) come retained with the subscription to them, before the marker;
    a batch held before its catalogue is parked until it comes (consumer/catalogues.py).
    """
    batches: list[Batch] = []
    book = CatalogueBook(keys.catalogues)
    marker = f"probe/{client_id}/end"
    subscribed, ended = threading.Event(), threading.Event()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        if message.topic == marker:
            ended.set()
        elif is_catalogue_topic(message.topic):
            batches.extend(keys.open(held.payload) for held in book.add(message.topic, payload))
        elif message.topic.endswith("/batch"):
            try:
                batches.append(keys.open(payload))
            except CatalogueMissingError as exc:
                book.park(message.topic, payload, exc.digest)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect("127.0.0.1", broker.port, clean_start=False)
    client.loop_start()
    try:
        client.subscribe([(marker, 1), (f"{PREFIX}/+/catalogue/+", 1)])
        assert subscribed.wait(10), "no SUBACK for the marker"
        client.publish(marker, b"end", qos=1)
        assert ended.wait(30), "the marker did not come back"
    finally:
        client.disconnect()
        client.loop_stop()
    assert not book.pending(), f"held batches whose catalogue never came: {book.pending()}"
    return batches


async def test_a_worker_killed_for_good_loses_nothing_with_end_to_end_agents(
    tmp_path: Path, broker: Mosquitto, postgres_dsn: str, agents: list[AgentProcess]
) -> None:
    dsn = postgres_dsn
    write_keypair(tmp_path / "consumer")
    e2e = {
        "ack": "end_to_end",
        "ack_keys": [str(tmp_path / "consumer/signing.pub")],
        "ack_timeout": ACK_TIMEOUT,
    }
    agents += agent_fleet(tmp_path / "agents", broker, 2, prefix=PREFIX, interval="50ms", mqtt=e2e)
    agent_keys = [
        (a.config["gateway"]["id"], Path(a.config["signing"]["key_file"]).with_name("signing.pub"))
        for a in agents
    ]
    prepare_database(dsn, keys=agent_keys)
    live, victim = (
        FleetWorker(broker, dsn, tmp_path / "w", client_id=f"ingest-{n}", topic_prefix=PREFIX,
                    ack_key=tmp_path / "consumer/signing.key")
        for n in range(2)
    )  # fmt: skip
    resends = 0
    try:
        live.start()
        victim.start()
        for agent in agents:
            agent.start()
        await wait_for(
            lambda: all(a.status()["mqtt"]["ack"]["deleted_batches"] > 0 for a in agents),
            30,
            "rows flowing: both agents' batches acknowledged end to end",
        )

        # SIGKILL in the middle of a group: PostgreSQL shows the victim's COPY running, its
        # transaction open, its messages neither committed nor PUBACKed. It is not restarted.
        await kill_mid_copy(dsn, victim, "the victim in the middle of a COPY")
        # Seqs from here on were sealed after the kill: the dead worker never saw them.
        after_kill = [a.status()["buffer"]["next_seq"] for a in agents]

        await wait_for(
            lambda: all(
                a.status()["buffer"]["next_seq"] >= start + MORE
                for a, start in zip(agents, after_kill, strict=True)
            ),
            30,
            f"{MORE} readings more sealed by each agent",
        )
        for agent in agents:
            resends += stop_counting(agent)
        # Drained: started again with an idle source (a reading per point on the first tick,
        # then none for an hour), until every sealed batch is acknowledged and deleted.
        for agent in agents:
            agent.config["sources"][0]["interval"] = "1h"
            agent.write_config(agent.config)
            agent.start()
        await wait_for(
            lambda: all(drained(a) for a in agents), 45, "every sealed batch acknowledged"
        )
        for agent in agents:
            resends += stop_counting(agent)
            assert _STOPPED.findall(agent.log())[-1] == "0"

        sealed = {
            (gateway, epoch): last
            for (gateway, _), (epoch, last) in zip(
                agent_keys,
                (sealed_in_store(Path(a.config["store"]["path"])) for a in agents),
                strict=True,
            )
        }
        account = ledger(
            "ingest, 1 of 2 workers SIGKILLed for good, 2 end_to_end agents",
            dsn,
            {key: set(range(1, last + 1)) for key, last in sealed.items()},
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            for (gateway, epoch), last in sealed.items():
                assert last >= MORE
                assert conn.execute(
                    "SELECT count(*), count(DISTINCT seq), min(seq), max(seq) FROM readings"
                    " WHERE gateway = %s AND epoch = %s",
                    (gateway, epoch),
                ).fetchone() == (last, last, 1, last), gateway
                assert conn.execute(
                    "SELECT received::text, evicted::text FROM coverage"
                    " WHERE gateway = %s AND epoch = %s",
                    (gateway, epoch),
                ).fetchone() == (f"{{[1,{last + 1})}}", "{}"), gateway
            assert conn.execute("SELECT count(*) FROM rejected").fetchone() == (0,)
        outcome = report(dsn)
        assert outcome.returncode == 0, outcome.stdout + outcome.stderr
        assert live.alive()
        assert "Traceback" not in live.log()

        # Not vacuous: the dead worker's session held batches, among them batches sealed after
        # the kill, which it never saw: their readings came in through re-sends only.
        opener = Opener([load_public_key(pem) for _, pem in agent_keys])
        held = held_in_session(broker, victim.client_id, opener)
        start_of = {gateway: start for (gateway, _), start in zip(agent_keys, after_kill,
                                                                 strict=True)}  # fmt: skip
        unseen = {
            (b.gateway, b.batch): len(b.readings)
            for b in held
            if b.readings and b.readings[0]["seq"] >= start_of[b.gateway]
        }
        print(
            f"\nledger {account.line()}; the dead worker's session held {len(held)} batch "
            f"copies, {len(unseen)} batches ({sum(unseen.values())} readings) sealed after the "
            f"kill, stored through the agents' re-sends ({resends} batches re-sent)"
        )
        assert (account.lost, account.duplicates, account.verified) == (0, 0, account.taken)
        assert unseen, "the dead worker's session held no batch sealed after the kill"
        assert resends > 0
    finally:
        for agent in agents:
            if agent.process is not None:
                agent.stop()
        for worker in (live, victim):
            if worker.alive():
                worker.stop()
