"""Payload format 2 (contract §4.9): lossless round trips, malformed payloads, format switches.

Property tests (Hypothesis) seal readings of every supported type through the real Sealer
(columns, zstd, Ed25519) and open them with the real Opener; the fuzz tests sign arbitrary and
mutated payloads with a trusted key, as a buggy or compromised producer could, and check that
the consumer refuses them with EnvelopeError and never crashes.
"""

from __future__ import annotations

import enum
import math
import struct
from typing import Any

import cbor2
import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config.loader import parse_config
from edge_agent.consumer.verify import Verifier
from edge_agent.errors import ConfigError, EnvelopeError
from edge_agent.reading import Quality, Reading
from edge_agent.seal import columnar
from edge_agent.seal.envelope import COSE_SIGN1_TAG, Opener, Sealer

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()
OPENER = Opener([KEY.public_key()])


def seal(sealer: Sealer, readings: list[Reading], *, first_seq: int = 1, batch: int = 1,
         epoch: str = "ep", evicted: tuple[tuple[int, int], ...] = ()) -> bytes:  # fmt: skip
    return sealer.seal(gateway="gw", epoch=epoch, batch=batch, first_seq=first_seq,
                       readings=readings, sealed_ns=7, evicted=evicted)  # fmt: skip


def same_value(a: object, b: object) -> bool:
    """Equal and of the same type; floats bit for bit (NaN payloads, -0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # type: ignore[arg-type]
    return a == b


def assert_round_trip(readings: list[Reading], decoded: list[dict[str, Any]], first: int) -> None:
    assert len(decoded) == len(readings)
    for seq, (reading, got) in enumerate(zip(readings, decoded, strict=True), first):
        expected = {"seq": seq, "src": reading.src, "pt": reading.pt, "ts": reading.ts_ns,
                    "q": Quality(reading.quality).value}  # fmt: skip
        if reading.code is not None:
            expected["sc"] = reading.code
        assert {k: v for k, v in got.items() if k != "v"} == expected
        assert same_value(got["v"], reading.value), (reading, got)


# --------------------------------------------------------------------------- strategies

names = st.sampled_from(["a", "b", "pump.P1.flow", "", ".", "x.y.", "line\nbreak", "ü.ß"])
any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True),
    st.integers(0, 2**64 - 1).map(lambda bits: struct.unpack("<d", struct.pack("<Q", bits))[0]),
    st.sampled_from([0.0, -0.0, 0.1 + 0.2, 23.45, -45.838, 1e300, 5e-324, 2.0**53, 1e15 + 0.5]),
    st.integers(-(10**7), 10**7).map(lambda m: m / 1000),
)
values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    any_float,
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=20),
)
readings_strategy = st.lists(
    st.builds(
        Reading,
        names,
        names,
        st.integers(-(2**63), 2**63 - 1) | st.integers(0, 5),
        values,
        st.sampled_from(list(Quality)),
        st.none() | st.integers(0, 2**32 - 1),
    ),
    max_size=60,
)


# --------------------------------------------------------------------------- round trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(readings_strategy, min_size=1, max_size=3), compress=st.booleans())
def test_any_readings_round_trip_exactly(batches: list[list[Reading]], compress: bool) -> None:
    """Every field of every reading, any type, any float bits; one Sealer across batches, as the
    batcher uses it (its learnt decimal places must never make a batch lossy)."""
    sealer = Sealer(KEY, compress=compress, payload_format=2)
    first = 1
    for number, readings in enumerate(batches, 1):
        batch = OPENER.open(seal(sealer, readings, first_seq=first, batch=number))
        assert (batch.gateway, batch.epoch, batch.batch, batch.sealed_ns) == ("gw", "ep", number, 7)
        assert_round_trip(readings, batch.readings, first)
        first += len(readings)


@settings(max_examples=100, deadline=None)
@given(
    series=st.lists(st.lists(values, min_size=1, max_size=12), min_size=1, max_size=6),
    polls=st.integers(1, 4),
)
def test_a_point_whose_column_mixes_types_round_trips(series: list[list[Any]], polls: int) -> None:
    """Points polled in turn, each changing type from poll to poll (a sensor failing to None,
    an OPC UA variant changing type): the grouped columns must put every value back."""
    readings = [
        Reading("plc", f"p{p}", 1_000 * t, column[t % len(column)], Quality.GOOD)
        for t in range(polls * 3)
        for p, column in enumerate(series)
    ]
    assert_round_trip(
        readings, OPENER.open(seal(Sealer(KEY, payload_format=2), readings)).readings, 1
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    points=st.integers(1, 5),
    polls=st.integers(1, 3),
    data=st.data(),
)
def test_batches_of_one_shape_round_trip_whatever_their_values(
    points: int, polls: int, data: st.DataObject
) -> None:
    """The same polls batch after batch (the encoder then keeps the batch's shape and its
    split by type): values whose types and decimal places change between batches, raw floats
    and NaNs included, must still come back exactly."""
    sealer = Sealer(KEY, payload_format=2)
    names = [f"EQ{p % 2}.tag{p}" for p in range(points)]
    first = 1
    for number in range(1, data.draw(st.integers(2, 5)) + 1):
        kind = data.draw(st.sampled_from(["floats", "decimals", "any"]))
        decimal = st.integers(-(10**6), 10**6).map(lambda m: m / 100)
        strategy = {"floats": any_float, "any": values, "decimals": decimal}[kind]
        drawn = data.draw(st.lists(strategy, min_size=points * polls, max_size=points * polls))
        readings = [
            Reading("plc", names[i % points], 1_000 * (i // points), v, Quality.GOOD)
            for i, v in enumerate(drawn)
        ]
        batch = OPENER.open(seal(sealer, readings, first_seq=first, batch=number))
        assert_round_trip(readings, batch.readings, first)
        first += len(readings)


@settings(max_examples=500, deadline=None)
@given(column=st.lists(st.integers(-(2**70), 2**70) | st.integers(-300, 300)
                       | st.integers(-3, 12), max_size=40))  # fmt: skip
def test_integer_columns_round_trip(column: list[int]) -> None:
    """Frame of reference, zigzag, bits and the CBOR array: whichever packing is chosen."""
    for packed in (columnar.pack_ints(column), columnar.pack_bits(column)):
        assert columnar.unpack_ints(packed, len(column), "c") == column


def test_integer_columns_pick_the_narrow_packings() -> None:
    assert columnar.pack_ints([-1, 0, 1, -2]) == [2, 1, b"\x01\x00\x02\x03"]  # zigzag
    assert columnar.pack_ints([-1000, 0, 1000]) == [2, 2, b"\xcf\x00\xd0\x07\x00\x07"]
    assert columnar.pack_ints([5, 6, 300]) == [0, 5, 2, b"\x00\x01\x27\x00\x00\x01"]
    assert columnar.pack_bits([-3, 3, 0, 1]) == [3, -3, 4, b"\x60\x43"]
    assert columnar.pack_bits([1, 0, 1]) == [3, 0, 1, b"\x05"]
    assert columnar.pack_bits([0, 40]) == columnar.pack_ints([0, 40])


def test_the_encoder_keeps_only_shapes_that_come_back_and_within_its_bound() -> None:
    """A batch shape is kept on its second sight, and the shapes kept stay within
    _CACHED_READINGS readings (about 250 bytes each): a lean gateway's memory is bounded."""
    encoder = columnar.ColumnEncoder()
    size = columnar._CACHED_READINGS // 3
    shapes = [
        [Reading("s", f"p{i}", 1, float(i), Quality.GOOD) for i in range(start, start + size)]
        for start in range(0, 5 * size, size)
    ]
    first = encoder.encode(shapes[0], 1)
    assert encoder._cached == 0  # seen once: not kept
    assert encoder.encode(shapes[0], 1) == first
    assert encoder._cached == size
    for readings in shapes[1:] * 2:
        encoder.encode(readings, 1)
        assert encoder._cached <= columnar._CACHED_READINGS
    assert len(encoder._shapes) == 3


