"""`edge-agent ingest` while its PostgreSQL goes away: it waits, acknowledges nothing it did not
commit, stops promptly when told, and resumes with nothing lost and nothing twice."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import paho.mqtt.subscribe as subscribe
import psycopg
import pytest
from helpers.fleet import Fleet, publish
from helpers.ingest import IngestWorker, ingest
from helpers.postgres import PostgresServer
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.ack import Ack, AckOpener
from edge_agent.seal.keys import load_public_key, write_keypair

pytestmark = pytest.mark.faults

PREFIX = "site/fleet"


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """A server of this test's own: the test crashes it."""
    with PostgresServer() as own:
        yield own


def stored(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True, connect_timeout=2) as conn:
        row = conn.execute("SELECT count(*) FROM readings").fetchone()
    return int(row[0]) if row else 0


def retained_ack(broker: Mosquitto, topic: str, opener: AckOpener) -> Ack:
    message = subscribe.simple(
        topic, hostname="127.0.0.1", port=broker.port, retained=True, protocol=mqtt.MQTTv5
    )
    return opener.open(message.payload)  # type: ignore[union-attr]


async def test_database_down_nothing_acknowledged_then_everything_stored_once(
    tmp_path: Path, broker: Mosquitto, server: PostgresServer
) -> None:
    dsn = server.create_database("ingest")
    assert ingest("migrate", "--dsn", dsn).returncode == 0
    gateway = Fleet(tmp_path / "fleet", gateways=1, points=5).members[0]
    key = str(gateway.public_key_path)
    assert (
        ingest(
            "keys", "add", "--dsn", dsn, "--gateway", gateway.gateway_id, "--key", key
        ).returncode
        == 0
    )
    write_keypair(tmp_path / "consumer")
    opener = AckOpener([load_public_key(tmp_path / "consumer" / "signing.pub")])
    ack_topic = f"{PREFIX}/{gateway.gateway_id}/ack"
    with IngestWorker(
        tmp_path,
        "--dsn", dsn, "--url", broker.url, "--topic-prefix", PREFIX, "--client-id", "w",
        "--ack-key", str(tmp_path / "consumer" / "signing.key"),
    ) as worker:  # fmt: skip
        publish(broker.url, [gateway.seal(100)])
        await wait_for(lambda: stored(dsn) == 100, 30, "the first batch stored")
        await wait_for(
            lambda: retained_ack(broker, ack_topic, opener).seqs == ((1, 100),), 30, "its ack"
        )

        server.stop(mode="immediate")  # as a crash: no shutdown checkpoint
        publish(broker.url, [gateway.seal(100) for _ in range(5)])  # 101..600, at the broker
        await wait_for(
            lambda: "Ingest waits for PostgreSQL" in worker.log(), 30, "the worker waiting"
        )
        assert retained_ack(broker, ack_topic, opener).seqs == ((1, 100),)  # nothing more

        # Stopped meanwhile, it ends at once; back with the same session, it is sent again
        # what it never acknowledged.
        assert worker.stop(timeout=10) == 0
        server.start()
        worker.start()
        await wait_for(lambda: stored(dsn) == 600, 60, "every batch stored after the outage")
        await wait_for(
            lambda: retained_ack(broker, ack_topic, opener).seqs == ((1, 600),), 30,
            "the acknowledgement of everything",
        )  # fmt: skip
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.execute(
            "SELECT count(DISTINCT seq), min(seq), max(seq) FROM readings"
        ).fetchone() == (600, 1, 600)
    assert ingest("report", "--dsn", dsn).returncode == 0


async def test_broker_restarted_under_the_worker(
    tmp_path: Path, broker: Mosquitto, postgres_dsn: str
) -> None:
    dsn = postgres_dsn
    assert ingest("migrate", "--dsn", dsn).returncode == 0
    gateway = Fleet(tmp_path / "fleet", gateways=1, points=5).members[0]
    key = str(gateway.public_key_path)
    added = ingest("keys", "add", "--dsn", dsn, "--gateway", gateway.gateway_id, "--key", key)
    assert added.returncode == 0
    common = ("--dsn", dsn, "--url", broker.url, "--topic-prefix", PREFIX, "--client-id", "w")
    with IngestWorker(tmp_path, *common) as worker:
        publish(broker.url, [gateway.seal(50)])
        await wait_for(lambda: stored(dsn) == 50, 30, "the first batch stored")
        broker.stop()
        await wait_for(lambda: "Ingest lost the broker" in worker.log(), 30, "the loss noticed")
        broker.start()  # the same port and persistence: the worker's session is there
        await wait_for(lambda: worker.log().count("Ingest subscribed") == 2, 30, "resubscribed")
        publish(broker.url, [gateway.seal(50)])
        await wait_for(lambda: stored(dsn) == 100, 30, "the batch after the restart stored")
    assert "Traceback" not in worker.log()
