"""Point catalogues (docs/contract.md §4.12): a gateway's point names, sent once, not per batch.

A self-contained format-2 batch carries the names of its points and their types: for a plant's
200 tags in batches of 1,000 readings that is a quarter of its bytes (docs/performance.md), and
they hardly ever change. A *catalogue* holds them once, named by its digest; a batch references
it (`cat`) and gives each of its points as a position in it (`cp`), as Sparkplug B's BIRTH
message carries the metric names once and its DATA messages aliases.

The catalogue travels on its own topic, retained, and is not signed: its digest binds it, and
the digest is inside every signed batch that references it. The agent keeps each one in its
buffer with the batches that reference it and publishes it on every connection before them
(forward/mqtt.py); a consumer keeps what it receives by digest and holds a batch whose catalogue
has not arrived yet (`columnar.CatalogueMissingError`) instead of refusing it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import cbor2
import zstandard

from edge_agent.errors import EnvelopeError
from edge_agent.seal import cbor_in, columnar, unzstd
from edge_agent.seal.columnar import (
    DIGEST_BYTES,
    CatalogueMissingError,
    CatalogueTooLargeError,
)

__all__ = [
    "MAX_POINTS",
    "Catalogue",
    "CatalogueError",
    "CatalogueMissingError",
    "CatalogueTooLargeError",
    "Catalogues",
    "catalogue_topic",
    "parse_catalogue_topic",
]

VERSION = 1
"""`v` of a catalogue's payload."""
MAX_POINTS = 100_000
"""Points of a catalogue at most: the agent starts a new one from a batch's points beyond it."""
MAX_PAYLOAD_BYTES = 16 * 1024 * 1024
"""A consumer refuses a larger catalogue, compressed or not, before decoding it (100,000 points
of names of a few hundred characters fit with room to spare)."""
ZSTD_LEVEL = 6
"""The plant mix's 200 names: 1,677 bytes of CBOR, 870 compressed (bench/wire_size.py)."""
_KEYS = frozenset({"v", "np", "src", "ps", "tok", "pn", "pi", "pk"})
_DEPTH = 3
"""Arrays and maps nest at most this deep in a catalogue: the map, a column, `[1, [values]]`."""
_CONTAINERS = 64
"""Arrays and maps in a catalogue at most: the map, `src`, `tok` and three columns of two need
8; a payload of empty arrays would otherwise make 1.2 GB of lists of 16 MiB (`cbor_in`)."""
TOPIC_LEVEL = "catalogue"


class CatalogueError(EnvelopeError):
    """A catalogue message that is not as §4.12 says; the message names what is wrong."""


