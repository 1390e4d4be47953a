"""The wire format of docs/contract.md §4: a batch as CBOR, zstd-compressed, in COSE_Sign1.

The payload is format 1 (a CBOR map per reading, §4.3) or format 2 (columns, §4.9, in
`columnar.py`); the envelope, the numbering and the declarations are the same for both, and the
Opener reads either.

Signing uses cbor2 and cryptography directly (pycose is unmaintained and breaks with cbor2 6).
The protected header is encoded once per key and reused: its bytes are what gets signed.

The readings of a batch are written by `ReadingEncoder`, not by `cbor2.dumps` of a map per
reading: most of a reading's map is the same from one batch to the next (its keys, its source
and point names, its quality), so those bytes are made once and copied, and only the numbers are
encoded per reading. The bytes are exactly cbor2's (tests/test_envelope.py compares them on
every value type), at about a third of the CPU (docs/performance.md).
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cbor2
import zstandard
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edge_agent.errors import EnvelopeError, UnknownKeyError
from edge_agent.reading import Quality, Reading
from edge_agent.seal import cbor_in, columnar, unzstd
from edge_agent.seal.catalogue import Catalogue, Catalogues
from edge_agent.seal.keys import key_id

FORMAT_VERSION = 1
FORMATS = (1, 2)
COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID = 1, 2, 3, 4
ALLOWED_ALGORITHMS = frozenset({ALG_EDDSA})
"""The algorithm allow-list of consumers: EdDSA with Ed25519 keys, nothing else (no downgrade)."""
_PROTECTED_ONLY = frozenset({HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID, "enc"})
"""Header labels that must be protected (signed) when present: never taken from `unprotected`."""
CONTENT_TYPE = "application/cbor"
RETENTION = "retention"
"""Eviction reason (docs/contract.md §4.7): the buffer was full (`store.max_bytes`, or the disk)
or the batch older than `store.max_age`. Also the reason of a range declared without one (agents
before `evicted_reasons`, contract 1.6)."""
TOO_LARGE = "too_large"
"""Eviction reason: the batch's PUBLISH is larger than the broker's Maximum Packet Size (as it
advertised, as `mqtt.max_packet_size` says, or as its DISCONNECT 0x95 said)."""
UNDELIVERABLE = "undeliverable"
"""Eviction reason: the broker closed the connection every time the batch was sent alone,
without saying it was too large (an MQTT 3.1.1 broker, or a limit it does not advertise)."""
MAX_PAYLOAD_BYTES = 64 * 1024 * 1024
"""Decompression limit for consumers: a batch is never near this; a zstd bomb would be."""
_OUTER_DEPTH = 3
_OUTER_CONTAINERS = 16
_OUTER_ITEMS = 1_000
"""The COSE_Sign1 structure and its protected header are read before the signature is checked,
from anyone: arrays and maps nested at most 3 deep, 16 of them, 1,000 data items (a header of
5 million entries, 29 MiB, made 330 MB of objects and 1.2 s), no tag but COSE_Sign1's (18),
so that no message makes cbor2 build gigabytes of containers or compute a rational's greatest
common divisor (`cbor_in`). The agent's messages have 2 containers (the array, the empty
unprotected header) and a protected header of 1."""


@dataclass(frozen=True)
class Batch:
    """One batch as the cloud sees it, after verification."""

    gateway: str
    epoch: str
    batch: int
    readings: list[dict[str, Any]]
    sealed_ns: int
    evicted: list[tuple[int, int]] = field(default_factory=list)
    kid: bytes = b""
    evicted_reasons: list[str] = field(default_factory=list)
    """Why each `evicted` range was dropped, in the same order (`retention` when unsaid)."""
    previous_epoch: PreviousEpoch | None = None
    """How the gateway's previous epoch ended, in the first batch of a new epoch (§4)."""
    clock: ClockState | None = None
    """The gateway clock's state when the batch was sealed (§4.3); None from agents before 1.14."""
    digest: bytes = b""
    """16 bytes of BLAKE2b over the signed payload: the same for a byte-identical re-send,
    different for any other content (consumer/completeness.py tells conflicts by it)."""
    columns: columnar.Columns | None = None
    """A format-2 batch's readings as columns, from an `Opener(..., columns=True)` only: then
    `readings` is empty and these hold them (no map per reading is made)."""


