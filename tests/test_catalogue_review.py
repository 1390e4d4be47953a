"""Point catalogues (contract §4.12) under review: an independent reader, hostile input, and the
encoder's bookkeeping of which catalogue a batch references.

- tests/interop/catalogue_contract.py reads catalogues and the batches that reference them from
  the contract's text alone; batch streams of one catalogue-referencing Sealer (points coming and
  going, changing type, mixed, names with dots, newlines and empty parts, many points) decode bit
  for bit alike with it and with the reference Opener, and every batch's `cat` names the
  catalogue `sealer.catalogue` gives after it.
- A seal that fails part-way (a point name CBOR cannot carry) must leave the agent's catalogue as
  it was: no later batch may reference a catalogue that lacks its points.
- Hostile catalogues end in CatalogueError within bounded time and memory.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_format2_contract import bits_of, expected_of
from test_payload_format import KEY, seal, sign

from edge_agent.errors import EnvelopeError
from edge_agent.reading import Quality, Reading
from edge_agent.seal import catalogue as catalogue_module
from edge_agent.seal import cbor_in
from edge_agent.seal.ack import AckError, AckOpener
from edge_agent.seal.catalogue import (
    MAX_POINTS,
    Catalogue,
    CatalogueError,
    CatalogueMissingError,
    Catalogues,
)
from edge_agent.seal.envelope import Opener, Sealer, Signer
from edge_agent.seal.hwm import open_mark
from edge_agent.seal.trust import TrustSet

sys.path.insert(0, str(Path(__file__).parent / "interop"))
import catalogue_contract as contract  # noqa: E402

pytestmark = pytest.mark.unit


def cat_of(message: bytes) -> bytes | None:
    """The `cat` of a sealed batch, read with the independent reader's envelope code."""
    body = cbor2.loads(contract.verified_payload(message, KEY.public_key()))
    return body.get("cat")


# --------------------------------------------------------------------------- round trips

part = st.sampled_from(["a", "b", "", "pump", "P1", "flow", "line\nbreak", "ü", "x\ny", "a.b"])
name = st.lists(part, min_size=1, max_size=4).map(".".join)
source = st.sampled_from(["plc", "ua", "", "s.1", "s\n2"])
decimal_value = st.integers(-(10**8), 10**8).flatmap(
    lambda m: st.integers(0, 16).map(lambda k: m / 10**k)
)
any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(0, 2**64 - 1).map(lambda b: struct.unpack("<d", struct.pack("<Q", b))[0]),
    decimal_value,
)
value_of_kind = {
    "null": st.none(),
    "bool": st.booleans(),
    "int": st.integers(-(2**63), 2**64 - 1),
    "float": any_float,
    "decimal": decimal_value,
    "text": st.text(st.characters(blacklist_categories=("Cs",)), max_size=8),
}
kinds = list(value_of_kind)


@st.composite
def streams(draw: st.DrawFn) -> list[list[Reading]]:
    """Batches over a pool of points: each batch a subset (points appear, disappear, come
    back), each point of a kind that may change from batch to batch or within one (mixed)."""
    pool = draw(st.lists(st.tuples(source, name), min_size=1, max_size=40, unique=True))
    kind = {point: draw(st.sampled_from(kinds)) for point in pool}
    batches = []
    for _ in range(draw(st.integers(1, 7))):
        chosen = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=len(pool),
                               unique=True))  # fmt: skip
        if draw(st.booleans()):  # some points change type for this batch (or for good)
            for point in draw(st.lists(st.sampled_from(pool), max_size=len(pool))):
                kind[point] = draw(st.sampled_from(kinds))
        polls = draw(st.integers(1, 4))
        readings = []
        for t in range(polls):
            for point in chosen:
                mixed = draw(st.integers(0, 9)) == 0
                k = draw(st.sampled_from(kinds)) if mixed else kind[point]
                readings.append(Reading(point[0], point[1], draw(st.integers(0, 3)) * 10**9 + t,
                                        draw(value_of_kind[k]),
                                        draw(st.sampled_from(list(Quality))),
                                        draw(st.none() | st.integers(-3, 2**32))))  # fmt: skip
        batches.append(readings)
    return batches


