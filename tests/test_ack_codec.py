"""The consumer acknowledgement (docs/contract.md §4.10): built, opened, judged, and fuzzed.

Anyone who can publish on `{prefix}/{gw}/ack` can send anything: every such message must end in
an AckError with one of the refusal reasons, never in another exception and never in an Ack.
"""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_agent.seal.ack import (
    MAX_RANGES,
    REASONS,
    Ack,
    AckError,
    AckJudge,
    AckOpener,
    contains,
    normalize,
    seal_ack,
)
from edge_agent.seal.envelope import Sealer
from edge_agent.seal.keys import key_id

pytestmark = pytest.mark.unit

CONSUMER = Ed25519PrivateKey.generate()
OPENER = AckOpener([CONSUMER.public_key()])


def ack(key: Ed25519PrivateKey = CONSUMER, **fields: object) -> bytes:
    args: dict[str, object] = {
        "gateway": "gw",
        "epoch": "e1",
        "seqs": [[1, 30], [41, 50]],
        "batches": [[1, 5], [7, 7]],
        "issued_ns": 1_700_000_000_000_000_000,
        "consumer": "verify",
    }
    args.update(fields)
    return seal_ack(key, **args)  # type: ignore[arg-type]


def signed(body: object, *, header: object = None, key: Ed25519PrivateKey = CONSUMER) -> bytes:
    """Any payload, signed correctly with `key` under a good (or the given) protected header."""
    head = cbor2.dumps(header or {1: -8, 4: key_id(key.public_key()), 3: "application/cbor"})
    payload = cbor2.dumps(body)
    signature = key.sign(cbor2.dumps(["Signature1", head, b"", payload]))
    return cbor2.dumps(cbor2.CBORTag(18, [head, {}, payload, signature]))


GOOD_BODY = {
    "v": 1, "kind": "ack", "gateway": "gw", "epoch": "e1",
    "seqs": [[1, 3]], "batches": [[1, 1]], "issued": 5,
}  # fmt: skip


def test_round_trip() -> None:
    opened = OPENER.open(ack())
    assert opened == Ack(
        gateway="gw",
        epoch="e1",
        seqs=((1, 30), (41, 50)),
        batches=((1, 5), (7, 7)),
        issued_ns=1_700_000_000_000_000_000,
        kid=key_id(CONSUMER.public_key()),
        consumer="verify",
    )


def test_the_payload_is_exactly_the_map_of_the_contract() -> None:
    parts = cbor2.loads(ack(consumer=None)).value
    assert cbor2.loads(parts[0]) == {1: -8, 4: key_id(CONSUMER.public_key()), 3: "application/cbor"}
    assert parts[1] == {}
    assert set(cbor2.loads(parts[2])) == {
        "v",
        "kind",
        "gateway",
        "epoch",
        "seqs",
        "batches",
        "issued",
    }


def test_ranges_are_normalised_and_cut_to_the_highest() -> None:
    assert normalize([[5, 6], [1, 2], [3, 4], [10, 12], [11, 20]]) == ((1, 6), (10, 20))
    many = [[2 * n, 2 * n] for n in range(MAX_RANGES + 10)]
    kept = normalize(many)
    assert len(kept) == MAX_RANGES and kept[-1] == (2 * (MAX_RANGES + 9),) * 2
    with pytest.raises(ValueError):
        normalize([[3, 2]])
    with pytest.raises(ValueError):
        normalize([[True, 2]])


def test_covers_by_batch_number_or_by_whole_seq_range() -> None:
    opened = OPENER.open(ack())
    assert opened.covers(batch=7, first_seq=0, last_seq=0, readings=0)  # a declaration batch
    assert opened.covers(batch=9, first_seq=41, last_seq=50, readings=10)
    assert not opened.covers(batch=9, first_seq=25, last_seq=35, readings=11)  # part only
    assert not opened.covers(batch=6, first_seq=0, last_seq=0, readings=0)
    assert contains(((1, 3), (5, 9)), 5, 9) and not contains(((1, 3), (5, 9)), 3, 5)


def test_pycose_made_ack_verifies_with_our_decoder() -> None:
    """Interop: an independent COSE implementation (pycose) builds the ack; we open it."""
    from pycose.headers import KID, Algorithm, ContentType
    from pycose.keys import OKPKey
    from pycose.keys.curves import Ed25519
    from pycose.messages import Sign1Message

    d = CONSUMER.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    x = CONSUMER.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    message = Sign1Message(
        phdr={Algorithm: -8, KID: key_id(CONSUMER.public_key()), ContentType: "application/cbor"},
        payload=cbor2.dumps(GOOD_BODY),
    )
    message.key = OKPKey(crv=Ed25519, d=d, x=x)
    opened = OPENER.open(message.encode())
    assert (opened.gateway, opened.seqs, opened.batches, opened.issued_ns) == (
        "gw", ((1, 3),), ((1, 1),), 5,
    )  # fmt: skip


def test_pycose_verifies_our_ack() -> None:
    from pycose.keys import OKPKey
    from pycose.keys.curves import Ed25519
    from pycose.messages import Sign1Message

    decoded = Sign1Message.decode(ack())
    decoded.key = OKPKey(
        crv=Ed25519,
        x=CONSUMER.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        ),
    )
    assert decoded.verify_signature()


