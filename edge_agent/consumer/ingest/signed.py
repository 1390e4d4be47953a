"""The small signed messages beside batches (docs/contract.md): the high-water mark that ingest
reads, and the consumer acknowledgement it writes.

Both are COSE_Sign1 exactly as a batch envelope (§4.2), never compressed. The acknowledgement
is made by its codec, `edge_agent.seal.ack`. The mark is read here to the same wire format until
its codec (`edge_agent.seal.hwm`, branch fix-hwm) is on main; then `open_mark` replaces
`open_signed` + `HighWater.parse`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import EnvelopeError, UnknownKeyError
from edge_agent.seal.ack import seal_ack
from edge_agent.seal.envelope import (
    COSE_SIGN1_TAG,
    HDR_KID,
    _check_unprotected,  # the envelope's own header rules, shared on purpose
    _protected_header,
)
from edge_agent.seal.keys import key_id


def open_signed(message: bytes, keys: Mapping[bytes, Ed25519PublicKey]) -> tuple[bytes, Any]:
    """Verify an uncompressed COSE_Sign1 `message`; return (kid, decoded payload).

    Raises UnknownKeyError for a kid not in `keys`, EnvelopeError for anything else wrong.
    """
    try:
        return _open_signed(message, keys)
    except EnvelopeError:
        raise
    except (cbor2.CBORError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise EnvelopeError(f"malformed message: {type(exc).__name__}: {exc}") from None


def _open_signed(message: bytes, keys: Mapping[bytes, Ed25519PublicKey]) -> tuple[bytes, Any]:
    outer = cbor2.loads(message)
    if not isinstance(outer, cbor2.CBORTag) or outer.tag != COSE_SIGN1_TAG:
        raise EnvelopeError("not a tagged COSE_Sign1 message")
    parts = outer.value
    if not isinstance(parts, list | tuple) or len(parts) != 4:
        raise EnvelopeError("COSE_Sign1 must have four elements")
    protected, unprotected, payload, signature = parts
    if not all(isinstance(p, bytes) for p in (protected, payload, signature)):
        raise EnvelopeError("protected header, payload and signature must be byte strings")
    _check_unprotected(unprotected)
    header = _protected_header(protected)
    if "enc" in header:
        raise EnvelopeError("a compressed signed message where none is allowed")
    kid = header[HDR_KID]
    key = keys.get(kid)
    if key is None:
        raise UnknownKeyError(f"unknown key id {kid.hex()}")
    try:
        key.verify(signature, cbor2.dumps(["Signature1", protected, b"", payload]))
    except InvalidSignature:
        raise EnvelopeError(f"bad signature (key id {kid.hex()})") from None
    return kid, cbor2.loads(payload)


@dataclass(frozen=True)
class HighWater:
    """A gateway's signed high-water mark: the highest seq and batch sealed in its epoch."""

    gateway: str
    epoch: str
    seq: int
    batch: int
    sealed_ns: int

    @classmethod
    def parse(cls, body: Any) -> HighWater:
        """The mark in a verified payload; EnvelopeError when it is not a v1 `hwm` map."""
        if not isinstance(body, dict) or body.get("v") != 1 or body.get("kind") != "hwm":
            raise EnvelopeError("not a v1 high-water mark")
        gateway, epoch = body.get("gateway"), body.get("epoch")
        numbers = [body.get(k) for k in ("seq", "batch", "sealed")]
        if not isinstance(gateway, str) or not isinstance(epoch, str) or "\0" in epoch:
            raise EnvelopeError("high-water mark: gateway and epoch must be text (no NUL)")
        if not all(type(n) is int and 0 <= n < 2**63 for n in numbers):
            raise EnvelopeError("high-water mark: seq, batch and sealed must be integers")
        seq, batch, sealed = numbers
        assert isinstance(seq, int) and isinstance(batch, int) and isinstance(sealed, int)
        return cls(gateway, epoch, seq, batch, sealed)


class AckSigner:
    """Signs consumer acknowledgements with the consumer's own key (`seal.ack.seal_ack`)."""

    def __init__(self, key: Ed25519PrivateKey, consumer: str) -> None:
        self._key = key
        self.kid = key_id(key.public_key())
        self.consumer = consumer

    def sign(
        self,
        gateway: str,
        epoch: str,
        seqs: Sequence[tuple[int, int]],
        batches: Sequence[tuple[int, int]],
        issued_ns: int,
    ) -> bytes:
        """The COSE_Sign1 bytes of an acknowledgement of `seqs` and `batches` (inclusive
        ranges; the highest MAX_RANGES of each are sent). ValueError for names the codec
        refuses (longer than 256 characters)."""
        return seal_ack(
            self._key,
            gateway=gateway,
            epoch=epoch,
            seqs=seqs,
            batches=batches,
            issued_ns=issued_ns,
            consumer=self.consumer[:256],
        )