def check_stream(sealer: Sealer, batches: list[list[Reading]]) -> dict[bytes, Catalogue]:
    """Seal `batches` through `sealer`; each decodes alike with both readers, each batch's
    `cat` is the catalogue `sealer.catalogue` names. Returns the catalogues by digest."""
    opener = Opener([KEY.public_key()])
    independent: dict[bytes, contract.Catalogue] = {}
    first = 1
    for number, readings in enumerate(batches, 1):
        message = seal(sealer, readings, first_seq=first, batch=number)
        catalogue = sealer.catalogue
        assert catalogue is not None
        assert cat_of(message) == catalogue.digest, "the batch names another catalogue"
        assert contract.digest_of(catalogue.payload) == catalogue.digest
        independent[catalogue.digest] = contract.read_catalogue(catalogue.payload,
                                                                catalogue.digest)  # fmt: skip
        opener.catalogues[catalogue.digest] = Catalogue.parse(catalogue.payload, catalogue.digest)
        expected = expected_of(readings, first)
        assert bits_of(contract.open_batch(message, KEY.public_key(), independent)) == expected
        assert bits_of(opener.open(message).readings) == expected
        first += len(readings)
    return dict(opener.catalogues)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=streams())
def test_the_independent_reader_decodes_catalogue_batches_as_the_opener_does(
    batches: list[list[Reading]],
) -> None:
    check_stream(Sealer(KEY, payload_format=2, catalogue=True), batches)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=streams(), cut=st.integers(0, 6))
def test_a_resumed_sealer_names_the_catalogue_it_references(
    batches: list[list[Reading]], cut: int
) -> None:
    """A restart after any batch: the new Sealer resumes the last catalogue (parsed from its
    payload, as from the buffer) and carries on; every batch names `sealer.catalogue`."""
    before, after = batches[:cut], batches[cut:]
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    check_stream(sealer, before)
    restarted = Sealer(KEY, payload_format=2, catalogue=True)
    if sealer.catalogue is not None:
        kept = sealer.catalogue
        restarted.resume_catalogue(Catalogue.parse(kept.payload, kept.digest))
    check_stream(restarted, after)


def test_many_points_and_the_100000_point_cap() -> None:
    """Batches of fresh points until the catalogue passes MAX_POINTS: a new catalogue starts
    from the batch's points, and every batch (before, at, after) decodes with both readers."""
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    size = 30_000
    batches = [
        [Reading("plc", f"area{b}.p{p}", 1, p * 0.5, Quality.GOOD) for p in range(size)]
        for b in range(4)
    ]
    batches.append(batches[0][:10] + batches[3][:10])  # old and new points after the cap
    catalogues = check_stream(sealer, batches)
    assert max(len(c.points) for c in catalogues.values()) <= MAX_POINTS
    assert sealer.catalogue is not None and len(sealer.catalogue.points) <= MAX_POINTS


# --------------------------------------------------------------------------- defects


def test_a_failed_seal_leaves_the_catalogue_as_it_was() -> None:
    """A batch that cannot be sealed (a point name with a lone surrogate, which CBOR cannot
    carry) must not leave its new points half-added: before the fix the next batch of the good
    new point referenced the old catalogue with a position beyond its points (signed, stored,
    and undecodable: 'cp refers beyond'), and any later new catalogue failed to build."""
    sealer = Sealer(KEY, payload_format=2, catalogue=True)

    def reading(point: str, value: Any = None) -> Reading:
        return Reading("plc", point, 1, value, Quality.GOOD)

    seal(sealer, [reading("a"), reading("b")])
    with pytest.raises(ValueError, match="surrogates"):
        seal(sealer, [reading("a"), reading("c"), reading("bad\ud800")], first_seq=3, batch=2)
    message = seal(sealer, [reading("a"), reading("c")], first_seq=3, batch=3)
    catalogue = sealer.catalogue
    assert catalogue is not None and cat_of(message) == catalogue.digest
    opener = Opener([KEY.public_key()])
    opener.catalogues[catalogue.digest] = catalogue
    assert [r["pt"] for r in opener.open(message).readings] == ["a", "c"]
    # a new catalogue (all types changed) can still be made
    message = seal(sealer, [reading("a", 1), reading("c", 2)], first_seq=5, batch=4)
    assert sealer.catalogue is not None
    opener.catalogues[sealer.catalogue.digest] = sealer.catalogue
    assert [r["v"] for r in opener.open(message).readings] == [1, 2]


