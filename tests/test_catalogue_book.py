"""The consumer's book of point catalogues and its parked batches (consumer/catalogues.py,
docs/contract.md §4.12), driven through the Verifier with batches sealed by the real
`Sealer(payload_format=2, catalogue=True)`: parking, release in arrival order, the bounds, a
catalogue received again, and the pending report of a batch whose catalogue never came.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.consumer.catalogues import CatalogueBook, is_catalogue_topic
from edge_agent.consumer.verify import Verifier
from edge_agent.reading import Quality, Reading
from edge_agent.seal.catalogue import Catalogue, catalogue_topic
from edge_agent.seal.envelope import Opener, Sealer

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()
T0 = 1_780_000_000_000_000_000
BATCH = "site/gw/batch"


def stream(count: int, points: int = 3) -> tuple[list[bytes], Catalogue]:
    """`count` batches of `points` readings (seq 1..count*points) and their one catalogue."""
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    batches = [
        sealer.seal(
            gateway="gw",
            epoch="e1",
            batch=n,
            first_seq=points * (n - 1) + 1,
            readings=[
                Reading("plc", f"p{i}", T0 + n, n + i / 10, Quality.GOOD) for i in range(points)
            ],
            sealed_ns=T0 + n,
        )  # fmt: skip
        for n in range(1, count + 1)
    ]
    assert sealer.catalogue is not None
    return batches, sealer.catalogue


def verifier() -> Verifier:
    return Verifier(Opener([KEY.public_key()]))


def topic(catalogue: Catalogue) -> str:
    return catalogue_topic("site", "gw", catalogue.digest)


def test_parked_batches_are_verified_in_arrival_order_when_their_catalogue_comes() -> None:
    v = verifier()
    batches, catalogue = stream(3)
    for n, payload in zip((3, 1, 2), (batches[2], batches[0], batches[1]), strict=True):
        assert v.receive(f"site/gw{n}/batch", payload) == [], "parked, nothing to report yet"
    assert (v.result.batches, v.result.rejected, v.book.parked) == (0, 0, 3)
    released = v.receive(topic(catalogue), catalogue.payload)
    assert [c.topic for c in released] == ["site/gw3/batch", "site/gw1/batch", "site/gw2/batch"]
    assert [c.batch.batch for c in released if c.batch is not None] == [3, 1, 2]
    assert [len(c.fresh) for c in released] == [3, 3, 3]
    assert (v.result.batches, v.result.readings, v.book.parked) == (3, 9, 0)
    code, lines = v.summary()
    assert code == 0, lines
    assert lines[-1] == "OK: 3 batches verified, complete"


def test_a_catalogue_received_again_releases_nothing_and_is_not_refused() -> None:
    v = verifier()
    batches, catalogue = stream(1)
    assert v.receive(topic(catalogue), catalogue.payload) == []
    assert v.receive(topic(catalogue), catalogue.payload) == []  # retained, on a reconnect
    assert v.receive(BATCH, batches[0])[0].batch is not None
    assert (v.result.rejected, v.result.batches) == (0, 1)


def test_an_empty_message_on_a_catalogue_topic_is_neither_kept_nor_refused() -> None:
    """What subscribers receive when a retained catalogue is deleted (a zero-length publish)."""
    v = verifier()
    batches, catalogue = stream(1)
    assert v.receive(BATCH, batches[0]) == []
    assert v.receive(topic(catalogue), b"") == []
    assert (v.result.rejected, v.book.parked, len(v.book.catalogues)) == (0, 1, 0)


def test_a_batch_parked_twice_is_kept_once() -> None:
    v = verifier()
    batches, catalogue = stream(1)
    assert v.receive(BATCH, batches[0]) == []
    assert v.receive(BATCH, batches[0]) == []  # at-least-once delivery: the same bytes again
    assert v.book.parked == 1
    assert len(v.receive(topic(catalogue), catalogue.payload)) == 1
    assert (v.result.batches, v.result.duplicates) == (1, 0)


def test_beyond_the_parking_bound_a_batch_is_refused_with_the_reason() -> None:
    v = verifier()
    v.book = CatalogueBook(v.opener.catalogues, max_parked=2)
    batches, catalogue = stream(3)
    assert v.receive(BATCH, batches[0]) == [] and v.receive(BATCH, batches[1]) == []
    [refused] = v.receive(BATCH, batches[2])
    assert refused.batch is None and v.result.rejected == 1
    assert v.result.last_error == (
        f"batch on {BATCH} refused: it waits for catalogue {catalogue.digest.hex()}, and 2 "
        f"batches ({len(batches[0]) + len(batches[1])} bytes) already wait for catalogues, the "
        f"bound (2 batches, {256 * 1024 * 1024} bytes)"
    )
    assert len(v.receive(topic(catalogue), catalogue.payload)) == 2
    code, lines = v.summary()
    assert code == 3, lines
    assert "REJECTED 1 batches: batch on site/gw/batch refused: it waits for" in lines[-1]


def test_beyond_the_bytes_of_the_book_a_catalogue_is_refused_with_the_reason() -> None:
    v = verifier()
    _, catalogue = stream(1)
    v.book = CatalogueBook(v.opener.catalogues, max_book_bytes=len(catalogue.payload) - 1)
    [refused] = v.receive(topic(catalogue), catalogue.payload)
    assert refused.batch is None and v.result.rejected_catalogues == 1
    assert v.result.last_error is not None
    assert v.result.last_error.startswith(f"catalogue refused on {topic(catalogue)}: the book")


def test_a_batch_whose_catalogue_never_came_is_pending_and_the_exit_is_4() -> None:
    v = verifier()
    batches, catalogue = stream(2)
    assert v.receive(BATCH, batches[0]) == [] and v.receive(BATCH, batches[1]) == []
    code, lines = v.summary()
    assert code == 4, lines
    assert lines == [
        f"PENDING CATALOGUE: digest={catalogue.digest.hex()} batches=2 gateways=gw (signature "
        f"checked, not decoded: the catalogue never came on site/gw/catalogue/"
        f"{catalogue.digest.hex()}; not verified)",
        "INCOMPLETE: 2 batches wait for a catalogue that did not come (PENDING CATALOGUE "
        "above): their readings are not verified",
    ]


def test_a_batch_parked_through_check_without_its_topic_is_reported_all_the_same() -> None:
    v = verifier()
    batches, catalogue = stream(1)
    assert v.check(batches[0]) == (None, []) and v.result.rejected == 0
    code, lines = v.summary()
    assert code == 4, lines
    assert lines[0].startswith(
        f"PENDING CATALOGUE: digest={catalogue.digest.hex()} batches=1 gateways=? (signature "
        f"checked, not decoded: the catalogue never came on {{prefix}}/{{gateway}}/catalogue/"
    ), lines


def test_catalogue_topics_are_told_by_their_level() -> None:
    assert is_catalogue_topic("site/gw/catalogue/" + "0" * 32)
    assert is_catalogue_topic("site/gw/catalogue/junk")  # refused by the book, with a reason
    assert not is_catalogue_topic("site/gw/batch")
    assert not is_catalogue_topic("catalogue")
    assert not is_catalogue_topic("site/catalogue/gw/batch")
