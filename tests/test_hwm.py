"""The signed high-water mark's codec (seal/hwm.py, docs/contract.md §4.11): what it signs, the
trust rules it shares with a batch, and its decoder fuzzed with Hypothesis: hostile bytes never
crash it, and every refusal is an EnvelopeError (or a subclass) that says what is wrong.
"""

from __future__ import annotations

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.config import parse_config
from edge_agent.errors import ConfigError, EnvelopeError, UnknownKeyError
from edge_agent.seal.envelope import Sealer, Signer
from edge_agent.seal.hwm import MAX_MARK_BYTES, HighWaterMark, open_mark, topic
from edge_agent.seal.trust import KeyNotValidError, TrustedKey, TrustSet

pytestmark = pytest.mark.unit

KEY = Ed25519PrivateKey.generate()
SIGNER = Signer(KEY)
TRUST = TrustSet.of([KEY.public_key()])
NOW_NS = 1_780_000_000_000_000_000
MARK = HighWaterMark("gw-1", "e" * 32, seq=1234, batch=56, sealed_ns=NOW_NS)
FUZZ = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


def signed_payload(body: object, key: Ed25519PrivateKey = KEY) -> bytes:
    """Any CBOR payload, validly signed: the decoder must judge its content, not trust it."""
    return Signer(key).sign(cbor2.dumps(body))


def test_a_mark_round_trips_with_its_key_id_and_is_small() -> None:
    message = MARK.seal(SIGNER)
    opened = open_mark(message, TRUST)
    assert opened == HighWaterMark("gw-1", "e" * 32, 1234, 56, NOW_NS, kid=SIGNER.kid)
    assert len(message) < 256, "it must fit any broker's packet limit"
    assert topic("edge", "gw-1") == "edge/gw-1/hwm"


def test_a_mark_is_signed_exactly_as_an_uncompressed_batch() -> None:
    """Same protected header bytes as a batch of the same key, an empty unprotected map, and
    the payload map in the documented key order, uncompressed."""
    batch = cbor2.loads(
        Sealer(KEY, compress=False).seal(
            gateway="gw-1", epoch="e", batch=1, first_seq=1, readings=[], sealed_ns=NOW_NS
        )
    ).value
    mark = cbor2.loads(Sealer(KEY).signer.sign(MARK.payload()))
    assert mark.tag == 18
    protected, unprotected, payload, _ = mark.value
    assert protected == batch[0]
    assert cbor2.loads(protected) == {1: -8, 4: SIGNER.kid, 3: "application/cbor"}
    assert unprotected == {}
    assert list(cbor2.loads(payload)) == [
        "v", "kind", "gateway", "epoch", "seq", "batch", "sealed"
    ]  # fmt: skip


def test_a_mark_signed_by_a_key_not_trusted_is_refused() -> None:
    forged = MARK.seal(Signer(Ed25519PrivateKey.generate()))
    with pytest.raises(UnknownKeyError, match="high-water mark: unknown key id"):
        open_mark(forged, TRUST)


def test_a_tampered_mark_is_refused() -> None:
    parts = cbor2.loads(MARK.seal(SIGNER)).value
    body = cbor2.loads(parts[2])
    body["seq"] = 99  # lower the high water: would hide a tail
    parts[2] = cbor2.dumps(body)
    with pytest.raises(EnvelopeError, match="high-water mark: bad signature"):
        open_mark(cbor2.dumps(cbor2.CBORTag(18, parts)), TRUST)


def test_the_trust_rules_of_a_batch_apply_to_a_mark() -> None:
    retired = TrustSet([TrustedKey(KEY.public_key(), SIGNER.kid, retired=True)])
    with pytest.raises(KeyNotValidError, match="is retired"):
        open_mark(MARK.seal(SIGNER), retired)
    expired = TrustSet([TrustedKey(KEY.public_key(), SIGNER.kid, not_after_ns=NOW_NS - 1)])
    with pytest.raises(KeyNotValidError, match="after key id"):
        open_mark(MARK.seal(SIGNER), expired)
    early = TrustSet([TrustedKey(KEY.public_key(), SIGNER.kid, not_before_ns=NOW_NS + 1)])
    with pytest.raises(KeyNotValidError, match="before key id"):
        open_mark(MARK.seal(SIGNER), early)


