"""The wire format: batches round-trip, tampering is caught, and pycose agrees."""

from __future__ import annotations

import hashlib
import random

import cbor2
import pytest
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.errors import EnvelopeError, UnknownKeyError
from edge_agent.reading import Quality, Reading
from edge_agent.seal.envelope import Opener, PreviousEpoch, Sealer
from edge_agent.seal.keys import key_id, load_private_key, load_public_key, write_keypair

pytestmark = pytest.mark.unit

READINGS = [
    Reading("plc", "current", 1_700_000_000_000_000_000, 12.5, Quality.GOOD),
    Reading("plc", "running", 1_700_000_000_000_000_001, True, Quality.GOOD),
    Reading("plc", "tag", 1_700_000_000_000_000_002, "PUMP-7", Quality.UNCERTAIN),
    Reading("plc", "level", 1_700_000_000_000_000_003, None, Quality.BAD),
    Reading("ua", "speed", 1_700_000_000_000_000_004, 3, Quality.GOOD, code=0x40920000),
]


def seal(key: Ed25519PrivateKey, *, compress: bool = True, evicted: tuple = ()) -> bytes:
    return Sealer(key, compress=compress).seal(
        gateway="gw",
        epoch="ep",
        batch=7,
        first_seq=101,
        readings=READINGS,
        sealed_ns=42,
        evicted=evicted,
    )


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_keeps_every_field(compress: bool) -> None:
    key = Ed25519PrivateKey.generate()
    batch = Opener([key.public_key()]).open(seal(key, compress=compress, evicted=((1, 50),)))
    assert (batch.gateway, batch.epoch, batch.batch, batch.sealed_ns) == ("gw", "ep", 7, 42)
    assert batch.evicted == [(1, 50)]
    assert [r["seq"] for r in batch.readings] == [101, 102, 103, 104, 105]
    assert [r["v"] for r in batch.readings] == [12.5, True, "PUMP-7", None, 3]
    assert [r["q"] for r in batch.readings] == ["good", "good", "uncertain", "bad", "good"]
    assert batch.readings[0]["ts"] == 1_700_000_000_000_000_000
    assert batch.readings[4]["sc"] == 0x40920000
    assert "sc" not in batch.readings[0]


def test_headers_follow_the_contract() -> None:
    key = Ed25519PrivateKey.generate()
    message = cbor2.loads(seal(key))
    assert message.tag == 18
    protected = cbor2.loads(message.value[0])
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert protected == {
        1: -8,
        4: hashlib.sha256(raw).digest()[:8],
        3: "application/cbor",
        "enc": "zstd",
    }
    body = cbor2.loads(zstandard.ZstdDecompressor().decompress(message.value[2]))
    assert body["v"] == 1
    assert "enc" not in cbor2.loads(cbor2.loads(seal(key, compress=False)).value[0])


def test_tampered_payload_is_rejected() -> None:
    key = Ed25519PrivateKey.generate()
    message = cbor2.loads(seal(key, compress=False))
    body = cbor2.loads(message.value[2])
    body["readings"][0]["v"] = 99.9
    message.value[2] = cbor2.dumps(body)
    with pytest.raises(EnvelopeError, match="bad signature"):
        Opener([key.public_key()]).open(cbor2.dumps(message))


def test_unknown_key_is_named() -> None:
    key, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    with pytest.raises(UnknownKeyError, match=key_id(key.public_key()).hex()):
        Opener([other.public_key()]).open(seal(key))


def test_garbage_is_rejected_cleanly() -> None:
    opener = Opener([Ed25519PrivateKey.generate().public_key()])
    for junk in (b"", b"\xff\x00", cbor2.dumps([1, 2, 3]), cbor2.dumps(cbor2.CBORTag(18, [1]))):
        with pytest.raises(EnvelopeError):
            opener.open(junk)


def test_pycose_verifies_our_batches(tmp_path) -> None:
    """An independent COSE implementation (pycose, with cbor2 < 6) accepts the signature."""
    from pycose.keys import OKPKey
    from pycose.keys.curves import Ed25519
    from pycose.messages import Sign1Message

    write_keypair(tmp_path)
    private = load_private_key(tmp_path / "signing.key")
    raw = load_public_key(tmp_path / "signing.pub").public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    decoded = Sign1Message.decode(seal(private))
    decoded.key = OKPKey(crv=Ed25519, x=raw)
    assert decoded.verify_signature()
    body = cbor2.loads(zstandard.ZstdDecompressor().decompress(decoded.payload))
    assert len(body["readings"]) == len(READINGS)


def test_keygen_writes_private_key_0600(tmp_path) -> None:
    kid = write_keypair(tmp_path)
    assert (tmp_path / "signing.key").stat().st_mode & 0o777 == 0o600
    assert key_id(load_public_key(tmp_path / "signing.pub")) == kid
    with pytest.raises(FileExistsError):
        write_keypair(tmp_path)


def test_private_key_readable_by_others_is_refused(tmp_path) -> None:
    write_keypair(tmp_path)
    (tmp_path / "signing.key").chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        load_private_key(tmp_path / "signing.key")


