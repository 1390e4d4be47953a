"""One MQTT message as ingest takes it: an accepted item to write, or a rejection with its reason.

Topics (`{prefix}/{gateway}/batch|hwm|status`) give the gateway the message claims to come from;
a batch or mark whose signed `gateway` differs, or whose key is enrolled for another gateway, is
refused (`wrong_gateway`). A point catalogue (`{prefix}/{gateway}/catalogue/{digest}`, contract
§4.12) goes into the decoder's book at once (the batches after it in the same group need it)
and is stored with the group (`CatalogueItem`); a batch that references a catalogue the book
does not have is `Parked` (authentic: its signature, key and gateway checked as any batch's;
decoded once the catalogue comes, parking.py). Rejection reasons, as stored in
`rejected.reason`:

- `unknown_key`     the key id is not enrolled (`ingest keys add`)
- `key_not_valid`   the key is retired, or the batch was sealed outside its validity
- `bad_signature`   the signature does not verify (tampered, or signed by another key)
- `malformed`       not a COSE_Sign1 batch or mark as the contract says
- `wrong_gateway`   signed for, or by a key of, another gateway than the topic names
- `nonconforming`   signed, but its readings break the value rules of §4.4
- `conflict`        (recorded by write.py) seqs already held, from a batch of another number
- `catalogue`       a point catalogue refused: its digest is not its topic's, or it breaks §4.12
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from typing import Any

import cbor2
import zstandard

from edge_agent.consumer.ingest.keystore import GatewayTrust
from edge_agent.consumer.ingest.rows import NonconformingError, RowMaker
from edge_agent.errors import EnvelopeError, UnknownKeyError
from edge_agent.seal import unzstd
from edge_agent.seal.catalogue import (
    Catalogue,
    CatalogueError,
    CatalogueMissingError,
    parse_catalogue_topic,
)
from edge_agent.seal.envelope import MAX_PAYLOAD_BYTES, Batch, Opener, Sign1
from edge_agent.seal.hwm import HighWaterMark, open_mark
from edge_agent.seal.trust import KeyNotValidError

MAX_BOOK_POINTS = 1_000_000
"""Points of the catalogues a decoder holds in memory at most (a few hundred bytes each): the
least recently used are dropped beyond (the database keeps every one; see RecentCatalogues)."""
MAX_REJECTED_PAYLOAD = 4096
"""Bytes of a rejected message's payload kept for forensics."""
INT8 = 2**63


@dataclass(frozen=True)
class Accepted:
    """A verified batch and its readings as COPY rows (one per reading, in seq order, the first
    of seq `first`; `first` is 0 when there are none)."""

    batch: Batch
    rows: list[str]
    first: int = 0
    topic: str = ""
    payload: bytes = b""
    """The message as received: recorded in `rejected` when the batch conflicts (write.py)."""


@dataclass(frozen=True)
class Status:
    """A gateway's status message (§3), kept as text."""

    gateway: str
    text: str


@dataclass(frozen=True)
class Rejection:
    """A refused message: why, and what it was (the payload cut to MAX_REJECTED_PAYLOAD)."""

    topic: str
    reason: str
    detail: str
    gateway: str | None
    kid: str | None
    payload_bytes: int
    payload: bytes


@dataclass(frozen=True)
class CatalogueItem:
    """A point catalogue accepted (in the decoder's book already), to store."""

    topic: str
    gateway: str
    """The gateway its topic names (catalogues are not signed: the digest binds them)."""
    catalogue: Catalogue


@dataclass(frozen=True)
class Parked:
    """An authentic batch whose point catalogue `digest` the decoder does not have (yet): what
    its signed header says, and the message, to decode once the catalogue is there."""

    topic: str
    digest: bytes
    gateway: str
    epoch: str
    batch: int
    seqs: tuple[tuple[int, int], ...]
    """The seqs it holds: its readings' and those of the evictions it declares (inclusive)."""
    readings: int
    kid: str
    payload: bytes


Item = Accepted | HighWaterMark | Status | Rejection | CatalogueItem | Parked


def split_topic(topic: str, prefix: str) -> tuple[str, str] | None:
    """(gateway, kind) of `{prefix}/{gateway}/{kind}`, or None for another topic."""
    head = prefix + "/"
    if not topic.startswith(head):
        return None
    rest = topic[len(head) :].split("/")
    if len(rest) != 2 or not rest[0]:
        return None
    return rest[0], rest[1]


