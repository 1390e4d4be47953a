"""The point catalogues a consumer has received, and the batches that wait for one (§4.12).

A format-2 batch may name its points by reference to a catalogue (seal/catalogue.py), sent
once, retained, on `{prefix}/{gateway}/catalogue/{digest}`. A consumer feeds every catalogue
message to a `CatalogueBook` whose `catalogues` mapping is its `Opener`'s: from then on the
Opener decodes the batches that reference it. A batch that arrives before its catalogue makes
`Opener.open` raise `CatalogueMissingError` (the signature already checked: authentic, not decodable
yet); the consumer parks it here and gets it back from `add` when the catalogue arrives. Order
does not matter to completeness (by seq), so a batch decoded late counts as if on time.

Both stores are in memory and bounded, as anyone allowed to publish on the topics can send
anything: parked batches by count and bytes, the book by bytes. Beyond a bound the message is
refused (EnvelopeError naming the bound), never kept and never a crash.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass

from edge_agent.errors import EnvelopeError
from edge_agent.seal.catalogue import Catalogue, parse_catalogue_topic

MAX_PARKED = 10_000
"""Batches parked at once, all catalogues together."""
MAX_PARKED_BYTES = 256 * 1024 * 1024
"""Bytes of parked batch messages at once."""
MAX_BOOK_BYTES = 256 * 1024 * 1024
"""Bytes of catalogue messages kept (a catalogue of the agent's 100,000 points is ~2 MB)."""


def is_catalogue_topic(topic: str) -> bool:
    """Whether `topic` is on a catalogue's level (`.../catalogue/{anything}`): such a message is
    given to `CatalogueBook.add`, which refuses it with a reason when the digest is not one."""
    return topic.rsplit("/", 2)[-2:-1] == ["catalogue"]


@dataclass(frozen=True)
class Parked:
    """A batch message waiting for its catalogue: the topic it came on and its bytes."""

    topic: str
    payload: bytes


class CatalogueBook:
    """Catalogues by digest, and the batch messages parked until theirs arrives."""

    def __init__(
        self,
        catalogues: MutableMapping[bytes, Catalogue] | None = None,
        *,
        max_parked: int = MAX_PARKED,
        max_parked_bytes: int = MAX_PARKED_BYTES,
        max_book_bytes: int = MAX_BOOK_BYTES,
    ) -> None:
        """`catalogues`: the mapping the Opener decodes with (`opener.catalogues`), filled here."""
        self.catalogues: MutableMapping[bytes, Catalogue] = {} if catalogues is None else catalogues
        self._max_parked = max_parked
        self._max_parked_bytes = max_parked_bytes
        self._max_book_bytes = max_book_bytes
        self._book_bytes = sum(len(c.payload) for c in self.catalogues.values())
        self._parked: dict[bytes, dict[bytes, str]] = {}
        """digest -> batch message -> its topic, in arrival order (a re-sent copy kept once)."""
        self._parked_bytes = 0
        self.parked = 0
        """Batch messages parked now."""

    def add(self, topic: str, payload: bytes) -> list[Parked]:
        """Keep the catalogue message `payload` that came on `topic`; return the batches it
        releases, in arrival order, for the consumer to open again.

        The digest in the topic must be that of the payload (`Catalogue.parse` checks it).
        A catalogue already held (a retained one received again) releases nothing, nor does
        an empty message: the broker forwards the deletion of a retained message to current
        subscribers as one, and it is neither a catalogue nor an attack. Raises EnvelopeError
        (CatalogueError for the payload) naming the topic and what is wrong.
        """
        if not payload:
            return []
        parsed = parse_catalogue_topic(topic)
        if parsed is None:
            raise EnvelopeError(
                f"catalogue refused on {topic}: the topic is not "
                "{prefix}/{gateway}/catalogue/{32 lowercase hex digits}"
            )
        digest = parsed[1]
        held = self.catalogues.get(digest)
        if held is not None and held.payload == payload:
            return []
        if self._book_bytes + len(payload) > self._max_book_bytes:
            raise EnvelopeError(
                f"catalogue refused on {topic}: the book of catalogues holds "
                f"{self._book_bytes} bytes, and {len(payload)} more would pass its bound of "
                f"{self._max_book_bytes}"
            )
        try:
            catalogue = Catalogue.parse(payload, digest)
        except EnvelopeError as exc:
            raise EnvelopeError(f"catalogue refused on {topic}: {exc}") from None
        self.catalogues[digest] = catalogue
        self._book_bytes += len(payload)
        waiting = self._parked.pop(digest, {})
        self.parked -= len(waiting)
        self._parked_bytes -= sum(len(p) for p in waiting)
        return [Parked(t, p) for p, t in waiting.items()]

    def park(self, topic: str, payload: bytes, digest: bytes) -> None:
        """Keep the batch message `payload` (from `topic`) until the catalogue `digest` arrives.

        Raises EnvelopeError when the parking is full (`max_parked` messages or
        `max_parked_bytes`): the batch is then refused, with the reason.
        """
        waiting = self._parked.setdefault(digest, {})
        if payload in waiting:
            return
        if self.parked >= self._max_parked or (
            self._parked_bytes + len(payload) > self._max_parked_bytes
        ):
            if not waiting:
                del self._parked[digest]
            raise EnvelopeError(
                f"batch on {topic} refused: it waits for catalogue {digest.hex()}, and "
                f"{self.parked} batches ({self._parked_bytes} bytes) already wait for "
                f"catalogues, the bound ({self._max_parked} batches, "
                f"{self._max_parked_bytes} bytes)"
            )
        waiting[payload] = topic
        self.parked += 1
        self._parked_bytes += len(payload)

    def pending(self) -> dict[bytes, list[str]]:
        """The catalogues still awaited: digest -> the topics of the batches waiting for it."""
        return {digest: list(waiting.values()) for digest, waiting in self._parked.items()}
