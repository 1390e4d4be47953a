"""The verifier against hostile batches: header rules, the algorithm allow-list, bit flips,
replays and keys it does not know; and the envelope decoder fuzzed with Hypothesis.

Anyone who can publish on a batch topic can send anything (docs/contract.md §5.5): every such
message must end as a counted rejection with a reason, never as data and never as a crash.
"""

from __future__ import annotations

import random

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from edge_agent.consumer.verify import Verifier
from edge_agent.errors import EnvelopeError, UnknownKeyError
from edge_agent.reading import Quality, Reading
from edge_agent.seal.envelope import Opener, Sealer

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()
READINGS = [
    Reading("plc", "t", 1_700_000_000_000_000_000, 21.5, Quality.GOOD),
    Reading("plc", "s", 1_700_000_000_000_000_001, "RUN", Quality.GOOD),
    Reading("ua", "x", 1_700_000_000_000_000_002, None, Quality.BAD, 0x80340000),
]


def batch(number: int, *, key: Ed25519PrivateKey = KEY, compress: bool = True) -> bytes:
    return Sealer(key, compress=compress).seal(
        gateway="gw", epoch="e", batch=number, first_seq=1 + 3 * (number - 1),
        readings=READINGS, sealed_ns=1_700_000_000_000_000_000 + number,
    )  # fmt: skip


def rebuilt(message: bytes, *, protected: object = None, unprotected: object = None,
            key: Ed25519PrivateKey = KEY) -> bytes:  # fmt: skip
    """`message` with another header, signed again with `key`: a valid signature, bad header."""
    parts = cbor2.loads(message).value
    head = parts[0] if protected is None else cbor2.dumps(protected)
    payload = parts[2]
    signature = key.sign(cbor2.dumps(["Signature1", head, b"", payload]))
    extra = {} if unprotected is None else unprotected
    return cbor2.dumps(cbor2.CBORTag(18, [head, extra, payload, signature]))


def kid_of(key: Ed25519PrivateKey) -> bytes:
    return Sealer(key).kid


OPENER = Opener([KEY.public_key()])


@pytest.mark.parametrize("unprotected", [[], 0, b"", "x", None, [1, -8], True],
                         ids=repr)  # fmt: skip
def test_an_unprotected_header_that_is_not_a_map_is_refused(unprotected: object) -> None:
    parts = cbor2.loads(batch(1)).value
    parts[1] = unprotected
    with pytest.raises(EnvelopeError, match="unprotected header is a"):
        OPENER.open(cbor2.dumps(cbor2.CBORTag(18, parts)))


@pytest.mark.parametrize("label", [1, 2, 3, 4, "enc"])
def test_our_header_parameters_are_never_taken_unprotected(label: object) -> None:
    with pytest.raises(EnvelopeError, match="must be protected"):
        OPENER.open(rebuilt(batch(1), unprotected={label: -8}))


def test_an_unknown_unprotected_parameter_is_ignored() -> None:
    assert OPENER.open(rebuilt(batch(1), unprotected={33: b"x5chain"})).batch == 1


@pytest.mark.parametrize(
    "alg",
    [-7, -35, -36, -37, -257, 0, -8.0, True, "EdDSA", None, [-8]],
    ids=repr,
)
def test_only_eddsa_is_accepted(alg: object) -> None:
    header = {1: alg, 3: "application/cbor", 4: kid_of(KEY), "enc": "zstd"}
    with pytest.raises(EnvelopeError, match="unsupported algorithm"):
        OPENER.open(rebuilt(batch(1), protected=header))


def test_critical_parameters_are_refused() -> None:
    header = {1: -8, 2: [99], 3: "application/cbor", 4: kid_of(KEY), "enc": "zstd"}
    with pytest.raises(EnvelopeError, match="crit"):
        OPENER.open(rebuilt(batch(1), protected=header))


