"""Point catalogues (contract §4.12): names sent once, batches that reference them, exactly.

A batch that references a catalogue must decode to exactly the readings a self-contained one
does; a consumer without the catalogue must be told so (after the signature was checked), never
refuse the batch; a catalogue that is not what its topic says, or not §4.12's map, is refused
with a reason and never crashes a consumer.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_payload_format import KEY, assert_round_trip, readings_strategy, seal, sign

from edge_agent.errors import EnvelopeError
from edge_agent.reading import Quality, Reading
from edge_agent.seal.catalogue import (
    MAX_POINTS,
    Catalogue,
    CatalogueError,
    CatalogueMissingError,
    catalogue_topic,
    parse_catalogue_topic,
)
from edge_agent.seal.envelope import Opener, Sealer

sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
import plant_mix  # noqa: E402

pytestmark = pytest.mark.unit


def opener_with(*catalogues: Catalogue) -> Opener:
    """A consumer's Opener holding `catalogues` as received (parsed from their payloads)."""
    opener = Opener([KEY.public_key()])
    for catalogue in catalogues:
        opener.catalogues[catalogue.digest] = Catalogue.parse(catalogue.payload, catalogue.digest)
    return opener


def body_of(message: bytes) -> dict[str, Any]:
    payload = cbor2.loads(message).value[2]
    return dict(cbor2.loads(zstandard.ZstdDecompressor().decompress(payload)))


def poll(t: int, points: range, source: str = "plc") -> list[Reading]:
    return [Reading(source, f"line.p{p}", t, t * 0.25 + p, Quality.GOOD) for p in points]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(readings_strategy, min_size=1, max_size=4))
def test_any_readings_round_trip_exactly_through_catalogue_batches(
    batches: list[list[Reading]],
) -> None:
    """Every field of every reading, any type, any names, through batches that reference the
    catalogues one Sealer makes as points come and go."""
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    opener = Opener([KEY.public_key()])
    first = 1
    for number, readings in enumerate(batches, 1):
        message = seal(sealer, readings, first_seq=first, batch=number)
        catalogue = sealer.catalogue
        assert (catalogue is None) == (not readings), "every batch of readings references one"
        if catalogue is not None:
            assert body_of(message)["cat"] == catalogue.digest
            opener.catalogues[catalogue.digest] = Catalogue.parse(catalogue.payload)
        assert_round_trip(readings, opener.open(message).readings, first)
        first += len(readings)


def test_the_plant_mix_references_one_catalogue_and_decodes_as_self_contained_batches() -> None:
    """The plant mix of bench/plant_mix.py, 40 batches of 1,000: one catalogue for all (its
    decimal places are learnt in the first batches: those differences travel in the batches'
    `pk`), the same readings as self-contained format 2, and fewer bytes."""
    readings = plant_mix.readings(40_000)
    plain = Sealer(KEY, payload_format=2)
    referencing = Sealer(KEY, payload_format=2, catalogue=True)
    catalogues: dict[bytes, Catalogue] = {}
    sizes = {"plain": 0, "referencing": 0}
    for number, start in enumerate(range(0, len(readings), 1000), 1):
        chunk = readings[start : start + 1000]
        own = seal(plain, chunk, first_seq=start + 1, batch=number)
        short = seal(referencing, chunk, first_seq=start + 1, batch=number)
        assert referencing.catalogue is not None
        catalogues[referencing.catalogue.digest] = referencing.catalogue
        expected = Opener([KEY.public_key()]).open(own).readings
        assert opener_with(*catalogues.values()).open(short).readings == expected
        sizes["plain"] += len(own)
        sizes["referencing"] += len(short)
    assert len(catalogues) == 1
    assert sizes["referencing"] < 0.8 * sizes["plain"], sizes