class RecentCatalogues(MutableMapping[bytes, Catalogue]):
    """The point catalogues a worker holds in memory, by digest: the most recently used ones,
    up to `max_points` points in all (the newest one always, whatever its size).

    A fleet's gateways make new catalogues as their points change, for years; every one is
    kept in the table `catalogues`, and a worker reads one it does not hold from there when a
    batch references it (worker.py), so that memory holds what is in use, not the history.
    """

    def __init__(self, max_points: int = MAX_BOOK_POINTS) -> None:
        self.max_points = max_points
        self._items: OrderedDict[bytes, Catalogue] = OrderedDict()
        self._points = 0

    def __getitem__(self, digest: bytes) -> Catalogue:
        catalogue = self._items[digest]
        self._items.move_to_end(digest)
        return catalogue

    def __setitem__(self, digest: bytes, catalogue: Catalogue) -> None:
        if digest in self._items:
            self._points -= len(self._items.pop(digest).points)
        self._items[digest] = catalogue
        self._points += len(catalogue.points)
        while self._points > self.max_points and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self._points -= len(dropped.points)

    def __delitem__(self, digest: bytes) -> None:
        self._points -= len(self._items.pop(digest).points)

    def __contains__(self, digest: object) -> bool:
        return digest in self._items  # a look, not a use: the order stays

    def __iter__(self) -> Iterator[bytes]:
        return iter(list(self._items))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def points(self) -> int:
        """Points held, over all the catalogues."""
        return self._points