@pytest.mark.parametrize(
    "message",
    [
        cbor2.dumps(cbor2.CBORTag(18, [b"\xff\xff", {}, b"", b"sig"])),  # truncated header
        cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps([1, 2]), {}, b"", b"sig"])),  # header a list
        cbor2.dumps(cbor2.CBORTag(18, [cbor2.dumps({1: -8, 4: b"k"}), {}, b"", 7])),  # int sig
        b"\xd2\x84\x43",  # truncated COSE
    ],
)
def test_malformed_messages_are_rejected_not_crashing(message: bytes) -> None:
    with pytest.raises(EnvelopeError):
        Opener([Ed25519PrivateKey.generate().public_key()]).open(message)


# The readings' array is written without cbor2.dumps per map: the bytes must be cbor2's.

VALUES = [0, 1, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1, -1, -24, -25,
          -(2**63), 1.5, -0.0, 0.1, 1e300, True, False, None, "", "é", "x" * 300, "a" * 70000,
          "PUMP-7"]  # fmt: skip


def cbor2_body(
    readings: list[Reading], first_seq: int, evicted: list[list[int]], notes: dict[str, object]
) -> bytes:
    """The payload as cbor2 writes the map of docs/contract.md §4 (the reference)."""
    items = [
        {"seq": seq, "src": r.src, "pt": r.pt, "ts": r.ts_ns, "v": r.value, "q": r.quality.value}
        | ({} if r.code is None else {"sc": r.code})
        for seq, r in enumerate(readings, first_seq)
    ]
    body = {"v": 1, "gateway": "gw", "epoch": "ep", "batch": 7, "readings": items, "sealed": 42,
            "evicted": evicted, **notes}  # fmt: skip
    return bytes(cbor2.dumps(body))


@pytest.mark.parametrize("first_seq", [1, 23, 24, 250, 65_530, 2**32 - 3, 2**40])
def test_the_payload_is_byte_for_byte_what_cbor2_writes(first_seq: int) -> None:
    rng = random.Random(first_seq)
    readings = [
        Reading(rng.choice(["plc", "é" * 30, "x" * 24]), f"p{i % 50}",
                rng.choice([0, 23, 2**40, 1_700_000_000_000_000_000, -5]), rng.choice(VALUES),
                rng.choice(list(Quality)), rng.choice([None, None, 0, 2**31 + 5, 2**40]))
        for i in range(2000)
    ]  # fmt: skip
    sealer = Sealer(Ed25519PrivateKey.generate(), compress=False)
    ended = {"epoch": "old", "last_seq": 6000, "ended": "quarantined", "detail": "quick_check"}
    cases: list[tuple[list[list[int]], list[str], dict[str, object] | None]] = [
        ([], [], None),
        ([[1, 50], [70, 2**33]], [], None),
        ([[1, 50]], ["too_large"], ended),
        ([], [], ended),
    ]
    for evicted, reasons, previous in cases:
        message = cbor2.loads(
            sealer.seal(gateway="gw", epoch="ep", batch=7, first_seq=first_seq,
                        readings=readings, sealed_ns=42, evicted=[(e[0], e[1]) for e in evicted],
                        reasons=reasons, previous_epoch=previous)
        )  # fmt: skip
        notes: dict[str, object] = {}
        if evicted:
            notes["evicted_reasons"] = reasons or ["retention"] * len(evicted)
        if previous is not None:
            notes["previous_epoch"] = previous
        assert message.value[2] == cbor2_body(readings, first_seq, evicted, notes)


def test_text_that_cannot_be_encoded_fails_as_with_cbor2() -> None:
    """A lone surrogate: both refuse it with a ValueError, which the batcher handles."""
    bad = [Reading("plc", "tag", 1, "\udcff", Quality.GOOD)]
    with pytest.raises(ValueError):  # noqa: PT011 - the type is the contract with the batcher
        cbor2.dumps(bad[0].value)
    with pytest.raises(ValueError):  # noqa: PT011
        Sealer(Ed25519PrivateKey.generate()).seal(
            gateway="gw", epoch="ep", batch=1, first_seq=1, readings=bad, sealed_ns=1
        )


@pytest.mark.parametrize("payload_format", [1, 2])
def test_eviction_reasons_round_trip_and_default_to_retention(payload_format: int) -> None:
    key = Ed25519PrivateKey.generate()
    opener = Opener([key.public_key()])
    sealer = Sealer(key, payload_format=payload_format)
    common = {"gateway": "gw", "epoch": "ep", "batch": 1, "first_seq": 31, "readings": [],
              "sealed_ns": 1}  # fmt: skip
    said = opener.open(sealer.seal(**common, evicted=[(1, 10), (21, 30)],
                                   reasons=["retention", "too_large"]))  # fmt: skip
    assert said.evicted_reasons == ["retention", "too_large"]
    unsaid = opener.open(sealer.seal(**common, evicted=[(1, 10)]))
    assert unsaid.evicted_reasons == ["retention"]
    assert opener.open(sealer.seal(**common)).evicted_reasons == []
    with_readings = {**common, "readings": [Reading("s", "p", 5, 1.5, Quality.GOOD)]}
    opened = opener.open(sealer.seal(**with_readings, evicted=[(1, 10)], reasons=["undeliverable"]))
    assert (opened.evicted_reasons, [r["seq"] for r in opened.readings]) == (
        ["undeliverable"],
        [31],
    )
    with pytest.raises(ValueError, match="1 reasons for 2 evicted ranges"):
        sealer.seal(**common, evicted=[(1, 10), (21, 30)], reasons=["too_large"])


