"""The signed high-water mark (docs/contract.md §4.11): what a gateway has sealed so far.

A consumer can count what it received, but not what was sealed after the last batch that reached
it: a gateway that burns with its disk leaves no trace of its tail. So the agent publishes,
retained, on `{topic_prefix}/{gateway}/hwm`, on every connect and every `mqtt.heartbeat`, a small
COSE_Sign1 message signed exactly as a batch (same key, same protected header, never compressed)
whose payload is the CBOR map

    {"v": 1, "kind": "hwm", "gateway": text, "epoch": text,
     "seq": highest seq sealed in the epoch (0: none), "batch": highest batch number sealed
     (0: none), "sealed": Unix ns when the mark was made}

A consumer opens it against the keys it trusts for batches, with the same rules (the key id must
be trusted, the key valid at `sealed` and not retired); anything else is refused with an
EnvelopeError (or its subclasses UnknownKeyError, KeyNotValidError) that says what is wrong.
Keys of the map beyond these are ignored, as in a batch (§4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cbor2

from edge_agent.errors import EnvelopeError
from edge_agent.seal.envelope import Sign1, Signer
from edge_agent.seal.trust import KeyNotValidError, TrustSet

VERSION = 1
KIND = "hwm"
TOPIC_SUFFIX = "hwm"
MAX_MARK_BYTES = 4096
"""A mark is about 150 bytes; anything larger is refused before it is decoded."""
MAX_TEXT = 256
"""Longest gateway id or epoch accepted in a mark (a gateway id is at most 64 characters)."""
_DECODING_ERRORS = (
    cbor2.CBORError,
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    RecursionError,
    ArithmeticError,
)
"""What cbor2 raises for bytes that are not the CBOR they claim to be (ArithmeticError:
decimal.Overflow for a bigfloat, CBOR tag 5, of a huge exponent)."""


@dataclass(frozen=True)
class HighWaterMark:
    """What a gateway had sealed in `epoch` when it made the mark at `sealed_ns`.

    `seq` and `batch` are the highest seq and batch number sealed (0 when none); `kid` is the
    key id that signed it (empty before it is sealed).
    """

    gateway: str
    epoch: str
    seq: int
    batch: int
    sealed_ns: int
    kid: bytes = b""

    def payload(self) -> bytes:
        """The CBOR map of §4.11, in the documented key order."""
        return bytes(
            cbor2.dumps(
                {
                    "v": VERSION,
                    "kind": KIND,
                    "gateway": self.gateway,
                    "epoch": self.epoch,
                    "seq": self.seq,
                    "batch": self.batch,
                    "sealed": self.sealed_ns,
                }
            )
        )

    def seal(self, signer: Signer) -> bytes:
        """The mark as a COSE_Sign1 message signed by `signer` (uncompressed)."""
        return signer.sign(self.payload())


def topic(prefix: str, gateway: str) -> str:
    """`{prefix}/{gateway}/hwm`."""
    return f"{prefix}/{gateway}/{TOPIC_SUFFIX}"


def open_mark(message: bytes, trust: TrustSet) -> HighWaterMark:
    """Verify `message` against the keys of `trust` and return its mark.

    Raises UnknownKeyError (a key id not trusted), KeyNotValidError (the key retired, or not
    valid at the mark's `sealed`), or EnvelopeError naming what else is wrong: too large, not
    CBOR, not a COSE_Sign1 as §4.2 says, a bad signature, a compressed payload, or a payload
    that is not the map of §4.11. Never another exception, whatever the bytes.
    """
    if not isinstance(message, bytes | bytearray):
        raise EnvelopeError(f"high-water mark: a {type(message).__name__}, not bytes")
    if len(message) > MAX_MARK_BYTES:
        raise EnvelopeError(
            f"high-water mark: {len(message)} bytes, more than {MAX_MARK_BYTES} (not a mark)"
        )
    keys = {kid: trusted.key for kid, trusted in trust.keys.items()}
    try:
        signed = Sign1.parse(bytes(message))
        signed.check(keys)
    except EnvelopeError as exc:
        raise type(exc)(f"high-water mark: {exc}") from None
    except _DECODING_ERRORS as exc:
        raise EnvelopeError(f"high-water mark: malformed: {type(exc).__name__}: {exc}") from None
    if "enc" in signed.header:
        raise EnvelopeError("high-water mark: a compressed payload (a mark never is)")
    try:
        body = cbor2.loads(signed.payload)
    except _DECODING_ERRORS as exc:
        raise EnvelopeError(f"high-water mark: malformed: {type(exc).__name__}: {exc}") from None
    mark = _parse(body, signed.kid)
    try:
        trust.check(mark.kid, mark.sealed_ns)
    except KeyNotValidError as exc:
        raise KeyNotValidError(f"high-water mark: {exc}") from None
    return mark


def _parse(body: Any, kid: bytes) -> HighWaterMark:
    """The signed payload as a mark; EnvelopeError names the first key that is wrong."""
    if not isinstance(body, dict):
        raise EnvelopeError("high-water mark: the payload is not a CBOR map")
    if body.get("v") != VERSION or type(body.get("v")) is not int:
        raise EnvelopeError(f"high-water mark: unsupported version v={body.get('v')!r}")
    if body.get("kind") != KIND:
        raise EnvelopeError(f"high-water mark: kind={body.get('kind')!r}, not {KIND!r}")
    for name in ("gateway", "epoch"):
        value = body.get(name)
        if not isinstance(value, str) or not 0 < len(value) <= MAX_TEXT:
            raise EnvelopeError(f"high-water mark: {name} must be text of 1 to {MAX_TEXT} chars")
    for name in ("seq", "batch", "sealed"):
        value = body.get(name)
        if type(value) is not int or not 0 <= value < 2**63:
            raise EnvelopeError(f"high-water mark: {name} must be an integer in 0..2^63-1")
    return HighWaterMark(
        gateway=body["gateway"],
        epoch=body["epoch"],
        seq=body["seq"],
        batch=body["batch"],
        sealed_ns=body["sealed"],
        kid=kid,
    )