def test_catalogues_positions_is_all_or_nothing() -> None:
    """`Catalogues.positions` when the new catalogue cannot be built: state unchanged."""
    keeper = Catalogues()
    keeper.positions([("plc", "a")], b"\x00")
    version, current = keeper.version, keeper.current
    with pytest.raises(ValueError, match="surrogates"):
        keeper.positions([("plc", "a"), ("plc", "b\ud800")], b"\x00\x00")
    assert (keeper.version, keeper.current, keeper.pk()) == (version, current, b"\x00")
    assert keeper.positions([("plc", "a")], b"\x40") == [0]  # the quarter rule: a new one
    assert keeper.current is not None and keeper.current.points == (("plc", "a"),)


# --------------------------------------------------------------------------- hostile input

BIGFLOAT = b"\xc5\x82\x1b" + (10**18).to_bytes(8, "big") + b"\x01"
"""CBOR tag 5 (bigfloat) of exponent 10^18: cbor2 raises decimal.Overflow, an ArithmeticError."""
DECIMAL = b"\xc4\x82\x1b" + (10**18).to_bytes(8, "big") + b"\x01"
"""CBOR tag 4 (decimal fraction) of exponent 10^18: decimal.InvalidOperation."""


def raw_catalogue(**raw: bytes) -> bytes:
    """A catalogue payload whose values are given as CBOR bytes (any not given: a valid one)."""
    values = {"v": 1, "np": 1, "src": ["s"], "ps": [0, 0, 0, b""], "tok": "a",
              "pn": [0, 1, 0, b""], "pi": [0, 0, 0, b""], "pk": b"\x00"}  # fmt: skip
    items = [(cbor2.dumps(k), raw.get(k, cbor2.dumps(v))) for k, v in values.items()]
    body = b"\xa8" + b"".join(key + value for key, value in items)
    return zstandard.ZstdCompressor().compress(body)


def parse(payload: bytes) -> Catalogue:
    return Catalogue.parse(payload, hashlib.sha256(payload).digest()[:16])


def test_the_raw_catalogue_helper_makes_a_valid_catalogue() -> None:
    assert parse(raw_catalogue()).points == (("s", "a"),)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"v": cbor2.dumps(10**5000)}, "CBOR tag 2 is not allowed"),
        ({"np": cbor2.dumps(-(10**5000))}, "CBOR tag 3 is not allowed"),
        ({"v": cbor2.dumps(True)}, "float or simple value"),
        ({"v": cbor2.dumps(1.0)}, "float or simple value"),
        ({"v": cbor2.dumps("x" * 1_000_000)}, r"catalogue version 'x{36}\.\.\. is not 1$"),
        ({"v": BIGFLOAT}, "CBOR tag 5 is not allowed"),
        ({"v": DECIMAL}, "CBOR tag 4 is not allowed"),
        ({"tok": b"\xd8\x1c\x81\xd8\x1d\x00"}, "CBOR tag 28 is not allowed"),  # shared, a cycle
        ({"v": b"\xd8\x23" + cbor2.dumps("(a|aa)*" * 1000)}, "CBOR tag 35"),  # a regex
        ({"v": b"\xd8\x1e\x82\x03\x05"}, "CBOR tag 30"),  # a rational
        ({"src": b"\x81" * 10 + b"\x80"}, "nests arrays and maps over 3 deep"),
    ],
)
def test_a_hostile_catalogue_is_refused_with_a_short_message(
    raw: dict[str, bytes], error: str
) -> None:
    """Before: an integer of over 4,300 digits (a bignum, tags 2 and 3) as `v` or `np` made the
    error message itself raise ValueError (Python's limit on int to text), the bigfloat
    decimal.Overflow and the decimal fraction decimal.InvalidOperation, out of a parse
    documented "never another error"; `v` true (or 1.0) was taken for 1; a megabyte of `v`
    went into the message. A catalogue needs no tag, float or simple value."""
    with pytest.raises(CatalogueError, match=error) as refused:
        parse(raw_catalogue(**raw))
    assert len(str(refused.value)) < 200