@dataclass(frozen=True)
class Catalogue:
    """One point catalogue: `points` as (source, point name) in catalogue order, each one's
    `pk` byte (type and decimal places, §4.9), the message `payload` (a zstd frame of a CBOR
    map) and its `digest` (the first 16 bytes of SHA-256 over the payload as sent)."""

    digest: bytes
    payload: bytes = field(repr=False)
    points: tuple[tuple[str, str], ...] = field(repr=False)
    pk: bytes = field(repr=False)

    @classmethod
    def build(cls, points: Sequence[tuple[str, str]], pk: bytes) -> Catalogue:
        """The catalogue of `points` with their `pk` bytes (one per point).

        Raises CatalogueTooLargeError for one a consumer would refuse (§4.12, §4.9): over
        MAX_PAYLOAD_BYTES of CBOR or of zstd, or names (with their sources' names, per point)
        of more than columnar.MAX_NAME_CHARS characters."""
        if len(pk) != len(points):
            raise ValueError(f"{len(pk)} pk bytes for {len(points)} points")
        chars = sum(len(source) + len(name) for source, name in points)
        if chars > columnar.MAX_NAME_CHARS:
            raise CatalogueTooLargeError(f"{len(points)} points' names hold {chars} characters")
        dictionary = columnar.points_dictionary(list(points))
        plain = cbor2.dumps({"v": VERSION, **dictionary, "pk": bytes(pk)})
        if len(plain) > MAX_PAYLOAD_BYTES:
            raise CatalogueTooLargeError(f"{len(points)} points make {len(plain)} bytes of CBOR")
        payload = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(plain)
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise CatalogueTooLargeError(f"{len(points)} points make {len(payload)} bytes")
        return cls(_digest(payload), payload, tuple(points), bytes(pk))

    @classmethod
    def parse(cls, payload: bytes, digest: bytes | None = None) -> Catalogue:
        """The catalogue a message carries; `digest`, when given (the topic's), must be its own.

        Raises CatalogueError naming what is wrong: too large, not zstd, not a CBOR map of
        §4.12's keys, a column that breaks §4.9's rules, or a digest that does not match. Never
        another error.
        """
        if len(payload) > MAX_PAYLOAD_BYTES:
            raise CatalogueError(f"catalogue of {len(payload)} bytes; at most {MAX_PAYLOAD_BYTES}")
        own = _digest(payload)
        if digest is not None and digest != own:
            raise CatalogueError(
                f"catalogue's digest is {own.hex()}, not the {digest.hex()} its topic names"
            )
        try:
            plain = unzstd.decompress(payload, MAX_PAYLOAD_BYTES)
        except (zstandard.ZstdError, unzstd.TooLargeError) as exc:
            raise CatalogueError(f"catalogue is not a zstd frame of <= 16 MiB: {exc}") from None
        try:
            body = cbor_in.loads(plain, max_depth=_DEPTH, max_containers=_CONTAINERS, simple=False)
        except cbor_in.CBORShapeError as exc:
            raise CatalogueError(f"catalogue is not CBOR of its shape: {exc}") from None
        if not isinstance(body, dict) or set(body) != _KEYS:
            raise CatalogueError(f"catalogue is not a map of {', '.join(sorted(_KEYS))}")
        if type(body["v"]) is not int or body["v"] != VERSION:
            raise CatalogueError(f"catalogue version {_shown(body['v'])} is not {VERSION}")
        size, pk = body["np"], body["pk"]
        if type(size) is not int or not 1 <= size <= MAX_POINTS:
            raise CatalogueError(f"catalogue np {_shown(size)} is not 1..{MAX_POINTS}")
        if not isinstance(pk, bytes) or len(pk) != size:
            raise CatalogueError(f"catalogue pk does not hold {size} bytes")
        try:
            points = columnar.decode_points(body, size, by_layer=True)
            columnar.check_pk(pk)
        except EnvelopeError as exc:
            raise CatalogueError(f"catalogue: {exc}") from None
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            raise CatalogueError(f"catalogue: malformed columns: {exc}") from None
        return cls(own, payload, tuple(points), pk)


def _shown(value: object) -> str:
    """`value` for an error message, whatever it is: an int of over 4,300 digits has no repr
    (ValueError), and a text of megabytes is no message."""
    if type(value) is int and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    if isinstance(value, int | float | str | bytes | None):
        text = repr(value)
        return text if len(text) <= 40 else f"{text[:37]}..."
    return f"a {type(value).__name__}"


def _digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()[:DIGEST_BYTES]