@dataclass(frozen=True)
class ClockState:
    """The gateway clock's state when a batch was sealed (`clock`, docs/contract.md §4.3).

    `synced`: the kernel said the wall clock was synchronised (adjtimex, STA_UNSYNC clear);
    `error_ns`: its estimated error in ns, None when unknown; `boot`: the boot id; `mono`:
    CLOCK_MONOTONIC in ns at sealing, comparable only between batches of one `boot`. A batch's
    `sealed` and the gateway-stamped reading times are trustworthy to `error_ns` when `synced`,
    and a guess otherwise. Keys a later agent adds are ignored.
    """

    synced: bool
    error_ns: int | None
    boot: str
    mono: int

    @classmethod
    def parse(cls, value: Any) -> ClockState:
        """Validate the map as signed; EnvelopeError naming the key that is not what §4.3 says."""
        if not isinstance(value, dict):
            raise EnvelopeError("clock is not a map")
        synced, error, boot, mono = (value.get(k) for k in ("synced", "error_ns", "boot", "mono"))
        if type(synced) is not bool:
            raise EnvelopeError("clock.synced is not a bool")
        if error is not None and (type(error) is not int or error < 0):
            raise EnvelopeError("clock.error_ns is not null or a count of ns")
        if not isinstance(boot, str):
            raise EnvelopeError("clock.boot is not text")
        if type(mono) is not int or mono < 0:
            raise EnvelopeError("clock.mono is not a count of ns")
        return cls(synced, error, boot, mono)

    def to_json(self) -> dict[str, Any]:
        """As the map was sent: `{"synced", "error_ns", "boot", "mono"}`."""
        return {"synced": self.synced, "error_ns": self.error_ns, "boot": self.boot,
                "mono": self.mono}  # fmt: skip


@dataclass(frozen=True)
class PreviousEpoch:
    """How this gateway's previous epoch ended (`previous_epoch`, docs/contract.md §4).

    Sent in the first batch of a new epoch whose buffer did not carry on the old one: the
    previous file was bad and quarantined, missing, or replaced. Its readings up to `last_seq`
    that a consumer has not received are lost; `epoch` and `last_seq` are None when unknown.
    """

    epoch: str | None
    last_seq: int | None
    ended: str
    detail: str

    @classmethod
    def parse(cls, value: Any) -> PreviousEpoch:
        """Validate the map as signed; EnvelopeError when it is not what §4 says."""
        if not isinstance(value, dict):
            raise EnvelopeError("previous_epoch is not a map")
        epoch, last_seq = value.get("epoch"), value.get("last_seq")
        ended, detail = value.get("ended"), value.get("detail", "")
        if epoch is not None and not isinstance(epoch, str):
            raise EnvelopeError("previous_epoch.epoch is not text")
        if last_seq is not None and (type(last_seq) is not int or last_seq < 0):
            raise EnvelopeError("previous_epoch.last_seq is not a seq")
        if not isinstance(ended, str) or not isinstance(detail, str):
            raise EnvelopeError("previous_epoch.ended and .detail must be text")
        return cls(epoch, last_seq, ended, detail)


_PACK_U8 = struct.Struct(">BB").pack
_PACK_U16 = struct.Struct(">BH").pack
_PACK_U32 = struct.Struct(">BI").pack
_PACK_U64 = struct.Struct(">BQ").pack
_PACK_DOUBLE = struct.Struct(">Bd").pack
_PACK_MAP_SEQ32 = struct.Struct(">5sBI").pack
"""A reading's map head, its key "seq" and a 32-bit seq: one call for the usual case."""
_SMALL = tuple(bytes((n,)) for n in range(24))
MAX_CACHED_NAMES = 1_000_000
"""Encoded (source, point) names kept at most; more (a bug, or names made per reading) starts
the cache afresh rather than grow without bound."""


