"""`edge-agent ingest` on real parts: its own Mosquitto, its own PostgreSQL, the real CLI process.

Each case checks what a plant's IT team relies on: every reading in `readings` once, replays
that change nothing, refused batches recorded and never stored, a report that says the truth.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers.fleet import Fleet, Message, Publisher, SimulatedGateway, publish, taken
from helpers.ingest import IngestWorker, ingest
from helpers.ports import free_port
from helpers.wait import wait_for

from edge_agent.consumer.ingest import keystore
from edge_agent.consumer.ingest.decode import Accepted, Decoder
from edge_agent.consumer.ingest.write import write_group
from edge_agent.demo.broker import Mosquitto
from edge_agent.reading import Quality, Reading
from edge_agent.seal.ack import Ack, AckOpener
from edge_agent.seal.hwm import HighWaterMark
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
    as_json = json.loads(ingest("report", "--dsn", database, "--json").stdout)
    assert sorted(s["readings"] for s in as_json["streams"]) == sorted(
        len(s) for s in expected.values()
    )
    assert as_json["gaps"] == [] and as_json["rejected"] == {}

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
        lambda: count(database, "SELECT coalesce(sum(duplicates), 0) FROM coverage") >= total,
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


async def test_the_acknowledgement_includes_what_another_worker_committed(
    tmp_path: Path, broker: Mosquitto, database: str, fleet: Fleet
) -> None:
    """A worker's acknowledgement is the ledger as committed when it publishes, not as its own
    last COMMIT left it: a retained ack is never replaced by an older, smaller one."""
    write_keypair(tmp_path / "consumer")
    consumer = load_public_key(tmp_path / "consumer" / "signing.pub")
    gateway = fleet.members[0]
    topic = f"{PREFIX}/{gateway.gateway_id}/ack"
    first, second, third = (gateway.seal(50) for _ in range(3))

    def retained_ack() -> Ack | None:
        payload = broker_retained(broker, topic)
        return None if payload is None else AckOpener([consumer]).open(payload)

    with IngestWorker(
        tmp_path, "--dsn", database, "--url", broker.url, "--topic-prefix", PREFIX,
        "--ack-key", str(tmp_path / "consumer" / "signing.key"), "--client-id", "w-acks",
        "--ack-interval", "5",
    ):  # fmt: skip
        publish(broker.url, [first])
        await wait_for(lambda: (a := retained_ack()) is not None and a.seqs == ((1, 50),), 20,
                       "the first acknowledgement, of seq 1..50")  # fmt: skip
        publish(broker.url, [second])  # committed at once; its ack waits for the interval
        await stored(database, 100, "the second batch")
        await commit_as_another_worker(database, third)  # seq 101..150, batch 3
        await wait_for(lambda: (a := retained_ack()) is not None and a.seqs == ((1, 150),), 20,
                       "an acknowledgement of the ledger as committed, seq 1..150")  # fmt: skip
        ack = retained_ack()
        assert ack is not None and ack.batches == ((1, 3),)


async def commit_as_another_worker(dsn: str, message: Message) -> None:
    """`message` decoded and written as any worker writes it (write_group), from this process."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        trust = keystore.load_trust(conn)
    item = Decoder(trust, PREFIX).decode(message.topic, message.payload)
    assert isinstance(item, Accepted), item
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        await write_group(conn, [item], 1000)


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
    assert rows(database, "SELECT version FROM schema_version ORDER BY 1") == [(1,), (2,), (3,)]


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


async def test_two_workers_share_the_stream_and_merge_one_ledger(
    tmp_path: Path, broker: Mosquitto, database: str, fleet: Fleet
) -> None:
    """Batches of one epoch reach either worker, replays too: every reading once, ledger whole."""
    common = ("--dsn", database, "--url", broker.url, "--topic-prefix", PREFIX, "--max-group", "4")
    with (
        IngestWorker(tmp_path, *common, "--client-id", "w1", name="w1") as one,
        IngestWorker(tmp_path, *common, "--client-id", "w2", name="w2") as two,
    ):
        messages = fleet.seal_rounds(40, 50)
        publish(broker.url, messages + messages[::-1])  # each batch twice, in both orders
        expected = taken(messages)
        total = sum(len(s) for s in expected.values())
        written = "SELECT coalesce(sum(readings + duplicates), 0) FROM coverage"
        await wait_for(
            lambda: count(database, written) >= 2 * total, 60, "every batch and its replay written"
        )
    logs = one.log() + two.log()  # each says what it did when it stops
    handled = [int(m) for m in re.findall(r"Ingest stopped messages=(\d+)", logs)]
    assert len(handled) == 2 and all(handled), logs  # the group was shared
    assert sum(handled) == 2 * len(messages)
    assert count(database, "SELECT count(*) FROM readings") == total
    assert count(database, "SELECT sum(readings) FROM coverage") == total
    for (gateway, epoch), seqs in expected.items():
        ledger = rows(
            database, "SELECT received::text, batches::text FROM coverage"
            " WHERE gateway = %s AND epoch = %s", gateway, epoch,
        )  # fmt: skip
        assert ledger == [(f"{{[1,{max(seqs) + 1})}}", "{[1,41)}")]
    assert ingest("report", "--dsn", database).returncode == 0
    assert "Traceback" not in logs


