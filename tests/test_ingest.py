"""`edge-agent ingest` on real parts: its own Mosquitto, its own PostgreSQL, the real CLI process.

Each case checks what a plant's IT team relies on: every reading in `readings` once, replays
that change nothing, refused batches recorded and never stored, a report that says the truth.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers.fleet import Fleet, Message, publish, taken
from helpers.ingest import IngestWorker, ingest
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.reading import Quality, Reading
from edge_agent.seal.ack import Ack, AckOpener
from edge_agent.seal.keys import key_id, load_public_key, write_keypair

pytestmark = pytest.mark.integration

PREFIX = "site/fleet"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def rows(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def count(dsn: str, sql: str, *params: Any) -> int:
    return int(rows(dsn, sql, *params)[0][0])


@pytest.fixture
def database(postgres_dsn: str) -> str:
    done = ingest("migrate", "--dsn", postgres_dsn)
    assert done.returncode == 0, done.stderr
    return postgres_dsn


@pytest.fixture
def fleet(tmp_path: Path, database: str) -> Fleet:
    """Two gateways (payload formats 1 and 2), their keys enrolled."""
    made = Fleet(tmp_path / "fleet", gateways=2, payload_format=0, points=7)
    for gateway, pem in made.key_files():
        added = ingest("keys", "add", "--dsn", database, "--gateway", gateway, "--key", str(pem))
        assert added.returncode == 0, added.stderr
        assert added.stdout.strip() == key_id(load_public_key(pem)).hex()
    return made


@pytest.fixture
def worker(tmp_path: Path, broker: Mosquitto, database: str) -> Iterator[IngestWorker]:
    write_keypair(tmp_path / "consumer")
    with IngestWorker(
        tmp_path,
        "--dsn", database, "--url", broker.url, "--topic-prefix", PREFIX,
        "--ack-key", str(tmp_path / "consumer" / "signing.key"), "--client-id", "ingest-test",
    ) as running:  # fmt: skip
        yield running


async def stored(dsn: str, expected: int, what: str) -> None:
    await wait_for(lambda: count(dsn, "SELECT count(*) FROM readings") >= expected, 30, what)


async def test_every_reading_lands_once_and_replays_change_nothing(
    tmp_path: Path, broker: Mosquitto, database: str, fleet: Fleet, worker: IngestWorker
) -> None:
    messages = fleet.seal_rounds(5, 300)
    publish(broker.url, messages)
    expected = taken(messages)
    total = sum(len(s) for s in expected.values())
    await stored(database, total, "every reading in the table")
    for (gateway, epoch), seqs in expected.items():
        got = [r[0] for r in rows(
            database, "SELECT seq FROM readings WHERE gateway = %s AND epoch = %s ORDER BY seq",
            gateway, epoch,
        )]  # fmt: skip
        assert got == sorted(seqs)
    report = ingest("report", "--dsn", database)
    assert report.returncode == 0, report.stdout + report.stderr
    assert "OK:" in report.stdout

    # The values, as sealed, queryable without our code.
    sample = fleet.members[0].readings(20, 1_700_000_000_123_456_789)
    by_kind = rows(
        database,
        "SELECT v_num, v_bool, v_text, q, sc, ts_ns, ts FROM readings"
        " WHERE gateway = %s ORDER BY seq LIMIT 20",
        fleet.members[0].gateway_id,
    )
    for reading, (v_num, v_bool, v_text, q, sc, ts_ns, ts) in zip(sample, by_kind, strict=True):
        assert q == reading.quality.value
        assert sc == reading.code
        assert (ts - EPOCH) // timedelta(microseconds=1) == ts_ns // 1000  # exact to the µs
        if isinstance(reading.value, bool):
            assert v_bool is reading.value or v_bool == reading.value
        elif isinstance(reading.value, str):
            assert v_text.startswith("state-")
        elif reading.value is None:
            assert (v_num, v_bool, v_text) == (None, None, None)
        else:
            assert v_num is not None and v_bool is None and v_text is None

    # Replays (at least once delivery, a redelivery after a crash) change nothing.
    before = rows(database, "SELECT count(*), sum(seq), max(ts_ns) FROM readings")
    publish(broker.url, messages)
    await wait_for(
        lambda: count(database, "SELECT sum(duplicates) FROM coverage") >= total,
        30, "the replays counted as duplicates",
    )  # fmt: skip
    assert rows(database, "SELECT count(*), sum(seq), max(ts_ns) FROM readings") == before
    assert count(database, "SELECT count(*) FROM rejected") == 0


async def test_the_acknowledgement_says_what_is_committed(
    tmp_path: Path, broker: Mosquitto, database: str, fleet: Fleet, worker: IngestWorker
) -> None:
    gateway = fleet.members[0]
    messages = [gateway.seal(50) for _ in range(3)]
    publish(broker.url, messages)
    await stored(database, 150, "the three batches")
    consumer = load_public_key(tmp_path / "consumer" / "signing.pub")
    acks: list[Ack] = []

    def newest_ack() -> bool:
        payload = broker_retained(broker, f"{PREFIX}/{gateway.gateway_id}/ack")
        if payload is None:
            return False
        ack = AckOpener([consumer]).open(payload)  # the agent's own check of an ack
        acks.append(ack)
        return ack.seqs == ((1, 150),)

    await wait_for(newest_ack, 20, "a retained acknowledgement of seq 1..150")
    ack = acks[-1]
    assert ack.gateway == gateway.gateway_id and ack.epoch == gateway.epoch
    assert ack.batches == ((1, 3),)
    assert abs(ack.issued_ns - time.time_ns()) < 60e9


def broker_retained(broker: Mosquitto, topic: str) -> bytes | None:
    """The retained message on `topic`, read by a fresh subscriber (None when there is none)."""
    import paho.mqtt.client as mqtt
    import paho.mqtt.subscribe as subscribe

    try:
        message = subscribe.simple(
            topic, hostname="127.0.0.1", port=broker.port, retained=True,
            protocol=mqtt.MQTTv5, keepalive=5,
        )  # fmt: skip
    except Exception:  # noqa: BLE001 - nothing retained yet: simple() waits; see timeout below
        return None
    return message.payload if message is not None else None  # type: ignore[union-attr]


async def test_refused_batches_are_recorded_and_never_stored(
    tmp_path: Path, broker: Mosquitto, database: str, fleet: Fleet, worker: IngestWorker
) -> None:
    gateway = fleet.members[0]
    good = gateway.seal(10)
    tampered = bytearray(gateway.seal(10).payload)
    tampered[-5] ^= 0xFF  # inside the signature
    stranger = Fleet(tmp_path / "stranger", gateways=1, points=3).members[0]
    stranger.gateway_id = gateway.gateway_id  # claims the enrolled gateway, signs with its own key
    unknown = stranger.sealer.seal(
        gateway=gateway.gateway_id, epoch=gateway.epoch, batch=99, first_seq=100,
        readings=stranger.readings(5, time.time_ns()), sealed_ns=time.time_ns(),
    )  # fmt: skip
    nan = gateway.sealer.seal(
        gateway=gateway.gateway_id, epoch=gateway.epoch, batch=gateway.next_batch,
        first_seq=gateway.next_seq, sealed_ns=time.time_ns(),
        readings=[Reading("plc0", "p", time.time_ns(), math.nan, Quality.GOOD)],
    )  # fmt: skip
    topic = gateway.topic
    publish(broker.url, [
        good,
        Message(topic, bytes(tampered), gateway.gateway_id, gateway.epoch, 2, 11, 10),
        Message(topic, unknown, gateway.gateway_id, gateway.epoch, 99, 100, 5),
        Message(topic, nan, gateway.gateway_id, gateway.epoch, 3, 21, 1),
    ])  # fmt: skip
    await wait_for(
        lambda: count(database, "SELECT count(*) FROM rejected") >= 3, 30, "three rejections"
    )
    reasons = sorted(r[0] for r in rows(database, "SELECT reason FROM rejected"))
    assert reasons == ["bad_signature", "nonconforming", "unknown_key"]
    assert [r[0] for r in rows(database, "SELECT DISTINCT seq / 100 FROM readings")] == [0]
    assert count(database, "SELECT count(*) FROM readings") == 10  # the good batch alone
    assert count(database, "SELECT max(payload_bytes) FROM rejected") > 0


def test_migrate_is_idempotent(database: str) -> None:
    again = ingest("migrate", "--dsn", database)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert rows(database, "SELECT version FROM schema_version") == [(1,)]


async def test_keys_retired_refuse_and_report_shows_holes(
    tmp_path: Path, broker: Mosquitto, database: str, fleet: Fleet, worker: IngestWorker
) -> None:
    gateway = fleet.members[0]
    first = gateway.seal(10)
    gateway.skip(5)  # seq 11..15 never sent: a hole
    second = gateway.seal(10)
    publish(broker.url, [first, second])
    await stored(database, 20, "both batches")
    report = ingest("report", "--dsn", database)
    assert report.returncode == 4, report.stdout
    assert f"HOLE: gateway={gateway.gateway_id}" in report.stdout and "11..15" in report.stdout

    listed = ingest("keys", "list", "--dsn", database).stdout
    assert gateway.kid.hex() in listed and "active" in listed
    assert ingest("keys", "retire", "--dsn", database, "--kid", gateway.kid.hex()).returncode == 0
    assert (
        "retired"
        in ingest("keys", "list", "--dsn", database, "--gateway", gateway.gateway_id).stdout
    )
    publish(broker.url, [gateway.seal(10)])
    await wait_for(
        lambda: count(database, "SELECT count(*) FROM rejected WHERE reason = 'key_not_valid'"),
        30, "the retired key's batch refused",
    )  # fmt: skip
    assert count(database, "SELECT count(*) FROM readings") == 20