def cbor_head(major: int, n: int) -> bytes:
    """The CBOR head of major type `major` (0x00, 0x20, ... 0xA0) with argument `n` (RFC 8949
    §3), in its shortest form, as cbor2 writes it."""
    if n < 24:
        return bytes((major | n,))
    if n < 0x100:
        return _PACK_U8(major | 24, n)
    if n < 0x10000:
        return _PACK_U16(major | 25, n)
    if n < 0x100000000:
        return _PACK_U32(major | 26, n)
    return _PACK_U64(major | 27, n)


def cbor_value(value: object) -> bytes:
    """`cbor2.dumps(value)` for a reading's value, without its call overhead for the usual types.

    Integers within 64 bits, finite floats (always as float64, as cbor2 writes them unless
    canonical), text, bools and None are written here; anything else by cbor2 itself, which
    raises for what it cannot encode, as before.
    """
    kind = type(value)
    if kind is int:
        assert isinstance(value, int)
        if 0 <= value < 0x10000000000000000:
            return cbor_head(0x00, value)
        if -0x10000000000000000 <= value < 0:
            return cbor_head(0x20, -1 - value)
    elif kind is float:
        assert isinstance(value, float)
        if math.isfinite(value):
            return _PACK_DOUBLE(0xFB, value)
    elif kind is str:
        assert isinstance(value, str)
        data = value.encode("utf-8")  # UnicodeEncodeError (a ValueError) as cbor2 would raise
        return cbor_head(0x60, len(data)) + data
    elif value is None:
        return b"\xf6"
    elif kind is bool:
        return b"\xf5" if value else b"\xf4"
    return bytes(cbor2.dumps(value))


_KEY_SEQ = b"\x63seq"
_KEY_V = b"\x61v"
_KEY_SC = b"\x62sc"
_QUALITY_BYTES = {q: b"\x61q" + cbor_value(q.value) for q in Quality}


class ReadingEncoder:
    """The CBOR array of a batch's readings, byte for byte what cbor2 writes for the list of
    maps {"seq", "src", "pt", "ts", "v", "q"[, "sc"]} in that key order (docs/contract.md §4).

    Keeps the encoded names of the points it has seen (about 100 bytes a point).
    """

    def __init__(self) -> None:
        self._names: dict[str, dict[str, bytes]] = {}
        self._cached = 0

    def encode(self, readings: Sequence[Reading], first_seq: int) -> bytes:
        """The array of `readings`, numbered from `first_seq`.

        Raises ValueError (text that is not UTF-8 encodable) or what cbor2 raises for a value
        it cannot encode, as cbor2.dumps of the maps would.
        """
        parts = [cbor_head(0x80, len(readings))]
        append = parts.append
        head, qualities, small = cbor_head, _QUALITY_BYTES, _SMALL
        pack_seq, pack_u8, pack_u16 = _PACK_MAP_SEQ32, _PACK_U8, _PACK_U16
        pack_u64, pack_double, isfinite = _PACK_U64, _PACK_DOUBLE, math.isfinite
        names = self._names
        last_src: str | None = None
        by_point: dict[str, bytes] = {}
        last_ts = -1
        ts_v = b""
        seq = first_seq
        for src, pt, ts, value, quality, code in readings:
            start = b"\xa6\x63seq" if code is None else b"\xa7\x63seq"
            if 0x10000 <= seq < 0x100000000:
                append(pack_seq(start, 0x1A, seq))
            else:
                append(start)
                append(head(0x00, seq))
            if src is not last_src:
                by_point = names.get(src) or names.setdefault(src, {})
                last_src = src
            name = by_point.get(pt)
            append(name if name is not None else self._name(by_point, src, pt))
            if ts != last_ts:  # the readings of one poll share their time
                last_ts = ts
                ts_v = (pack_u64(0x1B, ts) if ts >= 0x100000000 else cbor_value(ts)) + _KEY_V
            append(ts_v)
            kind = type(value)
            if kind is int and 0 <= value < 0x10000:  # type: ignore[operator]
                if value < 24:  # type: ignore[operator]
                    append(small[value])  # type: ignore[index]
                elif value < 0x100:  # type: ignore[operator]
                    append(pack_u8(0x18, value))
                else:
                    append(pack_u16(0x19, value))
            elif kind is float and isfinite(value):  # type: ignore[arg-type]
                append(pack_double(0xFB, value))
            else:
                append(cbor_value(value))
            append(qualities[quality])
            if code is not None:
                append(_KEY_SC)
                append(cbor_value(code))
            seq += 1
        return b"".join(parts)

    def _name(self, by_point: dict[str, bytes], src: str, pt: str) -> bytes:
        if self._cached >= MAX_CACHED_NAMES:
            self._names.clear()
            self._cached = 0
            by_point = self._names.setdefault(src, {})
        name = by_point[pt] = b"\x63src" + cbor_value(src) + b"\x62pt" + cbor_value(pt) + b"\x62ts"
        self._cached += 1
        return name