def test_a_batch_from_before_eviction_reasons_reads_as_retention() -> None:
    """Older agents sent `evicted` without `evicted_reasons`: every range was retention."""
    key = Ed25519PrivateKey.generate()
    body = {"v": 1, "gateway": "gw", "epoch": "ep", "batch": 1, "readings": [], "sealed": 1,
            "evicted": [[1, 10]]}  # fmt: skip
    batch = Opener([key.public_key()]).open(signed(key, cbor2.dumps(body)))
    assert (batch.evicted, batch.evicted_reasons) == ([(1, 10)], ["retention"])


@pytest.mark.parametrize("reasons", [["too_large", "extra"], "too_large", [7]])
def test_eviction_reasons_that_do_not_match_the_ranges_are_rejected(reasons: object) -> None:
    key = Ed25519PrivateKey.generate()
    body = {"v": 1, "gateway": "gw", "epoch": "ep", "batch": 1, "readings": [], "sealed": 1,
            "evicted": [[1, 10]], "evicted_reasons": reasons}  # fmt: skip
    with pytest.raises(EnvelopeError, match="one text per evicted range"):
        Opener([key.public_key()]).open(signed(key, cbor2.dumps(body)))


@pytest.mark.parametrize("payload_format", [1, 2])
def test_previous_epoch_round_trips_in_both_formats(payload_format: int) -> None:
    """A new epoch's first declaration says how the previous one ended (contract §4.3, 1.8)."""
    key = Ed25519PrivateKey.generate()
    opener = Opener([key.public_key()])
    sealer = Sealer(key, payload_format=payload_format)
    common = {"gateway": "gw", "epoch": "new", "batch": 1, "first_seq": 1, "readings": [],
              "sealed_ns": 1}  # fmt: skip
    ended = {"epoch": "old", "last_seq": 6000, "ended": "quarantined", "detail": "quick_check"}
    alone = opener.open(sealer.seal(**common, previous_epoch=ended))
    assert alone.previous_epoch == PreviousEpoch("old", 6000, "quarantined", "quick_check")
    assert alone.evicted == [] and alone.readings == []
    unknown = {"epoch": None, "last_seq": None, "ended": "quarantined", "detail": "not a database"}
    with_evictions = opener.open(
        sealer.seal(**common, evicted=[(1, 10)], reasons=["too_large"], previous_epoch=unknown)
    )
    assert with_evictions.previous_epoch == PreviousEpoch(
        None, None, "quarantined", "not a database"
    )
    assert with_evictions.evicted_reasons == ["too_large"]
    assert opener.open(sealer.seal(**common)).previous_epoch is None, "absent unless given"


@pytest.mark.parametrize("payload_format", [1, 2])
@pytest.mark.parametrize(
    "previous",
    [
        "quarantined",
        {"epoch": 7, "last_seq": 1, "ended": "missing", "detail": ""},
        {"epoch": "old", "last_seq": -1, "ended": "missing", "detail": ""},
        {"epoch": "old", "last_seq": True, "ended": "missing", "detail": ""},
        {"epoch": "old", "last_seq": 1, "detail": ""},
    ],
)
def test_a_malformed_previous_epoch_is_rejected(payload_format: int, previous: object) -> None:
    key = Ed25519PrivateKey.generate()
    body: dict[str, object] = {"v": payload_format, "gateway": "gw", "epoch": "ep", "batch": 1,
                               "sealed": 1, "evicted": [], "previous_epoch": previous}  # fmt: skip
    if payload_format == 1:
        body["readings"] = []
    else:
        columns = cbor2.loads(zstandard.ZstdDecompressor().decompress(
            cbor2.loads(Sealer(key, payload_format=2).seal(
                gateway="gw", epoch="ep", batch=1, first_seq=1, readings=[], sealed_ns=1
            )).value[2]
        ))  # fmt: skip
        body = {**columns, "previous_epoch": previous}
    with pytest.raises(EnvelopeError, match="previous_epoch"):
        Opener([key.public_key()]).open(signed(key, cbor2.dumps(body)))


def signed(key: Ed25519PrivateKey, payload: bytes) -> bytes:
    """A COSE_Sign1 message over `payload`, uncompressed, built by hand as §4 describes."""
    protected = cbor2.dumps({1: -8, 4: key_id(key.public_key()), 3: "application/cbor"})
    signature = key.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
    return cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, signature]))