def test_every_single_bit_flip_of_a_batch_is_refused() -> None:
    """All of them, in every part of the message: tag, headers, payload and signature."""
    for compress in (True, False):
        message = batch(1, compress=compress)
        for bit in range(len(message) * 8):
            flipped = bytearray(message)
            flipped[bit // 8] ^= 1 << (bit % 8)
            with pytest.raises(EnvelopeError):
                OPENER.open(bytes(flipped))


def test_one_bit_flipped_in_each_of_1000_batches_none_accepted() -> None:
    rng = random.Random(11)
    verifier = Verifier(Opener([KEY.public_key()]))
    for number in range(1, 1001):
        flipped = bytearray(batch(number))
        bit = rng.randrange(len(flipped) * 8)
        flipped[bit // 8] ^= 1 << (bit % 8)
        verifier.check(bytes(flipped))
    assert verifier.result.batches == 0
    assert verifier.result.rejected == 1000
    assert verifier.tracker.streams == {}


def test_a_replayed_batch_is_counted_as_a_duplicate_never_as_new() -> None:
    verifier = Verifier(Opener([KEY.public_key()]))
    first, second = batch(1), batch(2)
    for message in (first, second, first, first):
        verifier.check(message)
    assert verifier.result.readings == 6
    assert verifier.result.duplicates == 6
    assert verifier.result.rejected == 0
    [stream] = verifier.tracker.streams.values()
    assert (stream.readings, stream.duplicates, stream.holes()) == (6, 6, [])


def test_a_valid_signature_from_an_unknown_key_is_refused() -> None:
    stranger = Ed25519PrivateKey.generate()
    with pytest.raises(UnknownKeyError, match=kid_of(stranger).hex()):
        OPENER.open(batch(1, key=stranger))
    # ...and claiming a trusted kid does not help: the signature is checked with that key
    header = {1: -8, 3: "application/cbor", 4: kid_of(KEY), "enc": "zstd"}
    with pytest.raises(EnvelopeError, match="bad signature"):
        OPENER.open(rebuilt(batch(1), protected=header, key=stranger))


FUZZ = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes_end_in_envelope_error(data: bytes) -> None:
    try:
        OPENER.open(data)
    except EnvelopeError as exc:
        assert str(exc)


CBOR_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.binary(max_size=64)
    | st.text(max_size=32),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.integers() | st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip


@settings(FUZZ, max_examples=150)
@given(protected=CBOR_VALUES, unprotected=CBOR_VALUES, payload=CBOR_VALUES, sign=st.booleans())
def test_fuzz_cose_shaped_messages_end_in_envelope_error(
    protected: object, unprotected: object, payload: object, sign: bool
) -> None:
    """COSE_Sign1 arrays with arbitrary parts; signed with the trusted key when possible."""
    head = cbor2.dumps(protected) if not isinstance(protected, bytes) else protected
    body = cbor2.dumps(payload)
    signature = KEY.sign(cbor2.dumps(["Signature1", head, b"", body])) if sign else b"\0" * 64
    header = {1: -8, 3: "application/cbor", 4: kid_of(KEY)}
    signed_head = cbor2.dumps(header)
    good_signature = KEY.sign(cbor2.dumps(["Signature1", signed_head, b"", body]))
    for message in (
        cbor2.dumps(cbor2.CBORTag(18, [head, unprotected, body, signature])),
        cbor2.dumps(cbor2.CBORTag(18, [signed_head, {}, body, good_signature])),
    ):
        with pytest.raises(EnvelopeError):
            OPENER.open(message)


@FUZZ
@given(st.data())
def test_fuzz_mutated_batches_are_refused(data: st.DataObject) -> None:
    original = batch(1, compress=data.draw(st.booleans()))
    message = bytearray(original)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(message) - 1))
        message[at] = data.draw(st.integers(0, 255))
    assume(bytes(message) != original)
    with pytest.raises(EnvelopeError):
        OPENER.open(bytes(message))