def test_a_new_point_makes_a_new_catalogue_that_keeps_the_old_positions() -> None:
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    first = seal(sealer, poll(1, range(5)), first_seq=1)
    old = sealer.catalogue
    again = seal(sealer, poll(2, range(4, -1, -1)), first_seq=6)  # same points, another order
    assert sealer.catalogue == old
    grown = seal(sealer, poll(3, range(7)), first_seq=11)
    new = sealer.catalogue
    assert old is not None and new is not None and new.digest != old.digest
    assert new.points[:5] == old.points
    assert new.points[5:] == (("plc", "line.p5"), ("plc", "line.p6"))
    opener = opener_with(old, new)
    for message, t, points in ((first, 1, range(5)), (again, 2, range(4, -1, -1)),
                               (grown, 3, range(7))):  # fmt: skip
        got = opener.open(message).readings
        assert [(r["pt"], r["v"]) for r in got] == [(f"line.p{p}", t * 0.25 + p) for p in points]


def test_a_type_that_changes_for_few_points_travels_in_the_batch_for_many_makes_a_catalogue() -> (
    None
):
    """`pk` differences up to a quarter of a batch's points are carried as the batch's XOR; more
    make a new catalogue (so that a gateway whose types settled pays nothing per batch)."""
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    seal(sealer, [Reading("plc", f"p{p}", 1, 1, Quality.GOOD) for p in range(8)])
    ints = sealer.catalogue
    two_text = [Reading("plc", f"p{p}", 2, "on" if p < 2 else 2, Quality.GOOD) for p in range(8)]
    message = seal(sealer, two_text, first_seq=9)
    assert sealer.catalogue == ints
    assert body_of(message)["pk"].count(0) == 6
    assert [r["v"] for r in opener_with(ints).open(message).readings] == [r.value for r in two_text]
    all_text = [Reading("plc", f"p{p}", 3, "on", Quality.GOOD) for p in range(8)]
    message = seal(sealer, all_text, first_seq=17)
    assert sealer.catalogue is not None and sealer.catalogue != ints
    assert body_of(message)["pk"] == bytes(8)
    assert [r["v"] for r in opener_with(sealer.catalogue).open(message).readings] == ["on"] * 8


def test_a_restarted_sealer_resumes_its_catalogue() -> None:
    first = Sealer(KEY, payload_format=2, catalogue=True)
    seal(first, poll(1, range(5)))
    kept = first.catalogue
    assert kept is not None
    restarted = Sealer(KEY, payload_format=2, catalogue=True)
    restarted.resume_catalogue(Catalogue.parse(kept.payload, kept.digest))
    seal(restarted, poll(2, range(3, 5)))
    assert restarted.catalogue == kept


def test_a_batch_whose_catalogue_has_not_arrived_is_authentic_but_waits() -> None:
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    message = seal(sealer, poll(1, range(3)))
    assert sealer.catalogue is not None
    with pytest.raises(CatalogueMissingError) as missing:
        Opener([KEY.public_key()]).open(message)
    assert missing.value.digest == sealer.catalogue.digest
    tampered = bytearray(message)
    tampered[-70] ^= 1  # the signature no longer holds: that is found first
    with pytest.raises(EnvelopeError) as refused:
        Opener([KEY.public_key()]).open(bytes(tampered))
    assert not isinstance(refused.value, CatalogueMissingError)


def test_declarations_and_format_1_reference_no_catalogue() -> None:
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    message = seal(sealer, [], evicted=((1, 10),))
    assert sealer.catalogue is None and "cat" not in body_of(message)
    assert Sealer(KEY, payload_format=1, catalogue=True).catalogue is None


# --------------------------------------------------------------------------- refusals


CATALOGUE = Catalogue.build([("plc", "a.b"), ("plc", "a.c"), ("ua", "x")], bytes([96, 64, 128]))


def digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()[:16]


def compressed(body: object) -> bytes:
    return zstandard.ZstdCompressor().compress(cbor2.dumps(body))