ZSTD_LEVEL = 3
"""zstd level of format 1: a map per reading, where zstd has many long repeats to find."""
ZSTD_LEVEL_COLUMNS = 6
"""zstd level of format 2: 1.5% fewer bytes than level 3 on the plant mix for 5% more
sealing CPU (docs/performance.md, "Bytes on the wire")."""


class Sealer:
    """Encodes, compresses and signs batches with one key, in payload format 1 or 2 (§4.3, §4.9).

    A format-2 Sealer remembers the decimal places of each point's floats between batches (see
    `columnar.ColumnEncoder`): use one Sealer per stream.
    """

    def __init__(
        self,
        key: Ed25519PrivateKey,
        *,
        compress: bool = True,
        payload_format: int = 1,
        catalogue: bool = False,
    ) -> None:
        """`catalogue` (format 2 only): batches reference the point catalogue (§4.12) instead
        of carrying their points' names; `catalogue` then says which after each `seal`."""
        if payload_format not in FORMATS:
            raise ValueError(f"payload format {payload_format!r} is not one of {FORMATS}")
        self.payload_format = payload_format
        self._catalogues = Catalogues() if catalogue and payload_format == 2 else None
        self._columns = columnar.ColumnEncoder(self._catalogues) if payload_format == 2 else None
        self.signer = Signer(key)
        """Signs with the same key, uncompressed: the high-water mark (seal/hwm.py) uses it."""
        self.kid = self.signer.kid
        level = ZSTD_LEVEL_COLUMNS if payload_format == 2 else ZSTD_LEVEL
        self._compressor = zstandard.ZstdCompressor(level=level) if compress else None
        self._readings = ReadingEncoder()

    def seal(
        self,
        *,
        gateway: str,
        epoch: str,
        batch: int,
        first_seq: int,
        readings: Sequence[Reading],
        sealed_ns: int,
        evicted: Sequence[tuple[int, int]] = (),
        reasons: Sequence[str] = (),
        previous_epoch: Mapping[str, Any] | None = None,
        clock: Mapping[str, Any] | None = None,
    ) -> bytes:
        """The COSE_Sign1 bytes for `readings`, numbered from `first_seq` in order.

        `reasons` says why each `evicted` range was dropped (empty: all by retention); it goes
        out as `evicted_reasons` (§4.3, in both formats), an extension that consumers which do
        not know it ignore. `previous_epoch` (the map of `PreviousEpoch`) goes out as
        `previous_epoch`, in both formats, only when given: every other batch is encoded
        exactly as before. `clock` (`ClockWatch.state()`: synced, error_ns, boot, mono) goes
        out as `clock`, in both formats, when given (§4.3).

        Raises TypeError, ValueError or cbor2.CBOREncodeError for a value that cannot be encoded
        (the batcher then applies the value rules and seals again), and ValueError when
        `reasons` is given but not one per range of `evicted`.
        """
        if reasons and len(reasons) != len(evicted):
            raise ValueError(f"{len(reasons)} reasons for {len(evicted)} evicted ranges")
        declared = [list(e) for e in evicted]
        notes: dict[str, Any] = {}  # the optional keys, the same in both formats
        if evicted:
            notes["evicted_reasons"] = list(reasons) or [RETENTION] * len(evicted)
        if previous_epoch is not None:
            notes["previous_epoch"] = dict(previous_epoch)
        if clock is not None:
            notes["clock"] = dict(clock)
        if self._columns is not None:
            columns = {
                "v": columnar.FORMAT_VERSION,
                "gateway": gateway,
                "epoch": epoch,
                "batch": batch,
                "sealed": sealed_ns,
                "evicted": declared,
                **notes,
                **self._columns.encode(readings, first_seq),
            }
            return self._sign(cbor2.dumps(columns))
        # The map of docs/contract.md §4 in this key order, as cbor2.dumps would write it, with
        # the readings' array from the ReadingEncoder (see the module docstring).
        body = b"".join((
            cbor_head(0xA0, 7 + len(notes)),
            b"\x61v", cbor_value(FORMAT_VERSION),
            b"\x67gateway", cbor_value(gateway),
            b"\x65epoch", cbor_value(epoch),
            b"\x65batch", cbor_value(batch),
            b"\x68readings", self._readings.encode(readings, first_seq),
            b"\x66sealed", cbor_value(sealed_ns),
            b"\x67evicted", cbor2.dumps(declared),
            *(cbor_value(k) + cbor2.dumps(v) for k, v in notes.items()),
        ))  # fmt: skip
        return self._sign(body)

    @property
    def catalogue(self) -> Catalogue | None:
        """The point catalogue the last batch sealed references (None: it references none).
        It must reach consumers before that batch does (the buffer keeps it beside it)."""
        if self._catalogues is None or self._columns is None or not self._columns.referenced:
            return None
        return self._catalogues.current

    def resume_catalogue(self, catalogue: Catalogue) -> None:
        """Carry on with `catalogue` (the newest in the buffer after a restart), and with the
        decimal places its `pk` gives each point: the same points then make no new catalogue.
        Ignored when this Sealer references none."""
        if self._catalogues is not None and self._columns is not None:
            self._catalogues.resume(catalogue)
            self._columns.remember_places(catalogue.points, catalogue.pk)

    def _sign(self, body: bytes) -> bytes:
        if self._compressor is None:
            return self.signer.sign(body)
        return self.signer.sign(self._compressor.compress(body), encoding="zstd")