def test_the_readings_of_format_2_equal_those_of_format_1() -> None:
    """A consumer sees the same readings whichever format the gateway uses."""
    readings = [
        Reading("plc", "current", 1_700_000_000_000_000_000, 12.5, Quality.GOOD),
        Reading("plc", "running", 1_700_000_000_000_000_000, True, Quality.GOOD),
        Reading("plc", "tag", 1_700_000_000_000_000_000, "PUMP-7", Quality.UNCERTAIN),
        Reading("plc", "level", 1_700_000_000_000_000_000, None, Quality.BAD),
        Reading("ua", "speed", 1_700_000_000_000_000_004, 3, Quality.GOOD, code=0x40920000),
        Reading("ua", "count", 1_700_000_000_000_000_004, 2**64 - 1, Quality.GOOD, code=0),
        Reading("plc", "current", 1_700_000_001_000_000_000, 12.75, Quality.GOOD),
    ]
    one = OPENER.open(seal(Sealer(KEY, payload_format=1), readings, first_seq=11))
    two = OPENER.open(seal(Sealer(KEY, payload_format=2), readings, first_seq=11))
    assert two.readings == one.readings
    assert [type(r["v"]) for r in two.readings] == [type(r["v"]) for r in one.readings]


@pytest.mark.parametrize(
    "value",
    [math.nan, -math.nan, struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000001))[0],
     math.inf, -math.inf, -0.0, 0.0, 5e-324, 0.1 + 0.2, 1.7976931348623157e308, 2.0**60],
)  # fmt: skip
def test_floats_that_are_not_short_decimals_keep_their_bits(value: float) -> None:
    """NaN payloads, -0.0, infinities, subnormals, computed float64s: the raw (XOR) column."""
    readings = [
        Reading("s", "p", 1, 23.45, Quality.GOOD),
        Reading("s", "p", 2, value, Quality.GOOD),
    ]
    decoded = OPENER.open(seal(Sealer(KEY, payload_format=2), readings)).readings
    assert same_value(decoded[1]["v"], value)