def test_a_catalogue_of_empty_arrays_is_refused_without_building_them() -> None:
    """4 MiB of empty arrays (a few hundred bytes of zstd, from anyone who can publish a
    catalogue): before, cbor2 built 4 million lists (300 MB; 1.2 GB for 16 MiB) before the
    map was found wrong."""
    body = b"\x9f" + b"\x80" * (4 << 20) + b"\xff"
    payload = zstandard.ZstdCompressor().compress(body)
    tracemalloc.start()
    try:
        with pytest.raises(CatalogueError, match="more than 64 arrays and maps"):
            parse(payload)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, f"{peak / 2**20:.0f} MiB"


def test_a_message_with_a_costly_cbor_tag_is_refused_before_its_signature() -> None:
    """Anyone who can publish on the batch topic: a 12-byte bigfloat as the message, or in the
    unprotected header, raised decimal.Overflow out of Opener.open (a consumer catching
    EnvelopeError crashed); a rational of two 300 kB integers in the unprotected header took
    seconds of greatest common divisor before the signature was even looked at (43 s for two
    of 1 MB)."""
    opener = Opener([KEY.public_key()])
    protected = cbor2.dumps({1: -8, 4: b"12345678"})
    tail = cbor2.dumps(b"") + cbor2.dumps(bytes(64))
    rational = b"\xd8\x1e\x82" + cbor2.dumps(3 ** (2**19)) + cbor2.dumps(2 ** (8 * 300_000) + 1)
    for message in (
        BIGFLOAT,
        b"\xd2\x84" + cbor2.dumps(protected) + b"\xa1\x00" + BIGFLOAT + tail,
        b"\xd2\x84" + cbor2.dumps(protected) + b"\xa1\x00" + DECIMAL + tail,
        b"\xd2\x84" + cbor2.dumps(b"\xa1\x00" + BIGFLOAT) + b"\xa0" + tail,
        b"\xd2\x84" + cbor2.dumps(protected) + b"\xa1\x00" + rational + tail,
    ):
        began = time.process_time()
        with pytest.raises(EnvelopeError, match="CBOR tag"):
            opener.open(message)
        assert time.process_time() - began < 0.5


def test_a_signed_payload_with_a_bigfloat_is_an_envelope_error() -> None:
    """After the signature (a trusted key's bug): decimal.Overflow was not an EnvelopeError."""
    for value in (BIGFLOAT, DECIMAL):
        body = b"\xa2" + cbor2.dumps("v") + b"\x02" + cbor2.dumps("n") + value
        with pytest.raises(EnvelopeError, match="malformed batch: (Overflow|InvalidOperation)"):
            Opener([KEY.public_key()]).open(sign(body))


plain_cbor = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64), 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=5) | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner,
                                                                max_size=3),
    max_leaves=20,
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(value=plain_cbor)
def test_cbor_in_reads_what_cbor2_writes_and_its_indefinite_forms(value: Any) -> None:
    data = cbor2.dumps(value)
    assert cbor_in.loads(data, max_depth=64, max_containers=1000) == value
    indefinite = b"\x9f" + data + b"\x7f\x61a\x62bc\xff" + b"\x5f\x41x\xff\xff"
    assert cbor_in.loads(indefinite, max_depth=64, max_containers=1000) == [value, "abc", b"x"]


