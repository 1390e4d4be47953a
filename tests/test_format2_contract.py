"""Payload format 2 against its contract (docs/contract.md §4.9), adversarially.

- An independent decoder, written from §4.9's text alone (not from `columnar`), decodes what the
  reference encoder writes, batch after batch through one warm Sealer (the encoder's cached
  batch shapes and learnt decimal places must never leak into a batch's meaning).
- A warm Sealer and a fresh one seal the same readings to payloads that decode alike.
- ingest's COPY rows from columns equal the rows from maps, for every batch.
- Hostile signed payloads that would make a small message decode into gigabytes (integers that
  accumulation repeats, name parts that joining repeats) are refused with EnvelopeError before
  they are built.
"""

from __future__ import annotations

import contextlib
import struct
import sys
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_payload_format import KEY, OPENER, VALID_BODY, readings_strategy, seal, sign
from test_payload_format import values as any_value

sys.path.insert(0, str(Path(__file__).parent / "interop"))
import catalogue_contract  # noqa: E402

from edge_agent.consumer.ingest.rows import NonconformingError, RowMaker
from edge_agent.errors import EnvelopeError
from edge_agent.reading import Quality, Reading
from edge_agent.seal import columnar
from edge_agent.seal.envelope import Opener, Sealer

pytestmark = pytest.mark.unit

COLUMNS_OPENER = Opener([KEY.public_key()], columns=True)


# --------------------------------------------------------------------------- §4.9, read alone


def contract_decode(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A self-contained format-2 payload read by tests/interop/catalogue_contract.py, the
    decoder written from §4.9 and §4.12's text alone (it imports nothing of edge_agent)."""
    return catalogue_contract.decode(body, {})


def payload_of(message: bytes) -> dict[str, Any]:
    payload = cbor2.loads(message).value[2]
    with contextlib.suppress(zstandard.ZstdError):  # a Sealer of compress=False
        payload = zstandard.ZstdDecompressor().decompress(payload)
    body: dict[str, Any] = cbor2.loads(payload)
    return body


def bits_of(readings: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each reading with its value's type, floats as their bits (NaN payloads, -0.0)."""
    return [
        (
            *(r[k] for k in ("seq", "src", "pt", "ts", "q")),
            r.get("sc"),
            type(r["v"]),
            struct.pack("<d", r["v"]) if isinstance(r["v"], float) else r["v"],
        )  # fmt: skip
        for r in readings
    ]


def expected_of(readings: list[Reading], first: int) -> list[tuple[Any, ...]]:
    return bits_of(
        [
            {
                "seq": first + i,
                "src": r.src,
                "pt": r.pt,
                "ts": r.ts_ns,
                "q": Quality(r.quality).value,
                "sc": r.code,
                "v": r.value,
            }
            for i, r in enumerate(readings)
        ]  # fmt: skip
    )


# --------------------------------------------------------------------------- round trips

points = st.sampled_from(["a", "b", "pump.P1.flow", "", ".", "x.y.", "line\nbreak", "ü.ß", "a.b"])


@st.composite
def batch_streams(draw: st.DrawFn) -> list[list[Reading]]:
    """Batches of few shapes coming back: the same point list, reordered, with values of any
    type and any places, so that the encoder's caches are exercised while they are warm."""
    shapes = draw(st.lists(st.lists(st.tuples(points, points), min_size=1, max_size=12),
                           min_size=1, max_size=3))  # fmt: skip
    batches = []
    for _ in range(draw(st.integers(1, 6))):
        shape = draw(st.sampled_from(shapes))
        if draw(st.booleans()):
            shape = draw(st.permutations(shape))
        kind = draw(st.sampled_from(["any", "decimals", "one"]))
        decimal = st.integers(-(10**8), 10**8).flatmap(
            lambda m: st.integers(0, 16).map(lambda k: m / 10**k)
        )
        strategy = {"any": any_value, "decimals": decimal, "one": st.just(draw(any_value))}[kind]
        batches.append([
            Reading(src, pt, draw(st.integers(0, 3)) * 10**9, draw(strategy),
                    draw(st.sampled_from(list(Quality))), draw(st.none() | st.integers(-3, 3)))
            for src, pt in shape
        ])  # fmt: skip
    return batches


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batch_streams())
def test_an_independent_decoder_reads_every_batch_of_a_warm_encoder(
    batches: list[list[Reading]],
) -> None:
    """Batch after batch through one Sealer: the contract's decoder, the reference decoder and
    the readings sealed agree bit for bit; a fresh Sealer's payload decodes alike."""
    warm = Sealer(KEY, payload_format=2)
    first = 1
    for number, readings in enumerate(batches, 1):
        message = seal(warm, readings, first_seq=first, batch=number)
        expected = expected_of(readings, first)
        assert bits_of(contract_decode(payload_of(message))) == expected
        assert bits_of(OPENER.open(message).readings) == expected
        fresh = seal(Sealer(KEY, payload_format=2), readings, first_seq=first, batch=number)
        assert bits_of(contract_decode(payload_of(fresh))) == expected
        first += len(readings)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=st.lists(readings_strategy, min_size=1, max_size=3))