def test_a_point_that_needs_more_decimal_places_is_learnt_for_the_next_batch() -> None:
    """23.5 suggests 1 place; 23.46 then needs 2: exact now (sent raw), a decimal next batch."""
    sealer = Sealer(KEY, payload_format=2, compress=False)
    first = [Reading("s", "p", i, v, Quality.GOOD) for i, v in enumerate([23.5, 23.46, 23.47])]
    second = [Reading("s", "p", i, v, Quality.GOOD) for i, v in enumerate([23.48, 23.4, 23.5])]
    for readings, raw in ((first, [1, 2]), (second, [])):
        message = seal(sealer, readings)
        assert_round_trip(readings, OPENER.open(message).readings, 1)
        body = cbor2.loads(cbor2.loads(message).value[2])
        assert body["float"]["x"] == raw


def test_subclasses_of_the_value_types_are_sealed_as_the_plain_types() -> None:
    """An IntEnum (an OPC UA enumeration) and a str subclass: no crash, plain values."""

    class Mode(enum.IntEnum):
        AUTO = 2

    class Tag(str):
        pass

    readings = [Reading("s", "mode", 1, Mode.AUTO, Quality.GOOD),
                Reading("s", "tag", 1, Tag("T-1"), Quality.GOOD)]  # fmt: skip
    decoded = OPENER.open(seal(Sealer(KEY, payload_format=2), readings)).readings
    assert [(type(r["v"]), r["v"]) for r in decoded] == [(int, 2), (str, "T-1")]


def test_empty_batch_and_declaration_only() -> None:
    """A declaration (§4.7) is a batch without readings: it carries `evicted` and nothing else."""
    batch = OPENER.open(seal(Sealer(KEY, payload_format=2), [], first_seq=51, evicted=((1, 50),)))
    assert batch.readings == []
    assert batch.evicted == [(1, 50)]