class Decoder:
    """Verifies and decodes messages against the enrolled keys (replace `trust` to refresh),
    with the point catalogues of `book` (digest -> Catalogue), which it adds to as catalogue
    messages come (and its owner as it loads them from the database)."""

    def __init__(
        self,
        trust: GatewayTrust,
        prefix: str,
        book: MutableMapping[bytes, Catalogue] | None = None,
    ) -> None:
        self.prefix = prefix
        self.rows = RowMaker()
        self.seconds = {"open": 0.0, "rows": 0.0}
        """Time spent verifying and decoding envelopes (`open`), and making rows (`rows`)."""
        self.trust = trust
        self.book: MutableMapping[bytes, Catalogue] = RecentCatalogues() if book is None else book
        self._opener = Opener(trust.trust.public_keys(), columns=True, catalogues=self.book)

    def set_trust(self, trust: GatewayTrust) -> None:
        """Use these keys from now on."""
        self.trust = trust
        self._opener = Opener(trust.trust.public_keys(), columns=True, catalogues=self.book)

    def decode(self, topic: str, payload: bytes) -> Item | None:
        """The item of one message; None for a topic ingest does not take."""
        where = split_topic(topic, self.prefix)
        if where is None:
            return self._catalogue(topic, payload)
        gateway, kind = where
        if kind == "batch":
            return self._batch(topic, gateway, payload)
        if kind == "hwm":
            return self._hwm(topic, gateway, payload)
        if kind == "status":
            return Status(
                gateway, payload[:4096].decode("utf-8", errors="replace").replace("\0", "")
            )
        return None

    def _reject(
        self, topic: str, gateway: str, payload: bytes, *reason_detail: str, kid: bytes = b""
    ) -> Rejection:
        reason, detail = reason_detail
        return Rejection(
            topic,
            reason,
            detail,
            gateway,
            kid.hex() or None,
            len(payload),
            payload[:MAX_REJECTED_PAYLOAD],
        )

    def _catalogue(self, topic: str, payload: bytes) -> Item | None:
        """A catalogue message (`{prefix}/{gateway}/catalogue/{digest}`), put in the book when
        it is accepted; None for any other topic, and for an empty message (what subscribers
        receive when a retained message is deleted; the catalogue stays in the database, for
        the batches that still reference it)."""
        head = self.prefix + "/"
        levels = topic[len(head) :].split("/") if topic.startswith(head) else []
        if len(levels) != 3 or levels[1] != "catalogue" or not levels[0]:
            return None
        gateway = levels[0]
        if not payload:  # a retained catalogue deleted at the broker: nothing to keep or refuse
            return None
        named = parse_catalogue_topic(topic)
        if named is None:
            detail = f"catalogue topic: {levels[2]!r} is not a digest of 32 lowercase hex digits"
            return self._reject(topic, gateway, payload, "catalogue", detail)
        try:
            catalogue = Catalogue.parse(payload, named[1])
        except CatalogueError as exc:
            return self._reject(topic, gateway, payload, "catalogue", str(exc))
        if catalogue.digest not in self.book:
            self.book[catalogue.digest] = catalogue
        return CatalogueItem(topic, gateway, catalogue)

    def _batch(self, topic: str, gateway: str, payload: bytes) -> Item:
        began = time.perf_counter()
        try:
            batch = self._opener.open(payload)
        except CatalogueMissingError as exc:
            self.seconds["open"] += time.perf_counter() - began
            return self._parked(topic, gateway, payload, exc.digest)
        except UnknownKeyError as exc:
            return self._reject(topic, gateway, payload, "unknown_key", str(exc))
        except EnvelopeError as exc:
            return self._reject(topic, gateway, payload, _reason(exc), str(exc))
        try:
            self.trust.trust.check(batch.kid, batch.sealed_ns)
        except KeyNotValidError as exc:
            return self._reject(topic, gateway, payload, "key_not_valid", str(exc), kid=batch.kid)
        detail = self._foreign(gateway, "the batch", batch.gateway, batch.kid)
        if detail:
            return self._reject(topic, gateway, payload, "wrong_gateway", detail, kid=batch.kid)
        opened = time.perf_counter()
        self.seconds["open"] += opened - began
        problem = _shape_problem(batch)
        if problem:
            return self._reject(topic, gateway, payload, "malformed", problem, kid=batch.kid)
        columns = batch.columns
        try:
            if columns is not None:
                rows = self.rows.column_rows(batch.gateway, batch.epoch, columns)
                first = columns.first
            else:
                rows = self.rows.rows(batch.gateway, batch.epoch, batch.readings)
                first = batch.readings[0]["seq"] if batch.readings else 0
        except NonconformingError as exc:
            return self._reject(topic, gateway, payload, "nonconforming", str(exc), kid=batch.kid)
        finally:
            self.seconds["rows"] += time.perf_counter() - opened
        return Accepted(batch, rows, first, topic, payload)

    def _parked(self, topic: str, gateway: str, payload: bytes, digest: bytes) -> Item:
        """A verified batch that waits for catalogue `digest`, held to the checks that need no
        decoding (key valid when sealed, enrolled for the topic's gateway, which the batch
        names): a batch that would be refused once decoded is refused now, not parked."""
        signed = Sign1.parse(payload)  # parsed and verified by the Opener a moment ago
        kid = signed.kid
        try:
            head = _Header.of(self._body(signed))
        except (EnvelopeError, KeyError, TypeError, ValueError) as exc:
            detail = f"malformed batch: {type(exc).__name__}: {exc}"
            return self._reject(topic, gateway, payload, "malformed", detail, kid=kid)
        try:
            self.trust.trust.check(kid, head.sealed)
        except KeyNotValidError as exc:
            return self._reject(topic, gateway, payload, "key_not_valid", str(exc), kid=kid)
        foreign = self._foreign(gateway, "the batch", head.gateway, kid)
        if foreign:
            return self._reject(topic, gateway, payload, "wrong_gateway", foreign, kid=kid)
        problem = head.problem()
        if problem:
            return self._reject(topic, gateway, payload, "malformed", problem, kid=kid)
        return Parked(
            topic, digest, head.gateway, head.epoch, head.batch, head.seqs, head.readings,
            kid.hex(), payload,
        )  # fmt: skip

    @staticmethod
    def _body(signed: Sign1) -> dict[Any, Any]:
        """The payload map of a verified batch (decompressed as the Opener does)."""
        payload = signed.payload
        if signed.header.get("enc") == "zstd":
            try:
                payload = unzstd.decompress(payload, MAX_PAYLOAD_BYTES)
            except (zstandard.ZstdError, unzstd.TooLargeError) as exc:
                raise EnvelopeError(f"bad zstd payload: {exc}") from None
        try:
            body = cbor2.loads(payload)
        except (cbor2.CBORError, RecursionError) as exc:
            raise EnvelopeError(f"payload is not CBOR: {exc}") from None
        if not isinstance(body, dict):
            raise EnvelopeError("payload is not a CBOR map")
        return body

    def _hwm(self, topic: str, gateway: str, payload: bytes) -> Item:
        """The mark, opened as verify opens it (`seal.hwm.open_mark` against the enrolled keys),
        then held to what only ingest asks: the key is enrolled for the topic's gateway, and no
        NUL is in a name (a PostgreSQL text cannot hold one)."""
        try:
            mark = open_mark(payload, self.trust.trust)
        except UnknownKeyError as exc:
            return self._reject(topic, gateway, payload, "unknown_key", str(exc))
        except KeyNotValidError as exc:  # verified, so its structure parses: the kid for the row
            kid = Sign1.parse(payload).kid
            return self._reject(topic, gateway, payload, "key_not_valid", str(exc), kid=kid)
        except EnvelopeError as exc:
            return self._reject(topic, gateway, payload, _reason(exc), str(exc))
        if "\0" in mark.gateway or "\0" in mark.epoch:
            detail = "high-water mark: gateway or epoch holding NUL"
            return self._reject(topic, gateway, payload, "malformed", detail, kid=mark.kid)
        foreign = self._foreign(gateway, "the high-water mark", mark.gateway, mark.kid)
        if foreign:
            return self._reject(topic, gateway, payload, "wrong_gateway", foreign, kid=mark.kid)
        return mark

    def _foreign(self, gateway: str, what: str, signed_for: str, kid: bytes) -> str | None:
        """Why a verified message on `gateway`'s topic is not that gateway's (`wrong_gateway`):
        signed for another gateway, or by a key enrolled for another; None when it is its own."""
        owner = self.trust.owners.get(kid)
        if signed_for == gateway and owner == gateway:
            return None
        return (
            f"topic names gateway {gateway!r}, {what} says {signed_for!r}, "
            f"key id {kid.hex()} is enrolled for {owner!r}"
        )