def test_an_independent_decoder_reads_any_readings(batches: list[list[Reading]]) -> None:
    sealer = Sealer(KEY, payload_format=2, compress=False)
    first = 1
    for readings in batches:
        message = seal(sealer, readings, first_seq=first)
        assert bits_of(contract_decode(payload_of(message))) == expected_of(readings, first)
        first += len(readings)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches=batch_streams())
def test_copy_rows_from_columns_equal_rows_from_maps(batches: list[list[Reading]]) -> None:
    """ingest's column path (COPY rows made from `Columns`) and its map path agree on every
    batch: the same lines, or both refuse it (a NaN, text holding NUL...)."""
    sealer = Sealer(KEY, payload_format=2)
    first = 1
    for readings in batches:
        message = seal(sealer, readings, first_seq=first)
        columns = COLUMNS_OPENER.open(message).columns
        assert columns is not None
        maps = OPENER.open(message).readings
        try:
            from_maps: list[str] | str = RowMaker().rows("gw", "ep", maps)
        except NonconformingError:
            from_maps = "refused"
        try:
            from_columns: list[str] | str = RowMaker().column_rows("gw", "ep", columns)
        except NonconformingError:
            from_columns = "refused"
        assert from_columns == from_maps
        first += len(readings)


def test_a_point_list_that_comes_back_after_eviction_still_round_trips() -> None:
    """Shapes evicted from the encoder's bound (20,000 readings' worth) and seen again, with the
    points' types and places changed in between."""
    sealer = Sealer(KEY, payload_format=2)
    size = 7_000
    shapes = [[("s", f"e{start}.p{i}") for i in range(size)] for start in range(4)]
    values: list[Callable[[int], Any]] = [
        lambda i: i * 0.25,
        lambda i: i if i % 3 else None,
        lambda i: f"t{i}" if i % 2 else float(i) / 1000,
        lambda i: (-1) ** i * 2**63 + i,
    ]
    first = 1
    for round_ in range(3):
        for number, shape in enumerate(shapes):
            make = values[(number + round_) % len(values)]
            readings = [Reading(s, p, 5, make(i), Quality.GOOD) for i, (s, p) in enumerate(shape)]
            message = seal(sealer, readings, first_seq=first)
            assert bits_of(contract_decode(payload_of(message))) == expected_of(readings, first)
            first += size


# --------------------------------------------------------------------------- hostile payloads

_N = 2_000
_BIG = 2 ** (8 * 20_000)  # 20 kB: 2,000 copies of it are 40 MB


def _body(**change: Any) -> dict[str, Any]:
    """A valid body of _N null readings of one point at one time, with `change` applied."""
    zero = [0, 0, 0, b""]
    body = {**VALID_BODY, "n": _N, "np": 1, "src": ["s"], "ps": zero, "tok": "a",
            "pn": [0, 1, 0, b""], "pi": zero, "idx": zero, "t0": 0, "nt": 1, "ts": zero,
            "ti": zero, "pk": b"\x00",
            "tx": b"", "q": [["good"], [0, _N, 0, b""]], "sc": [[None], [0, _N, 0, b""]],
            "bool": b"", "int": [zero, zero], "float": {"x": [], "dec": [zero, zero], "xor": b""},
            "text": []}  # fmt: skip
    return {**body, **change}