def test_a_batch_at_the_count_limit_round_trips_and_one_more_is_refused() -> None:
    readings = [Reading("s", f"p{i % 300}", i // 300, i * 0.5, Quality.GOOD)
                for i in range(columnar.MAX_READINGS)]  # fmt: skip
    sealer = Sealer(KEY, payload_format=2)
    decoded = OPENER.open(seal(sealer, readings)).readings
    assert decoded[-1] == {"seq": columnar.MAX_READINGS, "src": "s", "pt": "p99",
                           "ts": (columnar.MAX_READINGS - 1) // 300,
                           "v": (columnar.MAX_READINGS - 1) * 0.5, "q": "good"}  # fmt: skip
    with pytest.raises(ValueError, match="100001 readings in one batch; format 2 allows 100000"):
        seal(sealer, [*readings, readings[0]])


def test_long_text_and_names_round_trip() -> None:
    """Text has no limit of its own in format 2 (the consumer's 64 MiB payload limit applies)."""
    text = "é" * 1_000_000
    readings = [Reading("s" * 300, "n." * 200, 1, text, Quality.GOOD)]
    assert_round_trip(
        readings, OPENER.open(seal(Sealer(KEY, payload_format=2), readings)).readings, 1
    )


def test_format_2_is_a_fraction_of_format_1_for_slowly_changing_values() -> None:
    """What the format is for: 200 points polled 5 times, values moving by a few counts."""
    readings = [
        Reading("plc", f"area{p % 7}.tag{p}.value", 1_700_000_000_000_000_000 + t * 10**9,
                round(100 + p + math.sin(t + p) * 0.3, 2), Quality.GOOD)
        for t in range(5)
        for p in range(200)
    ]  # fmt: skip
    one = len(seal(Sealer(KEY, payload_format=1), readings))
    two = len(seal(Sealer(KEY, payload_format=2), readings))
    assert two < one / 3, (one, two)


# --------------------------------------------------------------------------- malformed payloads


def sign(payload: bytes) -> bytes:
    """A COSE_Sign1 message over `payload` (zstd-compressed) with the trusted key."""
    compressed = zstandard.ZstdCompressor().compress(payload)
    protected = cbor2.dumps({1: -8, 4: OPENER_KID, 3: "application/cbor", "enc": "zstd"},
                            canonical=True)  # fmt: skip
    signature = KEY.sign(cbor2.dumps(["Signature1", protected, b"", compressed]))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, compressed, signature]))


OPENER_KID = Sealer(KEY).kid
VALID = [
    Reading("plc", "a.b", 10, 1.25, Quality.GOOD),
    Reading("plc", "a.c", 10, 7, Quality.GOOD),
    Reading("ua", "x", 11, "on", Quality.UNCERTAIN, 0x40000000),
    Reading("plc", "a.b", 20, 1.5, Quality.GOOD),
    Reading("plc", "a.c", 20, None, Quality.BAD),
    Reading("ua", "x", 21, True, Quality.GOOD, 0),
    Reading("plc", "a.b", 30, math.nan, Quality.GOOD),
]
VALID_BODY: dict[str, Any] = cbor2.loads(
    zstandard.ZstdDecompressor().decompress(
        cbor2.loads(seal(Sealer(KEY, payload_format=2), VALID)).value[2]
    )
)


def refused_or_read(message: bytes) -> None:
    """The consumer's contract: EnvelopeError or a batch of §4.4 readings, never a crash."""
    try:
        batch = OPENER.open(message)
    except EnvelopeError as exc:
        assert str(exc)
        return
    for seq, reading in enumerate(
        batch.readings, batch.readings[0]["seq"] if batch.readings else 0
    ):
        assert reading["seq"] == seq
        assert {"src", "pt", "ts", "v", "q"} <= set(reading)
    Verifier(OPENER).check(message)


def test_the_valid_body_opens() -> None:
    assert_round_trip(VALID, OPENER.open(sign(cbor2.dumps(VALID_BODY))).readings, 1)


