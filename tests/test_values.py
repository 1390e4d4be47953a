"""The value rules every protocol obeys (edge_agent/reading.py), and the last check before sealing.

Field cases of issue 8: Modbus text `0x4142 0x00FF 0xFFFF` must read "AB" (it read bad, silently)
and `"VNSE3\\0-0"` must read "VNSE3" (it arrived with the NUL and what followed); an OPC UA NaN or
infinity with Good status must never be a good number.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.consumer.verify import Verifier
from edge_agent.metrics import Metrics
from edge_agent.reading import (
    INT_MAX,
    INT_MIN,
    Quality,
    Reading,
    RejectedValue,
    check_number,
    check_time_ns,
    checked,
    clean_text,
    conforming,
    needs_check,
)
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Opener, Sealer
from edge_agent.store.sqlite import Store

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (bytes.fromhex("4142 00FF FFFF"), "AB"),  # issue 8: NUL, then erased-flash bytes
        (b"VNSE3\x00-0", "VNSE3"),  # issue 8: text ends at the first NUL, as in C
        (b"PUMP1   ", "PUMP1"),  # space padding of a fixed-width field
        (b"PUMP1\xff\xff\xff", "PUMP1"),  # 0xFF padding (erased EEPROM)
        (b"AB \xff \xff", "AB"),  # mixed padding
        (b"\x00garbage", ""),  # an empty C string
        (b"", ""),
        (b"  left", "  left"),  # leading spaces are the device's text
        ("Stra\u00dfe 7".encode(), "Straße 7"),  # multi-byte UTF-8 is kept
        ("VNSE3\x00-0", "VNSE3"),  # text a library already decoded follows the same rule
        ("OK  \udcff\udcff", "OK"),  # asyncua's surrogateescape of 0xFF padding
        ("Stra\udcc3\udc9fe", "Straße"),  # escaped bytes that are valid UTF-8 together
    ],
)
def test_text_is_cut_at_the_first_nul_and_loses_its_padding(raw: bytes | str, text: str) -> None:
    assert clean_text(raw) == text


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        (b"OK\xc3(", "byte 0xC3 at offset 2"),  # a lead byte without its continuation
        (b"Stra\xdfe", "byte 0xDF at offset 4"),  # Latin-1, not UTF-8
        (b"\xfe\xff", "byte 0xFE at offset 0"),  # 0xFF is padding only at the end
        ("OK\udcc3(", "byte 0xC3 at offset 2"),  # the same bytes through asyncua
        ("a\ud800", "lone surrogate U+D800 at 1"),
    ],
)
def test_text_that_is_not_utf8_is_refused_with_the_byte_named(raw: bytes | str, error: str) -> None:
    with pytest.raises(RejectedValue, match=re.escape(error)):
        clean_text(raw)


@pytest.mark.parametrize(
    ("value", "name"),
    [(math.nan, "NaN"), (math.inf, r"\+Infinity"), (-math.inf, "-Infinity")],
)
def test_non_finite_floats_are_refused(value: float, name: str) -> None:
    with pytest.raises(RejectedValue, match=f"value is {name}"):
        check_number(value)


def test_integers_are_kept_within_the_64_bit_types_and_refused_beyond() -> None:
    for value in (INT_MIN, -1, 0, 2**53 + 1, 2**63 - 1, 2**63, INT_MAX, True):
        assert check_number(value) == value
    for value in (INT_MIN - 1, INT_MAX + 1, 10**30):
        with pytest.raises(RejectedValue, match="outside -2\\*\\*63..2\\*\\*64-1"):
            check_number(value)
    # what is kept encodes as a plain CBOR integer, never a bignum tag (2 or 3)
    assert not isinstance(cbor2.loads(cbor2.dumps(INT_MAX)), cbor2.CBORTag)
    assert cbor2.dumps(INT_MAX + 1)[0] == 0xC2  # tag 2: what the rule keeps off the wire


def test_time_values_must_fit_int64_nanoseconds() -> None:
    assert check_time_ns(0) == 0
    opc_null_date = -11_644_473_600 * 10**9  # 1601-01-01, OPC UA's "no date"
    with pytest.raises(RejectedValue, match="1677..2262"):
        check_time_ns(opc_null_date)


def test_checked_is_idempotent_and_refuses_what_is_no_reading_type() -> None:
    for value in (None, True, 0, -5, 2.5, "text", "", INT_MAX):
        assert checked(value) == value
        assert checked(checked(value)) == checked(value)
    assert checked("AB\x00junk") == "AB"
    with pytest.raises(RejectedValue, match="a list is not a reading value"):
        checked([1, 2])


def test_conforming_makes_a_refused_value_bad_and_keeps_the_code() -> None:
    readings = [
        Reading("opc", "speed", 1, math.nan, Quality.GOOD, 0),
        Reading("opc", "ratio", 1, math.inf, Quality.UNCERTAIN, 0x40900000),
        Reading("opc", "tag", 1, "OK\udcc3(", Quality.GOOD, 0),
        Reading("plc", "ok", 1, 1.5, Quality.GOOD),
    ]
    fixed, changed = conforming(readings)
    assert [(r.value, r.quality, r.code) for r in fixed] == [
        (None, Quality.BAD, 0),
        (None, Quality.BAD, 0x40900000),
        (None, Quality.BAD, 0),
        (1.5, Quality.GOOD, None),
    ]
    assert [reason for _, reason in changed] == [
        "value is NaN",
        "value is +Infinity",
        "text is not UTF-8: byte 0xC3 at offset 2",
    ]


def test_the_cheap_scan_finds_every_number_that_breaks_a_rule() -> None:
    fine = [Reading("s", "p", 1, v, Quality.GOOD) for v in (1.5, 7, True, None, "x", INT_MAX)]
    assert not needs_check(fine)
    for bad in (math.nan, -math.inf, INT_MAX + 1, INT_MIN - 1, [1]):
        assert needs_check([*fine, Reading("s", "p", 1, bad, Quality.GOOD)]), bad


async def test_nothing_against_the_rules_is_sealed_as_a_value(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The batcher's last check: a source bug can put neither NaN nor unencodable text in a
    signed batch, and text CBOR cannot encode (it crashed sealing before) no longer stops it."""
    store = Store(tmp_path / "b.db", max_bytes=1024 * 1024, max_age_s=86400)
    await store.open()
    key = Ed25519PrivateKey.generate()
    batcher = Batcher(store, Sealer(key), Metrics(), gateway="gw", max_readings=100,
                      max_delay=1, capacity=1000)  # fmt: skip
    await batcher.emit([
        Reading("sim", "nan", 1, math.nan, Quality.GOOD),
        Reading("sim", "inf", 1, math.inf, Quality.UNCERTAIN, 0x40900000),
        Reading("sim", "ok", 1, 2.5, Quality.GOOD),
    ])  # fmt: skip
    await batcher.seal_pending()
    await batcher.emit([
        Reading("opc", "tag", 2, "OK\udcc3(", Quality.GOOD, 0),
        Reading("opc", "ok", 2, "fine", Quality.GOOD, 0),
    ])  # fmt: skip
    await batcher.seal_pending()
    opener = Opener([key.public_key()])
    got = [r for b in await store.take(10) for r in opener.open(b.data).readings]
    assert [(r["pt"], r["v"], r["q"], r.get("sc")) for r in got] == [
        ("nan", None, "bad", None),
        ("inf", None, "bad", 0x40900000),
        ("ok", 2.5, "good", None),
        ("tag", None, "bad", 0),
        ("ok", "fine", "good", 0),
    ]
    errors = [r.getMessage() for r in caplog.records if "refused by the value rules" in r.message]
    assert errors == [
        "Reading refused by the value rules, sealed as bad point=sim.nan error=value is NaN",
        "Reading refused by the value rules, sealed as bad point=sim.inf error=value is +Infinity",
        "Reading refused by the value rules, sealed as bad point=opc.tag "
        "error=text is not UTF-8: byte 0xC3 at offset 2",
    ]
    await store.close()


