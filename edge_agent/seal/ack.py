"""The consumer acknowledgement of docs/contract.md §4.10: what a consumer durably holds.

A consumer (`edge-agent verify --ack-key`, the ingest service) publishes, retained at QoS 1 on
`{topic_prefix}/{gateway}/ack`, a COSE_Sign1 message made exactly as a batch envelope (§4.2,
never compressed) but signed with the *consumer's* Ed25519 key. Its payload is a CBOR map:

    {"v": 1, "kind": "ack", "gateway": text, "epoch": text,
     "seqs": [[first, last], ...], "batches": [[first, last], ...],
     "issued": int (Unix ns), "consumer": text (optional)}

`seqs` and `batches` are inclusive ranges, ascending, disjoint and not adjacent, at most
MAX_RANGES each (a consumer that holds more sends the highest). An agent in `mqtt.ack:
end_to_end` mode deletes a buffered batch once an accepted ack covers it (its batch number in
`batches`, or, for a batch with readings, its whole seq range in `seqs`).

`seal_ack` builds and signs one; `AckOpener.open` verifies one against the consumer public keys
and returns an `Ack`, or raises AckError whose `reason` is `malformed`, `unknown_key` or
`bad_signature`. The two other refusal reasons, `wrong_gateway` and `stale`, depend on the
agent's state and are judged by it (`AckJudge`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cbor2
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import EdgeAgentError, EnvelopeError, UnknownKeyError
from edge_agent.seal.envelope import Sign1, Signer
from edge_agent.seal.keys import key_id

ACK_VERSION = 1
KIND = "ack"
MAX_RANGES = 4096
"""Ranges at most in `seqs` and in `batches` each."""
MAX_ACK_BYTES = 256 * 1024
"""Larger messages are refused unread: 2 x 4096 ranges of two 64-bit ints are about 150 KiB."""
MAX_NUMBER = 2**63 - 1
"""seq and batch numbers are SQLite integers on the agent's side."""
MAX_NAME = 256
"""Characters at most of `gateway`, `epoch` and `consumer`."""

Reason = Literal["malformed", "unknown_key", "bad_signature", "wrong_gateway", "stale"]
REASONS: tuple[Reason, ...] = (
    "malformed",
    "unknown_key",
    "bad_signature",
    "wrong_gateway",
    "stale",
)
"""Why an acknowledgement is refused: the first three by the codec, the last two by the agent."""

Ranges = tuple[tuple[int, int], ...]

_REQUIRED = frozenset({"v", "kind", "gateway", "epoch", "seqs", "batches", "issued"})
_ALLOWED = _REQUIRED | {"consumer"}


class AckError(EdgeAgentError):
    """An acknowledgement refused; `reason` is one of REASONS, the message says what is wrong."""

    def __init__(self, reason: Reason, message: str, *, kid: bytes | None = None) -> None:
        self.reason: Reason = reason
        self.kid = kid
        super().__init__(f"{reason}: {message}")


@dataclass(frozen=True)
class Ack:
    """A verified acknowledgement: `kid` is the consumer key's id (8 bytes), `issued_ns` Unix
    ns, `seqs` and `batches` checked ranges (ascending, disjoint, not adjacent)."""

    gateway: str
    epoch: str
    seqs: Ranges
    batches: Ranges
    issued_ns: int
    kid: bytes
    consumer: str | None = None

    def covers(self, *, batch: int, first_seq: int, last_seq: int, readings: int) -> bool:
        """Whether a batch is acknowledged (§4.10): its number lies in `batches`, or it carries
        readings (`readings` > 0) and first_seq..last_seq lies whole in `seqs`."""
        if contains(self.batches, batch, batch):
            return True
        return readings > 0 and contains(self.seqs, first_seq, last_seq)


def contains(ranges: Ranges, first: int, last: int) -> bool:
    """Whether first..last lies whole inside one of `ranges` (sorted, non-adjacent)."""
    lo, hi = 0, len(ranges)
    while lo < hi:  # the last range whose start is <= first
        mid = (lo + hi) // 2
        if ranges[mid][0] <= first:
            lo = mid + 1
        else:
            hi = mid
    return lo > 0 and ranges[lo - 1][1] >= last