EARLIER_LAYOUT = bytes.fromhex(
    "b81a61760267676174657761796267776565706f636862657065626174636801667365616c65640767657669"
    "63746564806373657101616e08626e7004637372638263706c6362756162707384000001440000010063746f"
    "6b6c610a620a630a780a63630a6462706e840001014401010002627069840000014800010002030104056369"
    "6478840021014802030300030300056274300a626e7405627473840001014400080008627469840000014800"
    "00010100010100657479706573824603020004010384000101460200000000006171828564676f6f6469756e"
    "6365727461696e64676f6f646362616464676f6f64840001014501000000026273638285f61a40000000f600"
    "f68400010145010001000164626f6f6c410163696e74828400070040840000004065666c6f6174a4616b4402"
    "0000106178810263646563828400187d004084001819004063786f7250003400330033003300330033f8d37f"
    "3f647465787481626f6e"
)
"""The payload of VALID plus a point `b.cc.d` of one raw float (0.1 + 0.2), as an agent of
contract 1.17 sealed it (`types` runs, `k` in `float`, name parts name after name): made with
main's columnar.py at f1093ad."""


def test_a_batch_of_the_earlier_layout_still_opens() -> None:
    """A buffer sealed before 2.0 drains through an upgraded consumer: nothing is lost."""
    readings = [*VALID, Reading("plc", "b.cc.d", 30, 0.1 + 0.2, Quality.GOOD)]
    assert_round_trip(readings, OPENER.open(sign(EARLIER_LAYOUT)).readings, 1)
    body = cbor2.loads(EARLIER_LAYOUT)
    body["float"]["k"] = b"\x02\x00\x00"
    with pytest.raises(EnvelopeError, match="format 2: float k does not hold 4 bytes"):
        OPENER.open(sign(cbor2.dumps(body)))


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=400))
def test_random_signed_bytes_are_refused_cleanly(data: bytes) -> None:
    refused_or_read(sign(data))


@settings(max_examples=400, deadline=None)
@given(positions=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                          max_size=4))  # fmt: skip
def test_valid_payloads_with_flipped_bytes_are_refused_cleanly(
    positions: list[tuple[int, int]],
) -> None:
    raw = bytearray(cbor2.dumps(VALID_BODY))
    for position, byte in positions:
        raw[position % len(raw)] = byte
    refused_or_read(sign(bytes(raw)))


cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=3), inner,
                                                                  max_size=4),
    max_leaves=20,
)  # fmt: skip


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


PATHS = _paths(VALID_BODY)


@settings(max_examples=600, deadline=None)
@given(path=st.sampled_from(PATHS), replacement=cbor_values)
def test_valid_payloads_with_a_field_replaced_are_refused_cleanly(
    path: tuple[Any, ...], replacement: Any
) -> None:
    """Every field and every element of a valid body replaced by any CBOR value."""
    body = cbor2.loads(cbor2.dumps(VALID_BODY))
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = replacement
    refused_or_read(sign(cbor2.dumps(body)))