def reason(message: bytes, opener: AckOpener = OPENER) -> str:
    with pytest.raises(AckError) as caught:
        opener.open(message)
    assert caught.value.reason in REASONS and str(caught.value)
    return caught.value.reason


def test_refusal_reasons() -> None:
    stranger = Ed25519PrivateKey.generate()
    assert reason(ack(stranger)) == "unknown_key"
    forged = cbor2.loads(ack())
    forged.value[3] = stranger.sign(b"x")
    assert reason(cbor2.dumps(forged)) == "bad_signature"
    assert reason(b"") == "malformed"
    assert reason(b"\xff" * 10) == "malformed"
    assert reason(signed({**GOOD_BODY, "v": 2})) == "malformed"
    assert reason(signed({**GOOD_BODY, "extra": 1})) == "malformed"
    assert reason(signed({**GOOD_BODY, "seqs": [[3, 4], [5, 6]]})) == "malformed"  # adjacent
    assert reason(signed({**GOOD_BODY, "seqs": [[5, 6], [1, 2]]})) == "malformed"  # order
    assert reason(signed({**GOOD_BODY, "batches": [[1, 1]] * (MAX_RANGES + 1)})) == "malformed"
    assert reason(signed({**GOOD_BODY, "issued": 1.5})) == "malformed"
    assert reason(signed({**GOOD_BODY, "kind": "hwm"})) == "malformed"
    header = {1: -8, 4: key_id(CONSUMER.public_key()), 3: "application/cbor", "enc": "zstd"}
    assert reason(signed(GOOD_BODY, header=header)) == "malformed"  # never compressed
    assert reason(signed(GOOD_BODY, header={1: -7, 4: key_id(CONSUMER.public_key())})) == (
        "malformed"
    )
    crit = {1: -8, 2: [99], 4: key_id(CONSUMER.public_key())}
    assert reason(signed(GOOD_BODY, header=crit)) == "malformed"
    unsigned = cbor2.loads(ack())
    unsigned.value[1] = {4: b"12345678"}
    assert reason(cbor2.dumps(unsigned)) == "malformed"
    unsigned.value[1] = []
    assert reason(cbor2.dumps(unsigned)) == "malformed"


def test_a_batch_signed_by_the_gateway_is_not_an_ack() -> None:
    gateway_key = Ed25519PrivateKey.generate()
    batch = Sealer(gateway_key, compress=False).seal(
        gateway="gw", epoch="e1", batch=1, first_seq=1, readings=[], sealed_ns=1
    )
    assert reason(batch, AckOpener([gateway_key.public_key()])) == "malformed"


def test_judge_gateway_epoch_and_staleness() -> None:
    judge = AckJudge("gw")
    newer = OPENER.open(ack(issued_ns=200))
    judge.judge(newer, "e1")
    judge.judge(newer, "e1")  # the same retained ack again: accepted
    for opened, epoch, expected in (
        (OPENER.open(ack(gateway="other")), "e1", "wrong_gateway"),
        (OPENER.open(ack(issued_ns=100)), "e1", "stale"),
        (OPENER.open(ack(issued_ns=300)), "e2", "stale"),
    ):
        with pytest.raises(AckError) as caught:
            judge.judge(opened, epoch)
        assert caught.value.reason == expected


FUZZ = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_hostile_bytes_end_in_ack_error(data: bytes) -> None:
    try:
        OPENER.open(data)
    except AckError as exc:
        assert exc.reason in REASONS and str(exc)


CBOR_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.binary(max_size=16)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.integers() | st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip


@settings(FUZZ, max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(sorted(GOOD_BODY)) | st.text(max_size=8), CBOR_VALUES, max_size=9
    ),
    st.booleans(),
)
def test_fuzz_signed_payloads_are_acks_only_when_well_formed(body: dict, merge: bool) -> None:
    """Correctly signed payloads of any shape: a clear `malformed`, or an Ack that is right."""
    payload = {**GOOD_BODY, **body} if merge else body
    try:
        opened = OPENER.open(signed(payload))
    except AckError as exc:
        assert exc.reason == "malformed" and str(exc)
        return
    for ranges in (opened.seqs, opened.batches):
        assert all(0 <= a <= b for a, b in ranges)
        assert all(b[0] > a[1] + 1 for a, b in zip(ranges, ranges[1:], strict=False))


@FUZZ
@given(st.data())
def test_fuzz_mutated_acks_are_refused(data: st.DataObject) -> None:
    original = ack()
    message = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(message) - 1))
        message[at] = data.draw(st.integers(0, 255))
    assume(bytes(message) != original)
    with pytest.raises(AckError):
        OPENER.open(bytes(message))


@FUZZ
@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 20)), max_size=30),
    st.integers(0, 220),
    st.integers(0, 20),
)
def test_normalised_ranges_cover_exactly_what_was_given(
    spans: list[tuple[int, int]], first: int, width: int
) -> None:
    given_ = [[a, a + w] for a, w in spans]
    ranges = normalize(given_)
    members = {n for a, b in given_ for n in range(a, b + 1)}
    assert {n for a, b in ranges for n in range(a, b + 1)} == members
    assert contains(ranges, first, first + width) == all(
        n in members for n in range(first, first + width + 1)
    )
    assert OPENER.open(ack(seqs=given_)).seqs == ranges