def normalize(ranges: Iterable[Sequence[int]], limit: int = MAX_RANGES) -> Ranges:
    """`ranges` (inclusive, in any order, overlapping or adjacent) merged, sorted, and cut to
    the `limit` highest. ValueError for a range that is not two ints 0 <= first <= last."""
    items = []
    for pair in ranges:
        first, last = pair
        if type(first) is not int or type(last) is not int or not 0 <= first <= last <= MAX_NUMBER:
            raise ValueError(f"not a range of numbers: {list(pair)!r}")
        items.append((first, last))
    items.sort()
    merged: list[tuple[int, int]] = []
    for first, last in items:
        if merged and first <= merged[-1][1] + 1:
            if last > merged[-1][1]:
                merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return tuple(merged[-limit:]) if limit else ()


def seal_ack(
    key: Ed25519PrivateKey,
    *,
    gateway: str,
    epoch: str,
    seqs: Iterable[Sequence[int]],
    batches: Iterable[Sequence[int]],
    issued_ns: int,
    consumer: str | None = None,
) -> bytes:
    """The signed acknowledgement (COSE_Sign1 bytes) of `seqs` and `batches` in one epoch.

    Ranges may come in any order and overlap: they are normalised (`normalize`, the 4096
    highest kept). Raises ValueError for a bad range, a name that is empty or too long, or an
    `issued_ns` that is not a non-negative int.
    """
    for name, value in (("gateway", gateway), ("epoch", epoch), ("consumer", consumer)):
        if value is None and name == "consumer":
            continue
        if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
            raise ValueError(f"{name} must be text of 1..{MAX_NAME} characters")
    if type(issued_ns) is not int or not 0 <= issued_ns <= MAX_NUMBER:
        raise ValueError("issued_ns must be a Unix time in ns")
    body: dict[str, Any] = {
        "v": ACK_VERSION,
        "kind": KIND,
        "gateway": gateway,
        "epoch": epoch,
        "seqs": [list(r) for r in normalize(seqs)],
        "batches": [list(r) for r in normalize(batches)],
        "issued": issued_ns,
    }
    if consumer is not None:
        body["consumer"] = consumer
    return Signer(key).sign(cbor2.dumps(body))


class AckOpener:
    """Verifies acknowledgements against a set of consumer public keys (`mqtt.ack_keys`)."""

    def __init__(self, keys: Iterable[Ed25519PublicKey]) -> None:
        self._keys = {key_id(k): k for k in keys}

    def open(self, message: object) -> Ack:
        """Verify `message` (bytes; anything else is `malformed`) and return its Ack.

        Raises AckError: `malformed` (not a COSE_Sign1 as §4.10 says, compressed, a bad
        header, a payload that is not the map of §4.10), `unknown_key` (a kid not among the
        keys), `bad_signature`. Anything can arrive on the topic: no other exception escapes.
        """
        if not isinstance(message, bytes | bytearray):
            raise AckError("malformed", f"a {type(message).__name__}, not bytes")
        if len(message) > MAX_ACK_BYTES:
            raise AckError("malformed", f"{len(message)} bytes, more than {MAX_ACK_BYTES}")
        try:
            signed = Sign1.parse(bytes(message))
        except EnvelopeError as exc:
            raise AckError("malformed", str(exc)) from None
        except (cbor2.CBORError, ValueError, TypeError, KeyError, AttributeError) as exc:
            raise AckError("malformed", f"not CBOR: {type(exc).__name__}: {exc}") from None
        except RecursionError:
            raise AckError("malformed", "CBOR nested too deeply") from None
        kid = signed.kid
        if "enc" in signed.header:
            raise AckError("malformed", "an acknowledgement is never compressed (enc)", kid=kid)
        try:
            signed.check(self._keys)
        except UnknownKeyError:
            raise AckError("unknown_key", f"unknown consumer key id {kid.hex()}", kid=kid) from None
        except EnvelopeError as exc:
            raise AckError("bad_signature", str(exc), kid=kid) from None
        try:
            body = cbor2.loads(signed.payload)
        except (cbor2.CBORError, ValueError, TypeError, KeyError, AttributeError,
                ArithmeticError) as exc:  # fmt: skip  # decimal.Overflow: a bigfloat (tag 5)
            raise AckError("malformed", f"payload is not CBOR: {exc}", kid=kid) from None
        except RecursionError:
            raise AckError("malformed", "payload nested too deeply", kid=kid) from None
        return _ack(body, kid)