@dataclass(frozen=True)
class _Header:
    """What a parked batch's payload map says of it, without its columns."""

    gateway: str
    epoch: str
    batch: int
    sealed: int
    seqs: tuple[tuple[int, int], ...]
    """Its readings' seqs (first..last; last < first when it has none), then its evictions."""
    readings: int

    @classmethod
    def of(cls, body: dict[Any, Any]) -> _Header:
        """Raises KeyError, TypeError or ValueError for a map without these keys as §4.9 has
        them (a batch that a full decoding would refuse as malformed too)."""
        gateway, epoch = body["gateway"], body["epoch"]
        batch, first, count, sealed = body["batch"], body["seq"], body["n"], body["sealed"]
        if not isinstance(gateway, str) or not isinstance(epoch, str):
            raise TypeError("gateway or epoch is not text")
        if not all(type(v) is int for v in (batch, first, count, sealed)) or count < 0:
            raise TypeError("batch, seq, n or sealed is not an integer as §4.9 says")
        evicted = tuple((int(a), int(b)) for a, b in body.get("evicted", []))
        return cls(gateway, epoch, batch, sealed, ((first, first + count - 1), *evicted), count)

    def problem(self) -> str | None:
        """What no table can hold as the contract means it (as `_shape_problem`), or None."""
        if not self.epoch or "\0" in self.epoch or "\0" in self.gateway:
            return "epoch empty, or gateway or epoch holding NUL"
        if not 0 <= self.batch < INT8:
            return f"batch number {self.batch} out of range"
        for first, last in self.seqs:
            if first <= last and not (first >= 1 and last < INT8):
                return f"seq {first}..{last} out of range"
        return None


def _reason(exc: EnvelopeError) -> str:
    """`bad_signature` or `malformed` for a refused batch or mark (`open_mark` prefixes its
    errors with "high-water mark: ")."""
    detail = str(exc).removeprefix("high-water mark: ")
    return "bad_signature" if detail.startswith("bad signature") else "malformed"


def _shape_problem(batch: Batch) -> str | None:
    """What in a verified batch no table can hold as the contract means it, or None."""
    if not batch.epoch or "\0" in batch.epoch or "\0" in batch.gateway:
        return "epoch empty, or gateway or epoch holding NUL"
    if not 0 <= batch.batch < INT8:
        return f"batch number {batch.batch} out of range"
    if batch.columns is not None and len(batch.columns):
        low, high = batch.columns.first, batch.columns.first + len(batch.columns) - 1
        if not 1 <= low <= high < INT8:
            return f"seq {low}..{high} out of range"
    elif batch.readings:
        first, last = batch.readings[0].get("seq"), batch.readings[-1].get("seq")
        if type(first) is not int or type(last) is not int or not 1 <= first <= last < INT8:
            return f"seq {first!r}..{last!r} out of range"
        if last - first + 1 != len(batch.readings):
            return f"seq {first}..{last} is not consecutive"
    for first, last in batch.evicted:
        if not 1 <= first <= last < INT8:
            return f"evicted range {first}..{last} out of range"
    ended = batch.previous_epoch
    if ended is not None and "\0" in f"{ended.epoch}{ended.ended}{ended.detail}":
        return "previous_epoch holds NUL"
    return None