class Signer:
    """Signs payloads as COSE_Sign1 with one Ed25519 key (docs/contract.md §4.2).

    The protected header `{1: -8, 4: kid, 3: "application/cbor"}` (with `"enc"` when the payload
    is compressed) is encoded once, canonically: its bytes are what gets signed. The unprotected
    header is always the empty map.
    """

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.kid = key_id(key.public_key())
        """First 8 bytes of SHA-256 of the raw public key (seal/keys.py)."""
        header: dict[Any, Any] = {
            HDR_ALG: ALG_EDDSA,
            HDR_KID: self.kid,
            HDR_CONTENT_TYPE: CONTENT_TYPE,
        }
        self._protected = {
            None: cbor2.dumps(header, canonical=True),
            "zstd": cbor2.dumps({**header, "enc": "zstd"}, canonical=True),
        }

    def sign(self, payload: bytes, *, encoding: str | None = None) -> bytes:
        """The tagged COSE_Sign1 bytes of `payload`; `encoding` ("zstd" or None) is only
        declared in the header (the caller compressed). KeyError for another encoding."""
        protected = self._protected[encoding]
        signature = self._key.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
        return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


@dataclass(frozen=True)
class Sign1:
    """A COSE_Sign1 message whose structure and headers are checked, its signature not yet.

    `header` is the protected header map (EdDSA, a byte-string `kid`, no `crit`); `payload` is
    as carried (still compressed when `header` says `enc`).
    """

    protected: bytes
    header: dict[Any, Any]
    kid: bytes
    payload: bytes
    signature: bytes

    @classmethod
    def parse(cls, message: bytes) -> Sign1:
        """Check the structure of `message` (§4.2); EnvelopeError says what is wrong.

        Bytes that are not CBOR, or not of the COSE_Sign1 shape (`_OUTER_DEPTH`), are an
        EnvelopeError (cbor_in.CBORShapeError) too.
        """
        outer = cbor_in.loads(
            message, max_depth=_OUTER_DEPTH, max_containers=_OUTER_CONTAINERS,
            max_items=_OUTER_ITEMS,
            tags=frozenset({COSE_SIGN1_TAG}),
        )  # fmt: skip
        if not isinstance(outer, cbor2.CBORTag) or outer.tag != COSE_SIGN1_TAG:
            raise EnvelopeError("not a tagged COSE_Sign1 message")
        parts = outer.value
        if not isinstance(parts, list | tuple) or len(parts) != 4:
            raise EnvelopeError("COSE_Sign1 must have four elements")
        protected, unprotected, payload, signature = parts
        if not all(isinstance(part, bytes) for part in (protected, payload, signature)):
            raise EnvelopeError("protected header, payload and signature must be byte strings")
        _check_unprotected(unprotected)
        header = _protected_header(protected)
        return cls(protected, header, header[HDR_KID], payload, signature)

    def check(self, keys: Mapping[bytes, Ed25519PublicKey]) -> None:
        """Check the signature by the key `keys` holds for this kid (over the Sig_structure,
        empty external AAD).

        Raises UnknownKeyError for a kid not in `keys`, EnvelopeError for a bad signature.
        """
        key = keys.get(self.kid)
        if key is None:
            raise UnknownKeyError(f"unknown key id {self.kid.hex()}")
        try:
            key.verify(
                self.signature, cbor2.dumps(["Signature1", self.protected, b"", self.payload])
            )
        except InvalidSignature:
            raise EnvelopeError(f"bad signature (key id {self.kid.hex()})") from None