def test_a_compressed_mark_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="compressed"):
        open_mark(SIGNER.sign(MARK.payload(), encoding="zstd"), TRUST)


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        ({"v": 2}, "unsupported version"),
        ({"v": True}, "unsupported version"),
        ({"kind": "ack"}, "kind='ack'"),
        ({"gateway": 7}, "gateway must be text"),
        ({"epoch": ""}, "epoch must be text"),
        ({"seq": -1}, "seq must be an integer"),
        ({"seq": 1.0}, "seq must be an integer"),
        ({"batch": None}, "batch must be an integer"),
        ({"sealed": 2**64}, "sealed must be an integer"),
        ({"seq": False}, "seq must be an integer"),
    ],
    ids=repr,
)
def test_a_signed_payload_that_is_not_a_mark_is_refused_naming_the_key(
    change: dict[str, object], complaint: str
) -> None:
    body = {**cbor2.loads(MARK.payload()), **change}
    with pytest.raises(EnvelopeError, match=complaint):
        open_mark(signed_payload(body), TRUST)


def test_unknown_keys_of_the_map_are_ignored_as_in_a_batch() -> None:
    body = {**cbor2.loads(MARK.payload()), "later": [1, 2]}
    assert open_mark(signed_payload(body), TRUST).seq == MARK.seq


def test_an_oversized_message_is_refused_before_it_is_decoded() -> None:
    with pytest.raises(EnvelopeError, match=f"more than {MAX_MARK_BYTES}"):
        open_mark(b"\x00" * (MAX_MARK_BYTES + 1), TRUST)


def refused_cleanly(message: bytes) -> HighWaterMark | None:
    """open_mark's verdict: a mark, or an EnvelopeError with a reason; nothing else."""
    try:
        return open_mark(message, TRUST)
    except EnvelopeError as exc:
        assert str(exc).startswith("high-water mark: "), exc
        assert len(str(exc)) > len("high-water mark: ")
        return None


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_hostile_bytes_never_crash_the_decoder(data: bytes) -> None:
    assert refused_cleanly(data) is None


@FUZZ
@given(st.data())
def test_fuzz_a_valid_mark_with_flipped_bytes_is_refused_or_unchanged(data: st.DataObject) -> None:
    message = bytearray(MARK.seal(SIGNER))
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(message) - 1))
        message[index] ^= data.draw(st.integers(1, 255))
    opened = refused_cleanly(bytes(message))
    # A flip the signature does not cover (CBOR framing that decodes alike) changes nothing.
    assert opened is None or opened == open_mark(MARK.seal(SIGNER), TRUST)


CBOR_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=40)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=8),
    max_leaves=20,
)  # fmt: skip
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1", True]) | CBOR_VALUES,
        "kind": st.sampled_from(["hwm", "ack"]) | CBOR_VALUES,
        "gateway": st.text(max_size=300) | CBOR_VALUES,
        "epoch": st.text(max_size=40) | CBOR_VALUES,
        "seq": st.integers(-5, 2**64) | CBOR_VALUES,
        "batch": st.integers(-5, 2**64) | CBOR_VALUES,
        "sealed": st.integers(-5, 2**64) | CBOR_VALUES,
    },
)


@FUZZ
@given(FIELDS | CBOR_VALUES)
def test_fuzz_validly_signed_payloads_are_judged_by_their_content(body: object) -> None:
    """A holder of the key can sign anything: the decoder must still refuse non-marks cleanly,
    and whatever it accepts holds the types §4.11 promises."""
    opened = refused_cleanly(signed_payload(body))
    if opened is not None:
        assert isinstance(opened.gateway, str) and isinstance(opened.epoch, str)
        for value in (opened.seq, opened.batch, opened.sealed_ns):
            assert type(value) is int and 0 <= value < 2**63


MINIMAL_CONFIG = "gateway: {id: gw1}\nsources:\n  - {type: simulated, name: sim}\n"


def test_the_heartbeat_defaults_to_10s_and_is_validated() -> None:
    assert parse_config(MINIMAL_CONFIG).mqtt.heartbeat == 10.0
    assert parse_config(MINIMAL_CONFIG + "mqtt: {heartbeat: 1m}\n").mqtt.heartbeat == 60.0
    for wrong in ("500ms", "2h", "soon"):
        with pytest.raises(ConfigError) as caught:
            parse_config(MINIMAL_CONFIG + f"mqtt: {{heartbeat: {wrong}}}\n", "cfg.yaml")
        [problem] = caught.value.problems
        assert problem.path == "mqtt.heartbeat", problem
