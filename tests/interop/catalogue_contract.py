"""An independent reader of format-2 batches and point catalogues, from docs/contract.md alone.

Written from the text of §4.2 (the envelope), §4.9 (format 2, the 2.0 layout) and §4.12 (the
point catalogue), without edge_agent's decoder (`seal.columnar`, `seal.catalogue`, `seal.envelope`
are not imported): where it and the reference Opener agree bit for bit on what the reference
Sealer writes, the contract's text is enough to read a batch. It uses cbor2, zstandard and
cryptography only, and decodes the plain way (a Python statement per value), as a consumer in
another language would.

`ContractError` is raised where the text says a consumer refuses something; a payload that the
text does not describe at all (a wrong CBOR type) may fail with any error: this is a reader for
comparisons, not a hardened consumer.

Shapes: `read_catalogue(payload, digest)` -> `Catalogue(points, pk)` with `points` a list of
(source, name) in catalogue order and `pk` bytes, one per point; `open_batch(message, key,
catalogues)` -> the list of §4.4 reading maps (`sc` only where there is a status code).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import cbor2
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey


class ContractError(Exception):
    """What the contract says a consumer refuses."""


class MissingCatalogue(ContractError):  # noqa: N818 - the contract's words: "does not have (yet)"
    """§4.12: a batch that references a catalogue the consumer does not have (yet)."""


@dataclass(frozen=True)
class Catalogue:
    points: list[tuple[str, str]]
    pk: bytes


# --------------------------------------------------------------------------- §4.9 pieces


def shuffled(data: bytes, width: int, count: int) -> list[bytes]:
    """§4.9: "byte-shuffled: the first byte of every value, then the second byte of every
    value, and so on"."""
    if len(data) != width * count:
        raise ContractError(f"{len(data)} bytes for {count} values of {width}")
    return [bytes(data[b * count + i] for b in range(width)) for i in range(count)]