def _protected_header(protected: bytes) -> dict[Any, Any]:
    """The protected header map, checked: no `crit`, EdDSA only, a byte-string key id.

    Raises EnvelopeError naming what is wrong (RFC 9052 §3.1: `crit` parameters a consumer does
    not understand make the message invalid).
    """
    header = (
        cbor_in.loads(
            protected,
            max_depth=_OUTER_DEPTH,
            max_containers=_OUTER_CONTAINERS,
            max_items=_OUTER_ITEMS,
        )
        if protected
        else {}
    )
    if not isinstance(header, dict):
        raise EnvelopeError("protected header is not a CBOR map")
    if HDR_CRIT in header:
        raise EnvelopeError("critical header parameters (crit) are not understood")
    alg = header.get(HDR_ALG)
    if type(alg) is not int or alg not in ALLOWED_ALGORITHMS:  # -8.0 or True are not -8
        raise EnvelopeError(f"unsupported algorithm {alg!r} (only EdDSA, -8, is accepted)")
    kid = header.get(HDR_KID)
    if not isinstance(kid, bytes):
        raise EnvelopeError(f"missing or malformed key id {kid!r}")
    return header


def _check_unprotected(unprotected: object) -> None:
    """RFC 9052 §4.2: the unprotected header is a map; none of our labels may be in it."""
    if not isinstance(unprotected, dict):
        raise EnvelopeError(f"unprotected header is a {type(unprotected).__name__}, not a map")
    unsigned = sorted(str(label) for label in unprotected if label in _PROTECTED_ONLY)
    if unsigned:
        raise EnvelopeError(f"header parameters {', '.join(unsigned)} must be protected")