def _changed(data: bytes) -> st.SearchStrategy[bytes]:
    """`data` with one byte replaced (or one appended)."""
    return st.tuples(st.integers(0, len(data)), st.integers(0, 255)).map(
        lambda c: data[: c[0]] + bytes([c[1]]) + data[c[0] + 1 :]
    )


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=64) | plain_cbor.map(cbor2.dumps).flatmap(_changed))
def test_cbor_in_refuses_with_cbor_shape_error_only(data: bytes) -> None:
    try:
        cbor_in.loads(data, max_depth=8, max_containers=16)
    except cbor_in.CBORShapeError as exc:
        assert str(exc)


def test_the_agent_never_makes_a_catalogue_a_consumer_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The catalogue keeps every point it saw, so it outgrows what any one batch carries: 100,000
    points of 180-character names made 18.6 MB of CBOR, which every consumer refuses (16 MiB),
    while each batch referencing it was sealed, stored and sent (measured before the fix). With
    the bound lowered to 6 kB: when the grown catalogue would be too large, a new one starts from
    the batch's points; a batch whose own points are too many carries them itself."""
    monkeypatch.setattr(catalogue_module, "MAX_PAYLOAD_BYTES", 6_000)
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    opener = Opener([KEY.public_key()])
    first = 1
    sizes = [60] * 6 + [400]
    for number, size in enumerate(sizes, 1):
        readings = [Reading("plc", f"b{number}.{number}{p:04x}{'x' * 40}.{p}", 1, p, Quality.GOOD)
                    for p in range(size)]  # fmt: skip
        message = seal(sealer, readings, first_seq=first, batch=number)
        catalogue = sealer.catalogue
        if size == 400:
            assert catalogue is None and cat_of(message) is None
        else:
            assert catalogue is not None and cat_of(message) == catalogue.digest
            opener.catalogues[catalogue.digest] = Catalogue.parse(catalogue.payload,
                                                                  catalogue.digest)  # fmt: skip
        assert bits_of(opener.open(message).readings) == expected_of(readings, first)
        first += size


def test_a_batch_is_never_decoded_with_another_catalogue() -> None:
    """A consumer that keeps a catalogue under another digest (its slip, or a mapping filled
    from topics without checking): before, the batch decoded with the other catalogue's names
    ('temp' read as 'pressure'); the decoder now checks the catalogue's own digest."""
    first, second = (Sealer(KEY, payload_format=2, catalogue=True) for _ in range(2))
    message = seal(first, [Reading("plc", "temp", 1, 20.5, Quality.GOOD)])
    seal(second, [Reading("plc", "pressure", 1, 1.5, Quality.GOOD)])
    assert first.catalogue is not None and second.catalogue is not None
    opener = Opener([KEY.public_key()])
    opener.catalogues[first.catalogue.digest] = second.catalogue
    with pytest.raises(EnvelopeError, match=f"kept as {first.catalogue.digest.hex()} is"):
        opener.open(message)