def remade(**change: Any) -> bytes:
    body = {**cbor2.loads(zstandard.ZstdDecompressor().decompress(CATALOGUE.payload)), **change}
    return compressed({k: v for k, v in body.items() if v is not None})


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        (b"\x1c", "not a zstd frame"),
        (zstandard.ZstdCompressor().compress(b"\x1c"), "not CBOR"),
        (compressed([1, 2]), "not a map of"),
        (zstandard.ZstdCompressor().compress(bytes(17 << 20)), "not a zstd frame of <= 16 MiB"),
        (remade(extra=1), "not a map of"),
        (remade(v=2), "version 2 is not 1"),
        (remade(np=0), "np 0 is not 1.."),
        (remade(np=MAX_POINTS + 1), f"is not 1..{MAX_POINTS}"),
        (remade(pk=b"\x00"), "pk does not hold 3 bytes"),
        (remade(pk=bytes([0xC0, 0, 0])), "unknown type"),
        (remade(pi=[9, 0]), "pi"),
        (remade(ps=[0, 9, 1, b"\x00\x00\x00"]), "ps refers beyond"),
    ],
)
def test_a_malformed_catalogue_is_refused_with_what_is_wrong(payload: bytes, error: str) -> None:
    with pytest.raises(CatalogueError, match=error):
        Catalogue.parse(payload, digest(payload))


def test_a_catalogue_that_is_not_the_one_its_topic_names_is_refused() -> None:
    other = Catalogue.build([("plc", "a.b")], b"\x60")
    with pytest.raises(CatalogueError, match="not the .* its topic names"):
        Catalogue.parse(other.payload, CATALOGUE.digest)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(0, 10**6), byte=st.integers(0, 255))
def test_a_catalogue_with_a_flipped_byte_is_refused_or_read_never_a_crash(
    position: int, byte: int
) -> None:
    changed = bytearray(CATALOGUE.payload)
    changed[position % len(changed)] ^= byte or 1
    try:
        Catalogue.parse(bytes(changed))
    except CatalogueError as exc:
        assert str(exc)


def test_batches_that_misuse_a_catalogue_are_refused() -> None:
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    seal(sealer, poll(1, range(3)))
    catalogue = sealer.catalogue
    assert catalogue is not None
    body = body_of(seal(sealer, poll(2, range(3)), first_seq=4))
    opener = opener_with(catalogue)

    for change, error in (
        ({"src": ["plc"]}, "has its own points dictionary too"),
        ({"cp": [0, 5, 0, b""]}, "cp refers beyond the 3 points"),
        ({"cat": b"short"}, "cat is not a digest of 16 bytes"),
        ({"cp": None}, "payload lacks cp"),
        (
            {
                "n": 0,
                "np": 0,
                "idx": [0, 0, 0, b""],
                "nt": 0,
                "ti": [0, 0, 0, b""],
                "cp": [0, 0, 0, b""],
                "pk": b"",
                "q": [[], [0, 0, 0, b""]],
                "sc": [[], [0, 0, 0, b""]],
            },
            "a batch of no readings references a point catalogue",
        ),
    ):
        bad = {k: v for k, v in {**body, **change}.items() if v is not None}
        with pytest.raises(EnvelopeError, match=error):
            opener.open(sign(cbor2.dumps(bad)))


def test_catalogue_topics() -> None:
    topic = catalogue_topic("site/edge", "gw-1", CATALOGUE.digest)
    assert topic == f"site/edge/gw-1/catalogue/{CATALOGUE.digest.hex()}"
    assert parse_catalogue_topic(topic) == ("gw-1", CATALOGUE.digest)
    for other in ("site/edge/gw-1/batch", "gw/catalogue/XYZ", f"gw/catalogue/{'AB' * 16}",
                  f"catalogue/{'ab' * 16}", f"gw/catalogue/{'ab' * 15}"):  # fmt: skip
        assert parse_catalogue_topic(other) is None