def test_an_evicted_range_of_infinity_is_refused() -> None:
    """Found by the field-replacement fuzz: int(inf) raised OverflowError out of open()."""
    with pytest.raises(EnvelopeError, match="malformed batch: OverflowError"):
        OPENER.open(sign(cbor2.dumps({**VALID_BODY, "evicted": [[False, math.inf]]})))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"n": 10**9}, "reading count 1000000000 is not 0..100000"),
        ({"idx": [0, 0, 1, b"\x00"]}, "idx has 1 bytes, not 7 x 1"),
        ({"pk": b"\xa0\xe0\xe0"}, "pk gives a point an unknown type"),
        ({"pk": b"\x62\xe0"}, "pk does not hold 3 bytes"),
        ({"pk": b"\x71\xe0\xe0"}, "pk gives decimal places above 16"),
        ({"pk": b"\x62\xe0\x81"}, "pk gives decimal places to a point without floats"),
        ({"tx": b"\x02\x00\x05\x01"}, "tx holds an unknown type"),
        ({"tx": b"\x02\x00\x04"}, "tx does not hold 4 bytes"),
        ({"idx": [2, 3, b"\x00" * 7]}, "idx has a malformed zigzag width or data"),
        ({"idx": [2, 1, b"\x00" * 6]}, "idx has 6 bytes, not 7 x 1"),
        ({"ti": [3, 0, 4, b"\x00\x00\x00"]}, "ti has 3 bytes, not 7 x 4 bits"),
        ({"ti": [3, 0, 4, b"\x00\x00\x00\x10"]}, "ti is padded with bits that are not zero"),
        ({"ti": [3, 0, 3, b"\x00\x00\x00"]}, "ti has a malformed base, bits or data"),
        ({"q": [["fine"], [0, 7, 0, b""]]}, "q holds an invalid value 'fine'"),
        ({"np": 8}, "np 8 is not 0..7"),
        ({"float": {"k": b"", "x": [], "dec": [], "xor": b""}}, "float is not a map of x, dec"),
        ({"int": [[0, 0, 0, b""]]}, "int is not [first values, differences]"),
        ({"idx": [2, [1]]}, "idx has an unknown packing [2]"),
    ],
)
def test_malformed_columns_are_named_in_the_error(change: dict[str, Any], error: str) -> None:
    body = {**VALID_BODY, **change}
    with pytest.raises(EnvelopeError, match="format 2: " + error.replace("[", r"\[")):
        OPENER.open(sign(cbor2.dumps(body)))


# --------------------------------------------------------------------------- consumers


def test_completeness_is_proven_across_a_switch_of_format_in_one_epoch() -> None:
    """An operator changes `batch.format` and restarts: one epoch, batches of both formats, a
    declaration in format 2; the verifier accepts all and finds the stream complete, and a
    missing format-2 batch is a hole."""
    old, new = Sealer(KEY, payload_format=1), Sealer(KEY, payload_format=2)
    polls = [[Reading("plc", f"p{p}", t, t + p * 0.5, Quality.GOOD) for p in range(10)]
             for t in range(6)]  # fmt: skip
    messages = [seal(old, polls[0], first_seq=1, batch=1),
                seal(old, polls[1], first_seq=11, batch=2),
                seal(new, [], first_seq=21, batch=3, evicted=((21, 30),)),
                seal(new, polls[3], first_seq=31, batch=4),
                seal(new, polls[4], first_seq=41, batch=5),
                seal(new, polls[5], first_seq=51, batch=6)]  # fmt: skip
    complete = Verifier(OPENER)
    for message in [*messages, messages[3]]:  # and a duplicate, at least once delivery
        complete.check(message)
    assert complete.summary()[0] == 0
    stream = complete.tracker.streams[("gw", "ep")]
    assert (stream.readings, stream.duplicates, stream.evicted_count, stream.max_seq) == (
        50, 10, 10, 60)  # fmt: skip

    gap = Verifier(OPENER)
    for message in messages[:4] + messages[5:]:
        gap.check(message)
    assert gap.tracker.holes() == {("gw", "ep"): [(41, 50)]}
    assert gap.summary()[0] == 4


def test_the_verifier_applies_the_value_rules_to_format_2_readings() -> None:
    """A producer without the value rules sealing a good NaN: shown as bad, run fails (§4.4)."""
    verifier = Verifier(OPENER)
    batch, fresh = verifier.check(seal(Sealer(KEY, payload_format=2), VALID))
    assert batch is not None
    assert (fresh[-1]["v"], fresh[-1]["q"]) == (None, "bad")
    assert verifier.result.nonconforming == 1


# --------------------------------------------------------------------------- configuration

MINIMAL = "gateway: {id: g}\nsources: [{type: simulated, name: s}]\n"


def test_batch_format_defaults_to_2_and_accepts_1() -> None:
    assert parse_config(MINIMAL).batch.format == 2
    assert parse_config(MINIMAL + "batch: {format: 1}\n").batch.format == 1


def test_an_unknown_batch_format_is_refused_with_its_place() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(MINIMAL + "batch: {format: 3}\n")
    assert "batch.format" in str(caught.value)
