"""The ingest decoder and report with point catalogues (contract §4.12), without servers.

A batch that references a catalogue the decoder's book lacks is `Parked`, with what its signed
header says, but only when it would be accepted once decoded as far as that can be known
without the catalogue (key valid when sealed, enrolled for the topic's gateway, named by the
batch); a catalogue is accepted into the book, or refused with reason `catalogue`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from helpers.fleet import SimulatedGateway
from helpers.ingest_catalogue import catalogue_of, use_catalogues

from edge_agent.consumer.ingest.decode import (
    Accepted,
    CatalogueItem,
    Decoder,
    Parked,
    RecentCatalogues,
    Rejection,
)
from edge_agent.consumer.ingest.keystore import GatewayTrust, trust_from_rows
from edge_agent.consumer.ingest.report import render
from edge_agent.seal.catalogue import Catalogue, catalogue_topic
from edge_agent.seal.keys import key_id

pytestmark = pytest.mark.unit

PREFIX = "site/fleet"


def gateway(tmp_path: Path, name: str = "gw-000", **kw: int) -> SimulatedGateway:
    made = SimulatedGateway(name, tmp_path / name, prefix=PREFIX, payload_format=2, points=6)
    use_catalogues(made)
    return made


def trust(*enrolled: tuple[SimulatedGateway, str], not_after_ns: int | None = None) -> GatewayTrust:
    """The keys of `enrolled` gateways, each for the gateway id given with it."""
    from datetime import UTC, datetime

    end = None if not_after_ns is None else datetime.fromtimestamp(not_after_ns / 1e9, UTC)
    return trust_from_rows(
        (key_id(g.key.public_key()), owner, g.key.public_key().public_bytes_raw(), None, end, None)
        for g, owner in enrolled
    )


def catalogue_item(decoder: Decoder, gw: SimulatedGateway) -> CatalogueItem:
    catalogue = catalogue_of(gw)
    item = decoder.decode(
        catalogue_topic(PREFIX, gw.gateway_id, catalogue.digest), catalogue.payload
    )
    assert isinstance(item, CatalogueItem), item
    return item


def test_a_batch_before_its_catalogue_is_parked_with_its_header_then_decodes(
    tmp_path: Path,
) -> None:
    gw = gateway(tmp_path)
    decoder = Decoder(trust((gw, gw.gateway_id)), PREFIX)
    first = gw.seal(40)
    declared = gw.skip(10)
    second = gw.sealer.seal(
        gateway=gw.gateway_id, epoch=gw.epoch, batch=gw.next_batch, first_seq=gw.next_seq,
        readings=gw.readings(30, time.time_ns()), sealed_ns=time.time_ns(),
        evicted=[declared], reasons=["retention"],
    )  # fmt: skip
    parked = decoder.decode(first.topic, first.payload)
    assert isinstance(parked, Parked), parked
    catalogue = catalogue_of(gw)
    assert parked.digest == catalogue.digest
    assert (parked.gateway, parked.epoch, parked.batch) == (gw.gateway_id, gw.epoch, 1)
    assert (parked.seqs, parked.readings) == (((1, 40),), 40)
    assert parked.kid == gw.kid.hex() and parked.payload == first.payload
    again = decoder.decode(first.topic, second)
    assert isinstance(again, Parked) and again.seqs == ((51, 80), (41, 50))

    item = catalogue_item(decoder, gw)
    assert item.gateway == gw.gateway_id and decoder.book[catalogue.digest] == catalogue
    accepted = decoder.decode(parked.topic, parked.payload)
    assert isinstance(accepted, Accepted) and len(accepted.rows) == 40
    assert accepted.rows[0].split("\t")[3:5] == list(gw.points[0])  # src, pt of seq 1
    # New trust (a key change) keeps the book.
    decoder.set_trust(trust((gw, gw.gateway_id)))
    assert isinstance(decoder.decode(first.topic, first.payload), Accepted)


def test_a_batch_that_would_be_refused_is_refused_not_parked(tmp_path: Path) -> None:
    gw, other = gateway(tmp_path), gateway(tmp_path, "gw-001")
    message = gw.seal(10)
    foreign = Decoder(trust((gw, "gw-001"), (other, "gw-001")), PREFIX)  # its key: another's
    refused = foreign.decode(message.topic, message.payload)
    assert isinstance(refused, Rejection) and refused.reason == "wrong_gateway", refused
    expired = Decoder(trust((gw, gw.gateway_id), not_after_ns=time.time_ns() - 10**12), PREFIX)
    refused = expired.decode(message.topic, message.payload)
    assert isinstance(refused, Rejection) and refused.reason == "key_not_valid", refused
    tampered = bytearray(message.payload)
    tampered[-3] ^= 1
    refused = Decoder(trust((gw, gw.gateway_id)), PREFIX).decode(message.topic, bytes(tampered))
    assert isinstance(refused, Rejection) and refused.reason == "bad_signature", refused


@pytest.mark.parametrize(
    ("level", "payload", "detail"),
    [
        ("{digest}", b"\xa1\x61", "not a zstd frame"),
        ("0" * 32, None, "not the 00000000000000000000000000000000 its topic names"),
        ("{DIGEST}", None, "is not a digest of 32 lowercase hex digits"),
        ("short", None, "'short' is not a digest"),
    ],
)
def test_a_bad_catalogue_is_refused_with_reason_catalogue(
    tmp_path: Path, level: str, payload: bytes | None, detail: str
) -> None:
    gw = gateway(tmp_path)
    gw.seal(5)
    good = catalogue_of(gw)
    import hashlib

    body = good.payload if payload is None else payload
    digest = hashlib.sha256(body).digest()[:16].hex()
    topic = f"{PREFIX}/{gw.gateway_id}/catalogue/" + level.format(
        digest=digest, DIGEST=digest.upper()
    )
    decoder = Decoder(trust((gw, gw.gateway_id)), PREFIX)
    refused = decoder.decode(topic, body)
    assert isinstance(refused, Rejection), refused
    assert (refused.reason, refused.gateway) == ("catalogue", gw.gateway_id)
    assert detail in refused.detail
    assert decoder.book == {}


def test_topics_that_are_not_catalogues_are_not_taken(tmp_path: Path) -> None:
    decoder = Decoder(trust(), PREFIX)
    # An empty message: a retained catalogue deleted at the broker, neither kept nor refused.
    assert decoder.decode(f"{PREFIX}/gw/catalogue/" + "0" * 32, b"") is None
    for topic in (
        "other/gw/catalogue/" + "0" * 32,
        f"{PREFIX}/gw/catalogue",
        f"{PREFIX}/gw/x/y",
        f"{PREFIX}//catalogue/" + "0" * 32,
        f"{PREFIX}/a/b/catalogue/" + "0" * 32,
    ):
        assert decoder.decode(topic, b"") is None, topic  # fmt: skip


def test_the_report_shows_parked_batches_as_pending_with_their_digest() -> None:
    stream = {"gateway": "gw", "epoch": "e1", "readings": 10, "duplicates": 0, "max_seq": 10,
              "hwm": None, "evicted": 0}  # fmt: skip
    pending = {"gateway": "gw", "epoch": "e1", "first": 11, "last": 20, "kind": "pending",
               "detail": "received, parked: waits for point catalogue ab12"}  # fmt: skip
    parked = {"gateway": "gw", "catalogue": "ab12", "batches": 1, "readings": 10,
              "since": "2026-11-30T06:00:00+00:00", "catalogue_stored": False}  # fmt: skip
    code, lines = render(
        {"streams": [stream], "gaps": [pending], "rejected": {}, "parked": [parked]}
    )
    assert code == 0, lines
    assert ("PENDING: gateway=gw epoch=e1 readings=10 seq 11..20: received, parked: waits for"
            " point catalogue ab12") in lines  # fmt: skip
    assert any(line.startswith("PARKED 1 batches (10 readings) of gateway=gw wait for point"
                               " catalogue ab12 since 2026-11-30") for line in lines)  # fmt: skip
    assert any(line.endswith("(not received: the gateway publishes it, retained, before its"
                             " batches)") for line in lines)  # fmt: skip
    refused = {**parked, "catalogue_refused": True}
    _, lines = render({"streams": [stream], "gaps": [pending], "rejected": {"catalogue": 1},
                       "parked": [refused]})  # fmt: skip
    assert any(line.endswith("(a catalogue under this digest was refused: see `rejected`,"
                             " reason catalogue)") for line in lines)  # fmt: skip


def test_the_book_holds_the_most_recently_used_catalogues_up_to_its_points() -> None:
    """A worker's memory holds the catalogues in use, not a fleet's history of them (the
    database keeps every one)."""
    made = [Catalogue.build([("s", f"p{n}.{i}") for i in range(40)], bytes(40)) for n in range(4)]
    book = RecentCatalogues(max_points=100)
    book[made[0].digest] = made[0]
    book[made[1].digest] = made[1]
    assert book.get(made[0].digest) == made[0]  # used: the most recent now
    book[made[2].digest] = made[2]  # 120 points: the least recently used goes
    assert list(book) == [made[0].digest, made[2].digest] and book.points == 80
    assert made[1].digest not in book
    huge = Catalogue.build([("s", f"h{i}") for i in range(150)], bytes(150))
    book[huge.digest] = huge  # the newest stays whatever its size
    assert list(book) == [huge.digest] and book.points == 150
    del book[huge.digest]
    assert len(book) == 0 and book.points == 0