class Opener:
    """Verifies and decodes batches signed by any of a set of trusted keys."""

    def __init__(
        self,
        keys: Sequence[Ed25519PublicKey],
        *,
        columns: bool = False,
        catalogues: MutableMapping[bytes, Catalogue] | None = None,
    ) -> None:
        """`columns`: give a format-2 batch's readings as `Batch.columns` (and `readings` empty)
        instead of a map per reading; format 1's are maps either way. `catalogues`: the point
        catalogues received (§4.12) by digest, which the consumer adds to as they arrive (an
        empty dict of the Opener's own when not given: `Opener.catalogues`)."""
        self._keys: Mapping[bytes, Ed25519PublicKey] = {key_id(k): k for k in keys}
        self._columns = columns
        self.catalogues: MutableMapping[bytes, Catalogue] = {} if catalogues is None else catalogues

    def open(self, message: bytes) -> Batch:
        """Verify `message` and return its batch; EnvelopeError says what is wrong.

        CatalogueMissingError (an EnvelopeError) says the batch is authentic but references a
        point catalogue not in `catalogues` (yet): keep it and open it again once it is there.

        Anyone who can publish on the topic can send anything: every malformed input ends in
        EnvelopeError, never in another exception.
        """
        try:
            return self._open(message)
        except EnvelopeError:
            raise
        except (
            cbor2.CBORError,
            ValueError,
            TypeError,
            LookupError,
            AttributeError,
            ArithmeticError,
            RecursionError,
        ) as exc:  # OverflowError: an evicted range of infinity (int(inf)); decimal.Overflow:
            # a signed payload's bigfloat (CBOR tag 5) of exponent 10^18, an ArithmeticError
            raise EnvelopeError(f"malformed batch: {type(exc).__name__}: {exc}") from None

    @property
    def keys(self) -> Mapping[bytes, Ed25519PublicKey]:
        """The trusted public keys by key id."""
        return self._keys

    def _open(self, message: bytes) -> Batch:
        signed = Sign1.parse(message)
        signed.check(self._keys)
        kid, header, payload = signed.kid, signed.header, signed.payload
        encoding = header.get("enc")
        if encoding == "zstd":
            try:
                payload = unzstd.decompress(payload, MAX_PAYLOAD_BYTES)
            except (zstandard.ZstdError, unzstd.TooLargeError) as exc:
                raise EnvelopeError(f"bad zstd payload: {exc}") from None
        elif encoding is not None:
            raise EnvelopeError(f"unknown payload encoding {encoding!r}")
        body = cbor2.loads(payload)
        if not isinstance(body, dict):
            raise EnvelopeError("payload is not a CBOR map")
        version = body.get("v")
        columns = None
        if version == columnar.FORMAT_VERSION and self._columns:
            readings, columns = [], columnar.decode_columns(body, self.catalogues)
        elif version == columnar.FORMAT_VERSION:
            readings = columnar.decode(body, self.catalogues)
        elif version == FORMAT_VERSION:
            readings = list(body["readings"])
            seqs = [r["seq"] for r in readings]
            if seqs and seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                raise EnvelopeError("readings' seq values are not consecutive")
        else:
            raise EnvelopeError(f"unsupported payload version {version!r}")
        evicted = [(int(a), int(b)) for a, b in body.get("evicted", [])]
        reasons = body.get("evicted_reasons", [RETENTION] * len(evicted))
        if (
            not isinstance(reasons, list)
            or len(reasons) != len(evicted)
            or not all(isinstance(r, str) for r in reasons)
        ):
            raise EnvelopeError("evicted_reasons must be one text per evicted range")
        previous = body.get("previous_epoch")
        clock = body.get("clock")
        return Batch(
            gateway=str(body["gateway"]),
            epoch=str(body["epoch"]),
            batch=int(body["batch"]),
            readings=readings,
            sealed_ns=int(body["sealed"]),
            evicted=evicted,
            kid=kid,
            evicted_reasons=reasons,
            previous_epoch=None if previous is None else PreviousEpoch.parse(previous),
            digest=hashlib.blake2b(signed.payload, digest_size=16).digest(),
            clock=None if clock is None else ClockState.parse(clock),
            columns=columns,
        )