def int_column(column: list[Any], count: int) -> list[int]:
    """§4.9 "Integer columns": `[0, base, width, data]`, `[2, width, data]`, `[3, base, bits,
    data]`, `[1, [values]]`, `count` values (known from other keys)."""
    method = column[0]
    if method == 0:
        _, base, width, data = column
        if width not in (0, 1, 2, 4, 8):
            raise ContractError(f"width {width}")
        if width == 0:
            if data != b"":
                raise ContractError("width 0 with data")
            values = [base] * count
        else:
            values = [base + int.from_bytes(v, "little") for v in shuffled(data, width, count)]
    elif method == 2:
        _, width, data = column
        if width not in (1, 2, 4, 8):
            raise ContractError(f"zigzag width {width}")
        values = []
        for v in shuffled(data, width, count):
            u = int.from_bytes(v, "little")
            values.append(u // 2 if u % 2 == 0 else -(u + 1) // 2)
    elif method == 3:
        _, base, bits, data = column
        if bits not in (1, 2, 4) or len(data) != -(-count * bits // 8):
            raise ContractError("bits column of the wrong size")
        whole = int.from_bytes(data, "little")
        if whole >> (count * bits):
            raise ContractError("bits column padded with bits that are not 0")
        values = [base + ((whole >> (i * bits)) & ((1 << bits) - 1)) for i in range(count)]
    elif method == 1:
        values = list(column[1])
        if len(values) != count:
            raise ContractError(f"array of {len(values)} for {count}")
    else:
        raise ContractError(f"packing {method!r}")
    for v in (*values, *column[1:2]):
        if type(v) is int and not -(2**1088) < v < 2**1088:
            raise ContractError("integer beyond 2^1088")
    return values


def series(column: list[Any], owners: list[int]) -> list[int]:
    """§4.9 "Series": `[firsts, differences]` in grouped order."""
    starts = {i for i in range(len(owners)) if i == 0 or owners[i] != owners[i - 1]}
    firsts = iter(int_column(column[0], len(starts)))
    diffs = iter(int_column(column[1], len(owners) - len(starts)))
    out: list[int] = []
    for i in range(len(owners)):
        out.append(next(firsts) if i in starts else out[-1] + next(diffs))
    return out


def runs(column: list[Any], count: int) -> list[Any]:
    """§4.9: a *runs* column `[values, lengths]`, lengths each at least 1, summing to n."""
    values, lengths = column
    lengths = int_column(lengths, len(values))
    if any(length < 1 for length in lengths) or sum(lengths) != count:
        raise ContractError("runs that do not cover the readings")
    return [v for v, length in zip(values, lengths, strict=True) for _ in range(length)]


def points_dictionary(body: dict[str, Any], np: int) -> list[tuple[str, str]]:
    """§4.9 `src`, `ps`, `tok`, `pn`, `pi` (parts by layer): each point's (source, name)."""
    tok = body["tok"].split("\n") if isinstance(body["tok"], str) else list(body["tok"])
    ps = int_column(body["ps"], np)
    pn = int_column(body["pn"], np)
    if any(count < 1 for count in pn) or sum(pn) > 6_400_000:
        raise ContractError("pn")
    pi = iter(int_column(body["pi"], sum(pn)))
    parts: list[list[str]] = [[] for _ in range(np)]
    for layer in range(max(pn, default=0)):  # the first part of every name, then the second...
        for p in range(np):
            if pn[p] > layer:
                position = next(pi)
                if not 0 <= position < len(tok):
                    raise ContractError("pi beyond tok")
                parts[p].append(tok[position])
    src = body["src"]
    if any(not 0 <= s < len(src) for s in ps):
        raise ContractError("ps beyond src")
    return [(src[s], ".".join(name)) for s, name in zip(ps, parts, strict=True)]


def check_pk(pk: bytes) -> None:
    """§4.9 `pk`: type in the high 3 bits (0..4 or 7), places in the low 5 (0..16; 0 unless
    float or mixed)."""
    for byte in pk:
        kind, places = byte >> 5, byte & 31
        if kind not in (0, 1, 2, 3, 4, 7) or places > 16 or (places and kind not in (3, 7)):
            raise ContractError(f"pk byte {byte:#x}")


# --------------------------------------------------------------------------- §4.12


def digest_of(payload: bytes) -> bytes:
    """§4.12: "the first 16 bytes of SHA-256 over the payload exactly as sent"."""
    return hashlib.sha256(payload).digest()[:16]


def read_catalogue(payload: bytes, digest: bytes | None = None) -> Catalogue:
    """§4.12 **Payload**: a zstd frame of a CBOR map `v`, `np`, the dictionary keys, `pk`."""
    if len(payload) > 16 * 1024 * 1024:
        raise ContractError("catalogue over 16 MiB")
    if digest is not None and digest_of(payload) != digest:
        raise ContractError("catalogue digest is not the topic's")
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    if len(plain) > 16 * 1024 * 1024:
        raise ContractError("catalogue over 16 MiB uncompressed")
    body = cbor2.loads(plain)
    if set(body) != {"v", "np", "src", "ps", "tok", "pn", "pi", "pk"} or body["v"] != 1:
        raise ContractError("not a catalogue map of version 1")
    np = body["np"]
    if not 1 <= np <= 100_000:
        raise ContractError(f"catalogue np {np}")
    pk = body["pk"]
    if len(pk) != np:
        raise ContractError("catalogue pk")
    check_pk(pk)
    return Catalogue(points_dictionary(body, np), bytes(pk))


# --------------------------------------------------------------------------- §4.2


def verified_payload(message: bytes, key: Ed25519PublicKey) -> bytes:
    """§4.2: COSE_Sign1 (tag 18) verified with `key`, the payload decompressed per `"enc"`."""
    tagged = cbor2.loads(message)
    if not isinstance(tagged, cbor2.CBORTag) or tagged.tag != 18:
        raise ContractError("not COSE_Sign1")
    protected, unprotected, payload, signature = tagged.value
    header = cbor2.loads(protected)
    if header.get(1) != -8 or unprotected != {}:
        raise ContractError("header")
    key.verify(signature, cbor2.dumps(["Signature1", protected, b"", payload]))
    if header.get("enc") == "zstd":
        payload = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
    return bytes(payload)


# --------------------------------------------------------------------------- §4.9 + §4.12


def open_batch(
    message: bytes, key: Ed25519PublicKey, catalogues: dict[bytes, Catalogue]
) -> list[dict[str, Any]]:
    """The readings of a signed format-2 batch (§4.4 maps in seq order)."""
    return decode(cbor2.loads(verified_payload(message, key)), catalogues)


DICTIONARY = ("src", "ps", "tok", "pn", "pi")


def decode(body: dict[str, Any], catalogues: dict[bytes, Catalogue]) -> list[dict[str, Any]]:
    """A format-2 payload map (2.0 layout), self-contained or referencing a catalogue."""
    if body["v"] != 2:
        raise ContractError("not format 2")
    n, np = body["n"], body["np"]
    if not 0 <= n <= 100_000 or not 0 <= np <= n:
        raise ContractError("n or np")
    pk = bytes(body["pk"])
    if len(pk) != np:
        raise ContractError("pk length")
    if "cat" in body:
        # §4.12: "instead of src, ps, tok, pn and pi (a consumer refuses a batch with both)"
        if any(key in body for key in DICTIONARY):
            raise ContractError("cat and a points dictionary")
        if n == 0:
            raise ContractError("a batch of no readings never references a catalogue")
        cat = body["cat"]
        if len(cat) != 16:
            raise ContractError("cat is not 16 bytes")
        if cat not in catalogues:
            raise MissingCatalogue(cat.hex())
        catalogue = catalogues[cat]
        positions = list(accumulate(int_column(body["cp"], np)))  # the first from 0
        if any(not 0 <= p < len(catalogue.points) for p in positions):
            raise ContractError("cp beyond the catalogue")
        points = [catalogue.points[p] for p in positions]
        pk = bytes(b ^ catalogue.pk[p] for b, p in zip(pk, positions, strict=True))
    else:
        points = points_dictionary(body, np)
    check_pk(pk)
    idx = list(accumulate(int_column(body["idx"], n)))
    if any(not 0 <= i < np for i in idx):
        raise ContractError("idx beyond the points")
    nt = body["nt"]
    times = list(accumulate(int_column(body["ts"], max(nt - 1, 0)), initial=body["t0"]))
    ti = list(accumulate(int_column(body["ti"], n)))
    if any(not 0 <= t < nt for t in ti):
        raise ContractError("ti beyond the timestamps")
    grouped = sorted(range(n), key=lambda i: idx[i])  # stable: by number within a point
    owners = [idx[i] for i in grouped]
    tx = iter(body["tx"])
    types = [pk[p] >> 5 if pk[p] >> 5 != 7 else next(tx) for p in owners]
    if next(tx, None) is not None:
        raise ContractError("tx longer than the mixed points' readings")
    for p in {p for p in owners if pk[p] >> 5 == 7}:
        if len({t for t, q in zip(types, owners, strict=True) if q == p}) < 2:
            raise ContractError("a mixed point of one type")
    if any(t > 4 for t in types):
        raise ContractError("tx type")
    bools = iter(body["bool"])
    ints = iter(series(body["int"], [p for p, t in zip(owners, types, strict=True) if t == 2]))
    texts = iter(body["text"])
    float_owners = [p for p, t in zip(owners, types, strict=True) if t == 3]
    fl = body["float"]
    decimal = [(pk[p] & 31) <= 15 for p in float_owners]
    positions = [j for j, d in enumerate(decimal) if d]  # the floats of decimal points
    for x in fl["x"]:
        decimal[positions[x]] = False
    dec_owners = [p for p, d in zip(float_owners, decimal, strict=True) if d]
    ms = iter(series(fl["dec"], dec_owners))
    raw_owners = [p for p, d in zip(float_owners, decimal, strict=True) if not d]
    raws = []
    previous: dict[int, int] = {}
    for p, word in zip(raw_owners, shuffled(fl["xor"], 8, len(raw_owners)), strict=True):
        bits = int.from_bytes(word, "little") ^ previous.get(p, 0)  # the first of a point XOR 0
        previous[p] = bits
        raws.append(struct.unpack("<d", bits.to_bytes(8, "little"))[0])
    raw_iter = iter(raws)
    floats = []
    for p, d in zip(float_owners, decimal, strict=True):
        if d:
            m = next(ms)
            if float(m) != m:
                raise ContractError("m is not a whole number a double holds exactly")
            floats.append(float(m) / 10.0 ** (pk[p] & 31))  # one IEEE division
        else:
            floats.append(next(raw_iter))
    float_iter = iter(floats)
    grouped_values: list[Any] = []
    for t in types:
        if t == 0:
            grouped_values.append(None)
        elif t == 1:
            byte = next(bools)
            if byte not in (0, 1):
                raise ContractError("bool byte")
            grouped_values.append(bool(byte))
        elif t == 2:
            grouped_values.append(next(ints))
        elif t == 3:
            grouped_values.append(next(float_iter))
        else:
            grouped_values.append(next(texts))
    for rest in (bools, ints, texts):
        if next(rest, None) is not None:
            raise ContractError("a value column longer than its readings")
    values: list[Any] = [None] * n
    for j, i in enumerate(grouped):
        values[i] = grouped_values[j]
    q = runs(body["q"], n)
    sc = runs(body["sc"], n)
    if any(v not in ("good", "uncertain", "bad") for v in q):
        raise ContractError("quality")
    out = []
    for i in range(n):
        source, name = points[idx[i]]
        reading = {"seq": body["seq"] + i, "src": source, "pt": name, "ts": times[ti[i]],
                   "v": values[i], "q": q[i]}  # fmt: skip
        if sc[i] is not None:
            reading["sc"] = sc[i]
        out.append(reading)
    return out