def signed_mark(gateway: SimulatedGateway, seq: int, batch: int) -> bytes:
    """A high-water mark as the agent publishes it (seal/hwm.py), signed by `gateway`."""
    mark = HighWaterMark(gateway.gateway_id, gateway.epoch, seq, batch, time.time_ns())
    return mark.seal(gateway.sealer.signer)


async def test_the_report_tells_holes_from_declared_evictions_tails_and_ended_epochs(
    tmp_path: Path, broker: Mosquitto, database: str, fleet: Fleet, worker: IngestWorker
) -> None:
    gateway = fleet.members[0]
    sent = [gateway.seal(10)]  # 1..10
    evicted = gateway.skip(10)  # 11..20, declared below
    sent.append(gateway.seal(10))  # 21..30
    sent.append(gateway.declare([evicted], ["retention"]))
    ended_epoch = gateway.epoch
    gateway.skip(5)  # 31..35: sealed, never arrives; the epoch then ends
    mark = signed_mark(gateway, 35, gateway.next_batch - 1)
    publish(broker.url, sent)
    with Publisher(broker.url) as publisher:
        publisher.publish([Message(f"{PREFIX}/{gateway.gateway_id}/hwm", mark, "", "", 0, 0, 0)])
    await wait_for(
        lambda: count(database, "SELECT count(*) FROM hwm") == 1
        and count(database, "SELECT count(*) FROM evictions") == 1,
        30, "the mark and the eviction stored",
    )  # fmt: skip
    report = ingest("report", "--dsn", database)
    assert report.returncode == 0, report.stdout  # a tail is not a hole while the epoch lives
    assert "NOT YET RECEIVED" in report.stdout and "31..35" in report.stdout
    assert rows(database, "SELECT first_seq, last_seq, reason FROM evictions") == [
        (11, 20, "retention")
    ]

    # The gateway's buffer is replaced: the next epoch declares the old one ended at 35.
    gateway.new_epoch()
    first_of_new = gateway.sealer.seal(
        gateway=gateway.gateway_id, epoch=gateway.epoch, batch=1, first_seq=1,
        readings=gateway.readings(5, time.time_ns()), sealed_ns=time.time_ns(),
        previous_epoch={"epoch": ended_epoch, "last_seq": 35, "ended": "replaced",
                        "detail": "test"},
    )  # fmt: skip
    publish(
        broker.url,
        [Message(gateway.topic, first_of_new, gateway.gateway_id, gateway.epoch, 1, 1, 5)],
    )
    await wait_for(
        lambda: count(database, "SELECT count(*) FROM epoch_ends") == 1, 30, "the epoch's end"
    )
    report = ingest("report", "--dsn", database)
    assert report.returncode == 0, report.stdout
    assert "LOST:" in report.stdout and "31..35" in report.stdout and "replaced" in report.stdout

    # A plain hole (a batch that never arrived, undeclared) fails the report.
    gateway.next_seq, gateway.next_batch = 6, 2  # after the batch sealed by hand above
    gateway.skip(5)
    publish(broker.url, [gateway.seal(5)])
    await wait_for(
        lambda: count(database, "SELECT count(*) FROM ingest_gaps WHERE kind = 'hole'") == 1,
        30, "the hole seen",
    )  # fmt: skip
    report = ingest("report", "--dsn", database)
    assert report.returncode == 4 and "HOLE:" in report.stdout and "6..10" in report.stdout


def test_a_worker_refuses_a_database_it_was_not_migrated_for(
    tmp_path: Path, broker: Mosquitto, postgres_dsn: str
) -> None:
    worker = ingest("run", "--dsn", postgres_dsn, "--url", broker.url, timeout=60)
    assert worker.returncode == 1
    assert "schema version 0" in worker.stderr and "ingest migrate" in worker.stderr
    missing = ingest("run", "--url", broker.url)
    assert missing.returncode == 2 and "--dsn" in missing.stderr
    down = ingest("migrate", "--dsn", f"host=127.0.0.1 port={free_port()} user=x dbname=x")
    assert down.returncode == 1 and "cannot reach PostgreSQL" in down.stderr


async def test_known_epochs_draw_no_new_stream_numbers(
    broker: Mosquitto, database: str, fleet: Fleet, worker: IngestWorker
) -> None:
    """Every group names the epochs it writes; only a new one takes a number (no exhaustion)."""
    publish(broker.url, fleet.seal_rounds(30, 10))
    await stored(database, 600, "every batch")
    numbers = rows(database, "SELECT max(stream), count(*) FROM coverage")
    assert numbers == [(2, 2)]