def test_the_reference_consumer_applies_the_same_rules_and_fails_the_run() -> None:
    """A batch from a producer without the rules: what breaks them is shown as bad and the run
    exits 3 ("readings not as §4 says"); text is the producer's to clean and passes as sent."""
    key = Ed25519PrivateKey.generate()
    payload = Sealer(key).seal(
        gateway="gw",
        epoch="e",
        batch=1,
        first_seq=1,
        readings=[
            Reading("plc", "big", 1, INT_MAX + 1, Quality.GOOD),  # a CBOR bignum on the wire
            Reading("plc", "nan", 1, math.nan, Quality.UNCERTAIN, 0x40900000),
            Reading("plc", "tag", 1, "PUMP1  ", Quality.GOOD),
            Reading("plc", "ok", 1, 2.5, Quality.GOOD),
        ],
        sealed_ns=1,
    )
    verifier = Verifier(Opener([key.public_key()]))
    batch, fresh = verifier.check(payload)
    assert batch is not None
    assert [(r["pt"], r["v"], r["q"]) for r in fresh] == [
        ("big", None, "bad"),
        ("nan", None, "bad"),
        ("tag", "PUMP1  ", "good"),
        ("ok", 2.5, "good"),
    ]
    assert fresh[1]["sc"] == 0x40900000  # the device's code is kept
    code, lines = verifier.summary()
    assert code == 3
    assert lines[-1] == (
        "NONCONFORMING 2 readings broke the value rules (shown as bad, v null); first: "
        f"gateway=gw seq=1 plc.big: integer {INT_MAX + 1} is outside -2**63..2**64-1"
    )
    assert not any(line.startswith("OK:") for line in lines)
