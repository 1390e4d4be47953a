"""`edge-agent ingest` and point catalogues (contract §4.12), on real parts: Mosquitto, PostgreSQL
(helpers/postgres.py), the real `ingest run` processes, and batches sealed by the real
`Sealer(key, payload_format=2, catalogue=True)` (helpers/ingest_catalogue.py).

A batch that references a catalogue cannot be decoded without it; it is authentic all the same
(its signature checked). So a worker that does not have the catalogue yet parks the batch in
PostgreSQL, acknowledges it to the broker, and writes it once the catalogue is stored, by
whichever worker: never refused, never lost, never stored twice, and shown as pending meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers.fleet import Fleet, Message, publish
from helpers.ingest import READY_LINE, IngestWorker, ingest
from helpers.ingest_catalogue import (
    catalogue_fleet,
    catalogue_message,
    catalogue_of,
    catalogues_of,
    names,
    publish_catalogues,
)
from helpers.ingest_fleet import AckCollector, prepare_database
from helpers.wait import wait_for

from edge_agent.consumer.ingest import keystore, parking
from edge_agent.consumer.ingest.decode import Accepted, CatalogueItem, Decoder, Parked
from edge_agent.consumer.ingest.write import write_group, write_parked
from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.catalogue import Catalogue, catalogue_topic
from edge_agent.seal.keys import load_public_key, write_keypair

pytestmark = pytest.mark.integration

PREFIX = "site/fleet"
_STOPPED = re.compile(r"Ingest stopped messages=(\d+) .*parked=(\d+) unparked=(\d+)")


def rows(dsn: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()  # type: ignore[arg-type]


def count(dsn: str, sql: str, *params: Any) -> int:
    return int(rows(dsn, sql, *params)[0][0])


def stopped(worker: IngestWorker) -> list[tuple[int, int, int]]:
    """(messages, parked, unparked) of each run of `worker`, from its stop lines."""
    return [tuple(map(int, m)) for m in _STOPPED.findall(worker.log())]  # type: ignore[misc]


def worker(tmp_path: Path, broker: Mosquitto, dsn: str, name: str, *extra: str) -> IngestWorker:
    return IngestWorker(
        tmp_path, "--dsn", dsn, "--url", broker.url, "--topic-prefix", PREFIX,
        "--client-id", name, *extra, name=name,
    )  # fmt: skip


@pytest.fixture
def database(postgres_dsn: str) -> str:
    done = ingest("migrate", "--dsn", postgres_dsn)
    assert done.returncode == 0, done.stderr
    return postgres_dsn


def enrolled(database: str, fleet: Fleet) -> Fleet:
    with psycopg.connect(database) as conn:
        for gateway, pem in fleet.key_files():
            keystore.add_key(conn, gateway, pem)
    return fleet


def assert_stored_once_with_names(
    dsn: str,
    fleet: Fleet,
    messages: list[Message],
    known: dict[int, tuple[str, str]] | None = None,
) -> None:
    """Every reading of `messages` in `readings` exactly once, under its own point's name, and
    the ledger exact: each epoch's seqs and batch numbers, nothing counted twice. `known`: the
    names by seq of a one-gateway fleet whose points changed on the way."""
    for gateway in fleet.members:
        expected = names(gateway, messages) if known is None else known
        got = rows(dsn, "SELECT seq, src, pt FROM readings WHERE gateway = %s ORDER BY seq",
                   gateway.gateway_id)  # fmt: skip
        assert [r[0] for r in got] == sorted(expected), gateway.gateway_id
        assert {r[0]: (r[1], r[2]) for r in got} == expected
        batches = sum(1 for m in messages if m.gateway == gateway.gateway_id)
        ledger = rows(dsn, "SELECT received::text, batches::text, readings, duplicates"
                      " FROM coverage WHERE gateway = %s", gateway.gateway_id)  # fmt: skip
        assert ledger == [(f"{{[1,{len(expected) + 1})}}", f"{{[1,{batches + 1})}}",
                           len(expected), 0)]  # fmt: skip
    assert count(dsn, "SELECT count(*) FROM parked") == 0


async def test_catalogue_then_batches_two_workers_store_every_reading_once_by_name(
    tmp_path: Path, broker: Mosquitto, database: str
) -> None:
    fleet = enrolled(database, catalogue_fleet(tmp_path / "fleet", gateways=3, points=7))
    messages = fleet.seal_rounds(20, 50)
    catalogues = catalogues_of(fleet)
    assert len({m.topic for m in catalogues}) == 3  # one catalogue a gateway for all batches
    total = sum(m.count for m in messages)
    with (
        worker(tmp_path, broker, database, "w1", "--max-group", "4") as one,
        worker(tmp_path, broker, database, "w2", "--max-group", "4") as two,
    ):
        publish_catalogues(broker.url, catalogues)
        publish(broker.url, messages)
        await wait_for(lambda: count(database, "SELECT coalesce(sum(readings), 0) FROM coverage")
                       >= total, 60, "every reading stored")  # fmt: skip
    runs = stopped(one) + stopped(two)
    assert len(runs) == 2 and all(messages for messages, _, _ in runs), runs  # shared
    assert sum(m for m, _, _ in runs) == len(messages) + 2 * len(catalogues)  # each: every cat
    assert_stored_once_with_names(database, fleet, messages)
    assert sorted(bytes(d) for (d,) in rows(database, "SELECT digest FROM catalogues")) == sorted(
        catalogue_of(g).digest for g in fleet.members
    )
    assert count(database, "SELECT count(*) FROM rejected") == 0
    assert "Traceback" not in one.log() + two.log()


async def test_batches_before_their_catalogue_are_parked_acknowledged_then_stored(
    tmp_path: Path, broker: Mosquitto, database: str
) -> None:
    """Parked: PUBACKed (the worker's next session gets none of them again: nothing is counted
    twice), shown as pending by the report, acknowledged end to end only once stored."""
    fleet = enrolled(database, catalogue_fleet(tmp_path / "fleet", gateways=2, points=7))
    messages = fleet.seal_rounds(5, 40)
    write_keypair(tmp_path / "consumer")
    acks = AckCollector(broker, PREFIX, load_public_key(tmp_path / "consumer" / "signing.pub"))
    running = worker(tmp_path, broker, database, "w-park",
                     "--ack-key", str(tmp_path / "consumer" / "signing.key"))  # fmt: skip
    try:
        running.start()
        publish(broker.url, messages)
        await wait_for(lambda: count(database, "SELECT count(*) FROM parked") == len(messages),
                       30, "every batch parked")  # fmt: skip
        assert count(database, "SELECT count(*) FROM readings") == 0

        report = ingest("report", "--dsn", database)
        assert report.returncode == 0, report.stdout  # pending is not a hole
        for gateway in fleet.members:
            digest = catalogue_of(gateway).digest.hex()
            assert (f"PENDING: gateway={gateway.gateway_id} epoch={gateway.epoch} readings=200"
                    f" seq 1..200: received, parked: waits for point catalogue {digest}"
                    ) in report.stdout  # fmt: skip
            assert f"PARKED 5 batches (200 readings) of gateway={gateway.gateway_id} wait for" \
                f" point catalogue {digest}" in report.stdout  # fmt: skip
        as_json = json.loads(ingest("report", "--dsn", database, "--json").stdout)
        assert {g["kind"] for g in as_json["gaps"]} == {"pending"}
        assert running.stop() == 0
        assert stopped(running) == [(len(messages), len(messages), 0)]  # all PUBACKed
        assert acks.acks == []  # nothing acknowledged end to end while parked

        publish_catalogues(broker.url, catalogues_of(fleet))  # retained: comes at subscribe
        running.start()  # same client id: its session; the batches are not delivered again
        total = sum(m.count for m in messages)
        await wait_for(lambda: count(database, "SELECT coalesce(sum(readings), 0) FROM coverage")
                       >= total, 30, "the parked batches stored")  # fmt: skip
        assert_stored_once_with_names(database, fleet, messages)

        def acknowledged(gateway: str) -> bool:
            return any(a.gateway == gateway and a.seqs == [(1, 200)] and a.batches == [(1, 5)]
                       for a in acks.acks)  # fmt: skip

        for gateway in fleet.members:
            await wait_for(lambda g=gateway.gateway_id: acknowledged(g), 20,  # type: ignore[misc]
                           "the end-to-end acknowledgement of every batch")  # fmt: skip
        report = ingest("report", "--dsn", database)
        assert report.returncode == 0 and "PENDING" not in report.stdout, report.stdout
        assert "PARKED" not in report.stdout
        assert running.stop() == 0
        assert stopped(running)[1][2] == len(messages)  # the second run wrote them
    finally:
        acks.close()
        if running.process is not None:
            running.stop()
    assert "Traceback" not in running.log()


async def test_a_retained_catalogue_published_before_the_workers_started(
    tmp_path: Path, broker: Mosquitto, database: str
) -> None:
    fleet = enrolled(database, catalogue_fleet(tmp_path / "fleet", gateways=2, points=5))
    messages = fleet.seal_rounds(10, 30)
    publish_catalogues(broker.url, catalogues_of(fleet))  # no worker, no database row yet
    total = sum(m.count for m in messages)
    with (
        worker(tmp_path, broker, database, "w1") as one,
        worker(tmp_path, broker, database, "w2") as two,
    ):
        publish(broker.url, messages)
        await wait_for(lambda: count(database, "SELECT coalesce(sum(readings), 0) FROM coverage")
                       >= total, 60, "every reading stored")  # fmt: skip
    assert_stored_once_with_names(database, fleet, messages)
    # Each worker had both catalogues (retained, at subscribe) before the batches: none parked.
    assert [parked for _, parked, _ in stopped(one) + stopped(two)] == [0, 0]


async def test_a_worker_restarted_between_catalogue_and_batches_has_it_from_postgresql(
    tmp_path: Path, broker: Mosquitto, database: str
) -> None:
    fleet = enrolled(database, catalogue_fleet(tmp_path / "fleet", gateways=2, points=5))
    messages = fleet.seal_rounds(6, 30)
    running = worker(tmp_path, broker, database, "w-restart")
    try:
        running.start()
        # Not retained: once this worker has acknowledged them, the broker has them no more.
        publish_catalogues(broker.url, catalogues_of(fleet), retain=False)
        await wait_for(lambda: count(database, "SELECT count(*) FROM catalogues") == 2, 30,
                       "both catalogues stored")  # fmt: skip
        assert running.stop() == 0
        running.start()
        publish(broker.url, messages)
        total = sum(m.count for m in messages)
        await wait_for(lambda: count(database, "SELECT coalesce(sum(readings), 0) FROM coverage")
                       >= total, 30, "every reading stored")  # fmt: skip
        assert running.stop() == 0
    finally:
        if running.process is not None:
            running.stop()
    assert_stored_once_with_names(database, fleet, messages)
    (_, first_parked, _), (second_messages, second_parked, _) = stopped(running)
    assert (first_parked, second_messages, second_parked) == (0, len(messages), 0)


async def test_bad_catalogues_are_recorded_as_rejected_and_the_stream_goes_on(
    tmp_path: Path, broker: Mosquitto, database: str
) -> None:
    fleet = enrolled(database, catalogue_fleet(tmp_path / "fleet", gateways=1, points=5))
    gateway = fleet.members[0]
    messages = [gateway.seal(30) for _ in range(4)]
    good = catalogue_of(gateway)
    junk = b"\xa1\x61"  # not a zstd frame
    other = Catalogue.build([("plc9", "elsewhere")], b"\x60")
    bad = [
        # A genuine catalogue's bytes under another digest (a mismatch, or a tamper).
        Message(catalogue_topic(PREFIX, gateway.gateway_id, other.digest), good.payload,
                gateway.gateway_id, "", 0, 0, 0),
        # Junk under its own digest.
        Message(catalogue_topic(PREFIX, gateway.gateway_id, hashlib.sha256(junk).digest()[:16]),
                junk, gateway.gateway_id, "", 0, 0, 0),
        # Not a digest at all.
        Message(f"{PREFIX}/{gateway.gateway_id}/catalogue/XYZ", good.payload,
                gateway.gateway_id, "", 0, 0, 0),
    ]  # fmt: skip
    with worker(tmp_path, broker, database, "w-bad") as running:
        publish(broker.url, bad)
        publish_catalogues(broker.url, [catalogue_message(PREFIX, gateway.gateway_id, good)])
        publish(broker.url, messages)
        await wait_for(lambda: count(database, "SELECT coalesce(sum(readings), 0) FROM coverage")
                       >= 120, 30, "the batches stored")  # fmt: skip
        await wait_for(lambda: count(database, "SELECT count(*) FROM rejected") >= 3, 30,
                       "the three catalogues refused")  # fmt: skip
        assert running.process is not None and running.process.poll() is None
    refused = rows(database, "SELECT reason, detail, topic FROM rejected ORDER BY id")
    assert [r[0] for r in refused] == ["catalogue"] * 3
    details = " | ".join(r[1] for r in refused)
    assert f"not the {other.digest.hex()} its topic names" in details
    assert "not a zstd frame" in details
    assert "'XYZ' is not a digest" in details
    assert rows(database, "SELECT digest FROM catalogues") == [(good.digest,)]
    assert_stored_once_with_names(database, fleet, messages)
    assert "Traceback" not in running.log()


async def test_a_batch_parked_while_its_catalogue_is_stored_at_the_same_moment(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """The race of two workers: A parks a batch in a transaction that is still open (held on a
    ledger row lock of another gateway's batch in the same group) while B stores the batch's
    catalogue and commits. B, looking after its COMMIT for batches parked for it, cannot see
    A's uncommitted row; A, looking after its own COMMIT for the catalogues of what it parked,
    must see B's. Both looks are what worker.py does after each group."""
    fleet = catalogue_fleet(tmp_path / "fleet", gateways=2, points=5)
    prepare_database(postgres_dsn, fleet)
    parked_gw, other_gw = fleet.members
    waiting, passing = parked_gw.seal(20), other_gw.seal(20)
    with psycopg.connect(postgres_dsn) as conn:
        trust = keystore.load_trust(conn)
    a_decoder = Decoder(trust, PREFIX)  # has the other gateway's catalogue only
    other = catalogue_of(other_gw)
    a_decoder.book[other.digest] = Catalogue.parse(other.payload, other.digest)
    parked = a_decoder.decode(waiting.topic, waiting.payload)
    accepted = a_decoder.decode(passing.topic, passing.payload)
    assert isinstance(parked, Parked) and isinstance(accepted, Accepted)
    catalogue = catalogue_of(parked_gw)
    b_item = Decoder(trust, PREFIX).decode(
        catalogue_topic(PREFIX, parked_gw.gateway_id, catalogue.digest), catalogue.payload
    )
    assert isinstance(b_item, CatalogueItem)

    key = (other_gw.gateway_id, other_gw.epoch)
    with psycopg.connect(postgres_dsn, autocommit=True) as setup:
        setup.execute("INSERT INTO coverage (gateway, epoch) VALUES (%s, %s)", key)
    holder = await psycopg.AsyncConnection.connect(postgres_dsn)
    a = await psycopg.AsyncConnection.connect(postgres_dsn)
    b = await psycopg.AsyncConnection.connect(postgres_dsn)
    watcher = psycopg.connect(postgres_dsn, autocommit=True)

    def a_waits() -> bool:
        assert not a_write.done(), "A did not wait for the ledger row"
        row = watcher.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
        return row == (1,)

    try:
        await holder.execute(
            "SELECT 1 FROM coverage WHERE gateway = %s AND epoch = %s FOR UPDATE", key
        )
        a_write = asyncio.create_task(write_group(a, [parked, accepted], 100))
        await wait_for(a_waits, 10, "A's group waiting on the ledger row, its batch parked")
        b_done = await write_group(b, [b_item], 100)
        assert (b_done.catalogues, b_done.ready) == ([catalogue.digest], [])  # A's: uncommitted
        await holder.rollback()
        a_done = await a_write
        assert (a_done.parked, a_done.readings) == (1, 20)
        assert a_done.ready == [catalogue.digest]  # after its COMMIT A sees B's catalogue

        a_decoder.book[catalogue.digest] = Catalogue.parse(catalogue.payload, catalogue.digest)
        unparked = await write_parked(a, catalogue.digest, a_decoder.decode, 100, 64)
        assert (unparked.unparked, unparked.readings) == (1, 20)
        again = await write_parked(a, catalogue.digest, a_decoder.decode, 100, 64)
        assert again.unparked == 0
    finally:
        for conn in (holder, a, b):
            await conn.close()
        watcher.close()
    assert_stored_once_with_names(postgres_dsn, fleet, [waiting, passing])


async def left_parked(dsn: str, messages: list[Message], catalogue: Catalogue) -> None:
    """What a worker killed between its COMMIT and its look for the catalogues leaves: the
    batches of `messages` parked, and their catalogue stored by another, which looked before."""
    with psycopg.connect(dsn) as conn:
        decoder = Decoder(keystore.load_trust(conn), PREFIX)
    parked = [decoder.decode(m.topic, m.payload) for m in messages]
    assert all(isinstance(p, Parked) and p.digest == catalogue.digest for p in parked)
    item = CatalogueItem("t", messages[0].gateway, catalogue)
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        assert (await write_group(conn, parked, 100)).ready == []  # type: ignore[arg-type]
        assert await parking.store_catalogues(conn, [item]) == [catalogue.digest]  # nobody looks


async def test_parked_batches_whose_catalogue_is_stored_are_swept_at_start_and_while_running(
    tmp_path: Path, broker: Mosquitto, database: str
) -> None:
    """A worker killed between its COMMIT and its look for the catalogues leaves batches parked
    whose catalogue is stored: a worker writes them when it starts (before it subscribes), and
    a running one within PARKED_SWEEP_S."""
    fleet = enrolled(database, catalogue_fleet(tmp_path / "fleet", gateways=1, points=5))
    gateway = fleet.members[0]
    before = [gateway.seal(25) for _ in range(3)]
    known = names(gateway, before)
    first = catalogue_of(gateway)
    await left_parked(database, before, first)
    assert count(database, "SELECT count(*) FROM parked") == 3
    with worker(tmp_path, broker, database, "w-sweep") as running:
        log = running.log()
        assert "Ingest wrote parked batches=3" in log.split(READY_LINE)[0], log  # at start
        assert count(database, "SELECT count(*) FROM parked") == 0

        gateway.points.append(("plc9", f"{gateway.gateway_id}.new"))  # a new catalogue
        later = [gateway.seal(25) for _ in range(2)]
        known.update(names(gateway, later))
        assert catalogue_of(gateway).digest != first.digest
        await left_parked(database, later, catalogue_of(gateway))
        await wait_for(lambda: count(database, "SELECT count(*) FROM parked") == 0,
                       3 * parking.PARKED_SWEEP_S, "the periodic sweep")  # fmt: skip
    assert_stored_once_with_names(database, fleet, before + later, known)


async def test_a_batch_sent_again_while_parked_is_parked_once(
    tmp_path: Path, postgres_dsn: str
) -> None:
    """An agent in end-to-end mode sends a batch again while it is parked (nobody acknowledged
    it): copies in one group, or in later ones, make no second row, and it is written once."""
    fleet = catalogue_fleet(tmp_path / "fleet", gateways=1, points=5)
    prepare_database(postgres_dsn, fleet)
    gateway = fleet.members[0]
    messages = [gateway.seal(10) for _ in range(2)]
    with psycopg.connect(postgres_dsn) as conn:
        decoder = Decoder(keystore.load_trust(conn), PREFIX)
    parked = [decoder.decode(m.topic, m.payload) for m in messages]
    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        await write_group(conn, [*parked, parked[0]], 100)  # type: ignore[list-item]
        await write_group(conn, parked, 100)  # type: ignore[arg-type]
        assert count(postgres_dsn, "SELECT count(*) FROM parked") == 2
        catalogue = catalogue_of(gateway)
        item = CatalogueItem("t", gateway.gateway_id, catalogue)
        assert (await write_group(conn, [item], 100)).ready == [catalogue.digest]
        decoder.book[catalogue.digest] = catalogue
        written = await write_parked(conn, catalogue.digest, decoder.decode, 100, 64)
        assert (written.unparked, written.readings, written.duplicates) == (2, 20, 0)
    assert_stored_once_with_names(postgres_dsn, fleet, messages)


async def test_a_catalogue_another_worker_stored_is_taken_from_postgresql_not_parked_for(
    tmp_path: Path, broker: Mosquitto, database: str
) -> None:
    """A batch can reach a worker before its own copy of the catalogue (another worker got the
    catalogue, and stored it, first): the worker finds it in `catalogues` and decodes the batch
    at once instead of parking it."""
    fleet = enrolled(database, catalogue_fleet(tmp_path / "fleet", gateways=1, points=5))
    gateway = fleet.members[0]
    messages = [gateway.seal(20) for _ in range(3)]
    catalogue = catalogue_of(gateway)
    with worker(tmp_path, broker, database, "w-late") as running:
        async with await psycopg.AsyncConnection.connect(database) as conn:  # "another worker"
            stored = await parking.store_catalogues(
                conn, [CatalogueItem("t", gateway.gateway_id, catalogue)]
            )
            assert stored == [catalogue.digest]
        publish(broker.url, messages)  # its copy of the catalogue never comes
        await wait_for(lambda: count(database, "SELECT coalesce(sum(readings), 0) FROM coverage")
                       >= 60, 30, "the batches stored")  # fmt: skip
    assert stopped(running) == [(3, 0, 0)]  # none parked
    assert_stored_once_with_names(database, fleet, messages)