class Catalogues:
    """The agent's current point catalogue, as a format-2 encoder references it
    (`columnar.ColumnEncoder(catalogues=...)`, the `CatalogueKeeper` it asks for).

    A batch whose points are all in the current catalogue references it. A point not in it
    makes a new one: the old points, then the new (so the positions of the old stay). A `pk`
    that differs from the catalogue's for more than a quarter of a batch's points (a point that
    learnt decimal places, a type that changed) makes a new one with the batch's `pk`; fewer
    differences travel in the batch (its `pk` is the XOR). Beyond MAX_POINTS, or beyond what a
    consumer takes (`Catalogue.build`), a new catalogue starts from the batch's points alone;
    when even those are too many, `positions` raises CatalogueTooLargeError and the batch
    carries its own points.
    """

    def __init__(self) -> None:
        self.version = 0
        self.current: Catalogue | None = None
        self._points: list[tuple[str, str]] = []
        self._pk = bytearray()
        self._position: dict[tuple[str, str], int] = {}

    def resume(self, catalogue: Catalogue) -> None:
        """Carry on with `catalogue` (the newest in the buffer, after a restart), so that the
        same points make no new catalogue."""
        self._points = list(catalogue.points)
        self._pk = bytearray(catalogue.pk)
        self._position = {point: i for i, point in enumerate(self._points)}
        self.current = catalogue
        self.version += 1

    def positions(self, points: Sequence[tuple[str, str]], pk: bytes) -> list[int]:
        """Each of `points`' position in the current catalogue (made anew as the class says).

        All or nothing: when the new catalogue cannot be built (Catalogue.build raises, for a
        name CBOR cannot carry, or CatalogueTooLargeError when not even the batch's points make
        a catalogue a consumer takes), the current one and its points stay as they were, so
        that no later batch gets a position the current catalogue lacks."""
        position = self._position
        missing = [point for point in points if point not in position]
        if not missing:
            where = list(map(position.__getitem__, points))
            differing = [i for i, p in enumerate(where) if self._pk[p] != pk[i]]
            if self.current is not None and len(differing) * 4 <= len(points):
                return where
            new_pk = bytearray(self._pk)
            for i in differing:
                new_pk[where[i]] = pk[i]
            self._commit(Catalogue.build(self._points, bytes(new_pk)), self._points, position)
            return where
        if len(self._points) + len(missing) <= MAX_POINTS:
            try:
                return self._grow(
                    self._points, self._pk, position, missing=missing, points=points, pk=pk
                )
            except CatalogueTooLargeError:
                pass  # a consumer would refuse it: a new one from the batch's points
        return self._grow([], bytearray(), {}, missing=list(points), points=points, pk=pk)

    def _grow(
        self,
        old: list[tuple[str, str]],
        old_pk: bytearray,
        old_position: dict[tuple[str, str], int],
        *,
        missing: list[tuple[str, str]],
        points: Sequence[tuple[str, str]],
        pk: bytes,
    ) -> list[int]:
        """Make current the catalogue of `old` then `missing`, with the batch's `pk` for its
        `points`; their positions in it. CatalogueTooLargeError leaves everything as it was."""
        new_points, new_pk, position = list(old), bytearray(old_pk), dict(old_position)
        for point in missing:
            position[point] = len(new_points)
            new_points.append(point)
            new_pk.append(0)
        where = list(map(position.__getitem__, points))
        for i, p in enumerate(where):
            new_pk[p] = pk[i]
        self._commit(Catalogue.build(new_points, bytes(new_pk)), new_points, position)
        return where

    def _commit(
        self,
        catalogue: Catalogue,
        points: list[tuple[str, str]],
        position: dict[tuple[str, str], int],
    ) -> None:
        """Make `catalogue` (of `points`, at `position`) the current one."""
        self._points, self._position = points, position
        self._pk = bytearray(catalogue.pk)
        self.current = catalogue
        self.version += 1

    def digest(self) -> bytes:
        if self.current is None:
            raise LookupError("no point catalogue yet")
        return self.current.digest

    def pk(self) -> bytes:
        return bytes(self._pk)


def catalogue_topic(topic_prefix: str, gateway: str, digest: bytes) -> str:
    """`{topic_prefix}/{gateway}/catalogue/{digest as 32 lowercase hex digits}` (§4.12)."""
    return f"{topic_prefix}/{gateway}/{TOPIC_LEVEL}/{digest.hex()}"


def parse_catalogue_topic(topic: str) -> tuple[str, bytes] | None:
    """The gateway id and the digest a catalogue topic names, or None for any other topic."""
    levels = topic.split("/")
    if len(levels) < 3 or levels[-2] != TOPIC_LEVEL:
        return None
    text = levels[-1]
    if len(text) != 2 * DIGEST_BYTES or text != text.lower():
        return None
    try:
        digest = bytes.fromhex(text)
    except ValueError:
        return None
    return levels[-3], digest