def test_batches_that_lie_about_their_catalogue_are_refused_with_a_reason() -> None:
    """Signed batches (a trusted key's bug) whose `cat`, `cp`, `np` or `pk` do not fit their
    catalogue: each an EnvelopeError naming what is wrong, never another error."""
    sealer = Sealer(KEY, payload_format=2, catalogue=True)
    readings = [Reading("plc", f"p{p}", 1, p + 0.5, Quality.GOOD) for p in range(3)]
    body = cbor2.loads(contract.verified_payload(seal(sealer, readings), KEY.public_key()))
    catalogue = sealer.catalogue
    assert catalogue is not None
    opener = Opener([KEY.public_key()])
    opener.catalogues[catalogue.digest] = catalogue

    def lie(byte: int) -> bytes:
        """A batch `pk` whose first point decodes (XOR the catalogue's) to `byte`."""
        return bytes([catalogue.pk[0] ^ byte]) + body["pk"][1:]

    for change, error in (
        ({"cp": [2, 1, b"\x01\x01\x01"]}, "cp refers beyond"),  # -1, -2, -3
        ({"cp": [0, 1, 1, b"\x00\x01\x01"]}, "cp refers beyond the 3 points"),  # 1, 2, 3
        ({"cp": [1, [0, 10**400, -(10**400)]]}, "beyond"),
        ({"np": 4, "cp": [0, 0, 1, b"\x00\x01\x01\x01"]}, "np 4 is not 0..3"),
        ({"pk": lie(0x43)}, "decimal places to a point without floats"),
        ({"pk": lie(0xC0)}, "unknown type"),
        ({"pk": lie(0x40)}, "float dec"),  # says integer: the floats do not fit
        ({"cat": bytes(15)}, "cat is not a digest of 16 bytes"),
        ({"cat": "a" * 16}, "cat is not a digest"),
        ({"tok": "p0"}, "has its own points dictionary too"),
    ):
        bad = {**body, **change}
        with pytest.raises(EnvelopeError, match=error) as refused:
            opener.open(sign(cbor2.dumps(bad)))
        assert not isinstance(refused.value, CatalogueMissingError)
    unknown = {**body, "cat": bytes(16)}
    with pytest.raises(CatalogueMissingError):
        opener.open(sign(cbor2.dumps(unknown)))


def test_an_ack_or_mark_message_with_a_bigfloat_is_refused_as_what_it_is() -> None:
    """The same 12-byte bigfloat on the acknowledgement topic (anyone who may publish there):
    decimal.Overflow escaped AckOpener.open, documented "no other exception escapes"; on the
    batch topic as a high-water mark, open_mark's EnvelopeError likewise."""
    with pytest.raises(AckError, match="malformed: CBOR tag 5"):
        AckOpener([KEY.public_key()]).open(BIGFLOAT)
    with pytest.raises(EnvelopeError, match="high-water mark: CBOR tag 5"):
        open_mark(BIGFLOAT, TrustSet.of([KEY.public_key()]))


def test_a_signed_ack_or_mark_holding_a_bigfloat_is_refused_as_malformed() -> None:
    """After the signature (a trusted key's bug): decimal.Overflow escaped both before."""
    signed = Signer(KEY).sign(BIGFLOAT)
    with pytest.raises(AckError, match="malformed: payload is not CBOR: .*Overflow"):
        AckOpener([KEY.public_key()]).open(signed)
    with pytest.raises(EnvelopeError, match="high-water mark: malformed: Overflow"):
        open_mark(signed, TrustSet.of([KEY.public_key()]))


def test_an_unsigned_message_of_many_header_entries_is_refused_before_it_is_built() -> None:
    """Before the signature, from anyone: an unprotected header of 5 million entries (29 MiB)
    made 330 MB of Python objects and 1.2 s of CPU before 'unknown key id' (and the broker's
    message size limit, 256 MB by default for Mosquitto, was the only bound). Now at most 1,000
    data items are read before the signature is checked."""
    entries = 5_000
    header = (
        b"\xb9"
        + entries.to_bytes(2, "big")
        + b"".join(b"\x19" + (i + 1000).to_bytes(2, "big") + b"\x00" for i in range(entries))
    )
    protected = cbor2.dumps({1: -8, 4: b"12345678"})
    message = b"\xd2\x84" + cbor2.dumps(protected) + header + cbor2.dumps(b"") + cbor2.dumps(b"")
    with pytest.raises(EnvelopeError, match="more than 1000 data items"):
        Opener([KEY.public_key()]).open(message)
    assert cbor_in.loads(b"\x83\x01\x02\x03", max_depth=1, max_containers=1, max_items=4) == [
        1,
        2,
        3,
    ]
    with pytest.raises(cbor_in.CBORShapeError, match="more than 3 data items"):
        cbor_in.loads(b"\x83\x01\x02\x03", max_depth=1, max_containers=1, max_items=3)