def test_the_hostile_template_opens() -> None:
    assert len(OPENER.open(sign(cbor2.dumps(_body()))).readings) == _N


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"seq": _BIG}, "seq"),
        ({"t0": _BIG, "nt": _N, "ts": [0, 1, 0, b""], "ti": [0, 1, 0, b""]}, "t0"),
        ({"nt": 2, "ts": [0, 1, 0, b""], "ti": [1, [_BIG] + [0] * (_N - 1)]}, "ti"),
        ({"np": 2, "pk": b"\x00\x00", "idx": [1, [_BIG] + [0] * (_N - 1)]}, "idx"),
        ({"pk": b"\x40", "int": [[0, _BIG, 0, b""], [0, 0, 0, b""]]}, "int first values"),
        ({"pk": b"\x40", "int": [[0, 0, 0, b""], [1, [_BIG] + [0] * (_N - 2)]]},
         "int differences"),
    ],
)  # fmt: skip
def test_huge_integers_that_decoding_would_repeat_are_refused(
    change: dict[str, Any], error: str
) -> None:
    """A 20 kB integer once in the payload, repeated by accumulation (or by `seq + i`) for
    every reading: 40 MB decoded from a payload of 20 kB; refused before it is built."""
    message = sign(cbor2.dumps(_body(**change)))
    tracemalloc.start()
    try:
        with pytest.raises(EnvelopeError, match=rf"format 2: {error} .*beyond \+-2\^1088"):
            OPENER.open(message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_name_parts_that_joining_would_repeat_are_refused() -> None:
    """One 100 kB name part, named twice by each of 2,000 points: 400 MB of point names (and as
    much again in ingest's COPY rows) from a payload of 100 kB; refused before the join."""
    steps = b"\x00" + b"\x01" * (_N - 1)
    body = _body(np=_N, tok="x" * 100_000, pn=[0, 2, 0, b""], idx=[0, 0, 1, steps], pk=bytes(_N))
    message = sign(cbor2.dumps(body))
    tracemalloc.start()
    try:
        with pytest.raises(EnvelopeError, match="format 2: the point names .* characters"):
            OPENER.open(message)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


def test_long_names_within_the_bound_still_open() -> None:
    readings = [Reading("s" * 1000, f"{'n' * 5000}.{i}", 1, i, Quality.GOOD) for i in range(300)]
    assert bits_of(OPENER.open(seal(Sealer(KEY, payload_format=2), readings)).readings) == (
        expected_of(readings, 1)
    )


def test_a_mixed_point_whose_readings_are_all_of_one_type_is_refused() -> None:
    """`pk` 7 says the point's readings are of more than one type; a `tx` giving them all one
    type contradicts it (the encoder never writes it: the point would be of that type)."""
    body = _body(pk=b"\xe0", tx=bytes(_N))
    with pytest.raises(EnvelopeError, match="format 2: tx gives mixed point 0 one type only"):
        OPENER.open(sign(cbor2.dumps(body)))
    mixed = _body(pk=b"\xe0", tx=bytes(_N - 1) + b"\x01", bool=b"\x01")
    assert len(OPENER.open(sign(cbor2.dumps(mixed))).readings) == _N


@settings(max_examples=300, deadline=None)
@given(counts=st.lists(st.integers(1, 9), max_size=12))
def test_name_parts_by_layer_come_back_name_after_name(counts: list[int]) -> None:
    """The decoder's layer walk (`_name_order`) undoes the encoder's layer order (`_layers`)."""
    words = [f"w{i}" for i in range(sum(counts))]
    by_layer = [words[i] for i in columnar._layers(counts)]
    assert columnar._name_order(by_layer, counts) == words