def _ack(body: Any, kid: bytes) -> Ack:
    def bad(message: str) -> AckError:
        return AckError("malformed", message, kid=kid)

    if not isinstance(body, dict):
        raise bad("payload is not a CBOR map")
    missing = sorted(_REQUIRED - set(body))
    if missing:
        raise bad(f"payload lacks {', '.join(missing)}")
    unknown = sorted(str(k) for k in body if k not in _ALLOWED)
    if unknown:
        raise bad(f"payload has unknown keys {', '.join(unknown)}")
    if type(body["v"]) is not int or body["v"] != ACK_VERSION:
        raise bad(f"unsupported version {body['v']!r}")
    if body["kind"] != KIND:
        raise bad(f"kind is {body['kind']!r}, not 'ack'")
    for name in ("gateway", "epoch", "consumer"):
        value = body.get(name, "-")
        if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME:
            raise bad(f"{name} must be text of 1..{MAX_NAME} characters")
    issued = body["issued"]
    if type(issued) is not int or not 0 <= issued <= MAX_NUMBER:
        raise bad("issued must be a Unix time in ns")
    return Ack(
        gateway=body["gateway"],
        epoch=body["epoch"],
        seqs=_ranges(body["seqs"], "seqs", bad),
        batches=_ranges(body["batches"], "batches", bad),
        issued_ns=issued,
        kid=kid,
        consumer=body.get("consumer"),
    )


def _ranges(value: Any, name: str, bad: Any) -> Ranges:
    if not isinstance(value, list):
        raise bad(f"{name} is not an array")
    if len(value) > MAX_RANGES:
        raise bad(f"{name} has {len(value)} ranges, more than {MAX_RANGES}")
    out: list[tuple[int, int]] = []
    for index, pair in enumerate(value):
        if not (
            isinstance(pair, list)
            and len(pair) == 2
            and type(pair[0]) is int
            and type(pair[1]) is int
            and 0 <= pair[0] <= pair[1] <= MAX_NUMBER
        ):
            raise bad(f"{name}[{index}] is not [first, last] with 0 <= first <= last")
        if out and pair[0] <= out[-1][1] + 1:
            raise bad(f"{name}[{index}] is not after {name}[{index - 1}] with a gap")
        out.append((pair[0], pair[1]))
    return tuple(out)


class AckJudge:
    """The agent's acceptance rules of §4.10 beyond the signature: the ack names this gateway
    and its current epoch, and is not older than the newest accepted from the same kid."""

    def __init__(self, gateway: str) -> None:
        self.gateway = gateway
        self._newest: dict[bytes, int] = {}

    def judge(self, ack: Ack, epoch: str) -> None:
        """Accept `ack` for the current `epoch`, or raise AckError `wrong_gateway` / `stale`.

        An ack for another epoch of this gateway is `stale` (it acknowledges nothing the buffer
        can still hold under that number). Accepting records `issued_ns` for the kid.
        """
        if ack.gateway != self.gateway:
            raise AckError(
                "wrong_gateway", f"for gateway {ack.gateway!r}, not {self.gateway!r}", kid=ack.kid
            )
        if ack.epoch != epoch:
            raise AckError("stale", f"for epoch {ack.epoch!r}, not the current one", kid=ack.kid)
        newest = self._newest.get(ack.kid)
        if newest is not None and ack.issued_ns < newest:
            raise AckError(
                "stale", f"issued {ack.issued_ns}, before one already accepted", kid=ack.kid
            )
        self._newest[ack.kid] = ack.issued_ns
