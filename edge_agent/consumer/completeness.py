"""The completeness rule of docs/contract.md §4, as a consumer checks it.

For each (gateway, epoch), the received `seq` values and every declared `evicted` range must
cover 1..max seq with no hole. Duplicates (at-least-once delivery) carry the same `seq` and are
dropped here. Evicted readings are counted by the reason declared with their range
(`evicted_reasons`: `retention`, `too_large`, `undeliverable`; `retention` when unsaid).

An epoch can also be declared ended (`previous_epoch` in the first batch of the next one): its
buffer was quarantined, went missing or was replaced, so whatever of it up to `last_seq` has not
arrived never will. Those readings are lost, explained by the declaration: `lost()` lists them
with the reason, and they are not holes.

The signed high-water mark (seal/hwm.py, contract §4.11) says how far the gateway has sealed.
The tail `(max seq, high water]` is *pending* (sealed, not yet received), not a hole, while the
epoch is alive; once a later epoch of the same gateway is seen (its first `sealed` time after
this epoch's last) without a `previous_epoch` declaration, the tail is a hole; with one, the
mark raises the epoch's max seq and the LOST rule applies.

Batch numbers received are kept per epoch as ranges (`Stream.batches`); their gaps are counted
but are not holes by themselves (an evicted batch's number is never seen; its readings are
declared). A seq received twice is a duplicate when the batch is the same (same seq range, same
batch number, same content: the verifier digests the signed payload, so a byte-identical
re-send), and a CONFLICT otherwise: the producer seals every seq once, in one batch, and
re-sends it byte for byte. To judge that, each stream keeps a 16-byte digest of its last
MAX_DIGESTS batches with readings (by first seq): memory per (gateway, epoch) is bounded by
that, about 0.25 MB, whatever the run's length; a seq received again whose batch is older than
that window is counted as a duplicate, and as `unchecked`.
"""

from __future__ import annotations

import bisect
import hashlib
from dataclasses import dataclass, field
from typing import Any

import cbor2

from edge_agent.seal.envelope import RETENTION

MAX_DIGESTS = 1024
"""Batches per (gateway, epoch) whose readings' digest is kept to tell a re-send (a duplicate)
from a different reading under the same seq (a CONFLICT). Re-sends come from the publish window
(at most `mqtt.max_inflight` batches) and from the backlog after an outage, oldest first."""


class Coverage:
    """A set of integers kept as sorted, disjoint, non-adjacent closed ranges."""

    def __init__(self, ranges: list[list[int]] | None = None) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for first, last in ranges or []:
            self.add(first, last)

    def add(self, first: int, last: int) -> list[tuple[int, int]]:
        """Cover first..last; return the parts that were not covered before."""
        if last < first:
            return []
        new: list[tuple[int, int]] = []
        i = bisect.bisect_left(self._ends, first - 1)
        cursor = first
        j = i
        while j < len(self._starts) and self._starts[j] <= last + 1:
            if self._starts[j] > cursor:
                new.append((cursor, min(last, self._starts[j] - 1)))
            cursor = max(cursor, self._ends[j] + 1)
            j += 1
        if cursor <= last:
            new.append((cursor, last))
        if j > i:
            first, last = min(first, self._starts[i]), max(last, self._ends[j - 1])
        self._starts[i:j] = [first]
        self._ends[i:j] = [last]
        return new

    def holes(self, upto: int) -> list[tuple[int, int]]:
        """The ranges in 1..upto that are not covered."""
        found: list[tuple[int, int]] = []
        cursor = 1
        for start, end in zip(self._starts, self._ends, strict=True):
            if start > upto:
                break
            if start > cursor:
                found.append((cursor, start - 1))
            cursor = max(cursor, end + 1)
        if cursor <= upto:
            found.append((cursor, upto))
        return found

    def ranges(self) -> list[list[int]]:
        return [[a, b] for a, b in zip(self._starts, self._ends, strict=True)]

    def count(self) -> int:
        """How many integers are covered."""
        return sum(b - a + 1 for a, b in zip(self._starts, self._ends, strict=True))

    def highest(self) -> int:
        """The highest integer covered, 0 when none."""
        return self._ends[-1] if self._ends else 0


def readings_digest(readings: list[dict[str, Any]]) -> bytes:
    """16 bytes that differ when any reading of a batch differs (canonical CBOR, BLAKE2b)."""
    return hashlib.blake2b(cbor2.dumps(readings, canonical=True), digest_size=16).digest()


class Digests:
    """The digest of the readings of the last MAX_DIGESTS batches of a stream, by seq range.

    `floor` is the highest seq whose batch's digest was dropped to keep the bound: a seq at or
    below it received again cannot be judged.
    """

    def __init__(self, entries: list[list[Any]] | None = None, floor: int = 0) -> None:
        self._starts: list[int] = []
        self._entries: dict[int, tuple[int, int | None, bytes]] = {}
        self.floor = floor
        for first, last, batch, digest in entries or []:
            self.add(first, last, batch, bytes.fromhex(digest))

    def add(self, first: int, last: int, batch: int | None, digest: bytes) -> None:
        """Remember batch `batch` (None: unknown) held seqs first..last with `digest` (not when
        a batch starting at `first` is kept already, or the range is below the window)."""
        if first in self._entries or last <= self.floor:
            return
        bisect.insort(self._starts, first)
        self._entries[first] = (last, batch, digest)
        while len(self._starts) > MAX_DIGESTS:
            oldest = self._starts.pop(0)
            self.floor = max(self.floor, self._entries.pop(oldest)[0])

    def judge(self, first: int, last: int, batch: int | None, digest: bytes) -> str | None:
        """Why seqs first..last (received before) sealed again this way are a CONFLICT, or None
        when they are the batch received before (or no digest of it is kept: see `floor`)."""
        index = bisect.bisect_right(self._starts, last) - 1
        while index >= 0:
            start = self._starts[index]
            end, seen_batch, seen_digest = self._entries[start]
            if end < first:
                break
            if (start, end) != (first, last):
                return f"seq {first}..{last} overlaps batch {seen_batch} seq {start}..{end}"
            if seen_digest != digest:
                return f"seq {first}..{last}: other content than batch {seen_batch} had"
            if None not in (batch, seen_batch) and batch != seen_batch:
                return f"seq {first}..{last} sealed as batch {batch}, before as batch {seen_batch}"
            index -= 1
        return None

    def covers(self, first: int, last: int) -> bool:
        """True when a kept digest's range overlaps first..last."""
        index = bisect.bisect_right(self._starts, last) - 1
        return index >= 0 and self._entries[self._starts[index]][0] >= first

    def to_json(self) -> list[list[Any]]:
        return [
            [first, last, batch, digest.hex()]
            for first, (last, batch, digest) in ((f, self._entries[f]) for f in self._starts)
        ]


@dataclass
class Stream:
    """What one consumer knows of one (gateway, epoch)."""

    received: Coverage = field(default_factory=Coverage)
    evicted: Coverage = field(default_factory=Coverage)
    max_seq: int = 0
    readings: int = 0
    duplicates: int = 0
    evicted_count: int = 0
    evicted_by_reason: dict[str, int] = field(default_factory=dict)
    ended: str | None = None
    """Why the gateway declared this epoch ended (`previous_epoch`), or None."""
    batches: Coverage = field(default_factory=Coverage)
    """Batch numbers received (with readings or declarations), as ranges: BATCHES gaps, and the
    consumer acknowledgement's `batches` (§4.10)."""
    hwm_seq: int = 0
    """The highest seq a verified high-water mark of this epoch said was sealed."""
    hwm_batch: int = 0
    """The highest batch number a verified high-water mark said was sealed."""
    hwm_sealed: int = 0
    """`sealed` (Unix ns) of the newest verified mark; 0 when none came."""
    first_sealed: int | None = None
    """Earliest `sealed` (Unix ns) of a batch or mark of this epoch: when it is known to start."""
    last_sealed: int | None = None
    """Latest `sealed` of a batch or mark of this epoch: when it is known to be alive."""
    digests: Digests = field(default_factory=Digests)
    conflicts: int = 0
    """Readings whose seq was received before in another batch or with other content."""
    first_conflict: str | None = None
    unchecked: int = 0
    """Duplicates of batches older than the digest window: counted as duplicates, not judged."""

    def held(self) -> list[list[int]]:
        """The seqs this consumer holds: received or declared evicted (§4.10 `seqs`)."""
        return self._accounted().ranges()

    def saw(self, sealed_ns: int) -> None:
        """Something of this epoch was sealed at `sealed_ns`."""
        if self.first_sealed is None or sealed_ns < self.first_sealed:
            self.first_sealed = sealed_ns
        if self.last_sealed is None or sealed_ns > self.last_sealed:
            self.last_sealed = sealed_ns

    def holes(self, *, superseded: bool = False) -> list[tuple[int, int]]:
        """Seq ranges neither received nor declared evicted nor lost with an ended epoch; with
        `superseded` (a later epoch began undeclared), the pending tail too."""
        if self.ended is not None:
            return []
        missing = self._missing(self.max_seq)
        tail = self.tail()
        return [*missing, tail] if superseded and tail is not None else missing

    def lost(self) -> list[tuple[int, int]]:
        """Seq ranges lost with the epoch's end (not received, not declared evicted), up to the
        higher of its max seq and its high-water mark."""
        if self.ended is None:
            return []
        return self._missing(max(self.max_seq, self.hwm_seq))

    def tail(self) -> tuple[int, int] | None:
        """`(max seq, high water]` as a range: sealed (the mark says) and not received."""
        return (self.max_seq + 1, self.hwm_seq) if self.hwm_seq > self.max_seq else None

    def pending(self, *, superseded: bool = False) -> tuple[int, int] | None:
        """The tail while the epoch is alive (not declared ended, not superseded)."""
        return None if self.ended is not None or superseded else self.tail()

    def batch_gaps(self) -> list[tuple[int, int]]:
        """Batch numbers below the highest received that were not received."""
        return self.batches.holes(self.batches.highest())

    def _missing(self, upto: int) -> list[tuple[int, int]]:
        return self._accounted().holes(upto)

    def _accounted(self) -> Coverage:
        """The seqs received or declared evicted."""
        combined = Coverage(self.received.ranges())
        for first, last in self.evicted.ranges():
            combined.add(first, last)
        return combined

    def to_json(self) -> dict[str, Any]:
        return {
            "received": self.received.ranges(),
            "evicted": self.evicted.ranges(),
            "max_seq": self.max_seq,
            "readings": self.readings,
            "duplicates": self.duplicates,
            "evicted_count": self.evicted_count,
            "evicted_by_reason": self.evicted_by_reason,
            "ended": self.ended,
            "batches": self.batches.ranges(),
            "hwm": [self.hwm_seq, self.hwm_batch, self.hwm_sealed],
            "sealed": [self.first_sealed, self.last_sealed],
            "digests": self.digests.to_json(),
            "digest_floor": self.digests.floor,
            "conflicts": self.conflicts,
            "first_conflict": self.first_conflict,
            "unchecked": self.unchecked,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stream:
        """A stream as `to_json` wrote it; state files of earlier versions load too (what they
        did not keep starts empty)."""
        hwm_seq, hwm_batch, hwm_sealed = data.get("hwm", [0, 0, 0])
        first_sealed, last_sealed = data.get("sealed", [None, None])
        return cls(
            Coverage(data["received"]),
            Coverage(data["evicted"]),
            data["max_seq"],
            data["readings"],
            data["duplicates"],
            data["evicted_count"],
            # State files written before reasons were declared: all of it was retention.
            data.get("evicted_by_reason")
            or ({RETENTION: data["evicted_count"]} if data["evicted_count"] else {}),
            data.get("ended"),
            Coverage(data.get("batches", [])),
            hwm_seq,
            hwm_batch,
            hwm_sealed,
            first_sealed,
            last_sealed,
            Digests(data.get("digests", []), data.get("digest_floor", 0)),
            data.get("conflicts", 0),
            data.get("first_conflict"),
            data.get("unchecked", 0),
        )


class Completeness:
    """Tracks every (gateway, epoch) seen; `accept` returns the readings not seen before."""

    def __init__(self) -> None:
        self.streams: dict[tuple[str, str], Stream] = {}
        self.unknown_ends: list[tuple[str, str]] = []
        """(gateway, reason) of ended epochs whose id the gateway no longer knew."""

    def accept(
        self,
        gateway: str,
        epoch: str,
        readings: list[dict[str, Any]],
        evicted: list[tuple[int, int]],
        reasons: list[str] | None = None,
        *,
        batch: int | None = None,
        sealed_ns: int | None = None,
        digest: bytes | None = None,
    ) -> list[dict[str, Any]]:
        """Account for one batch; `reasons` says why each `evicted` range was dropped.

        `batch` (its number) and `sealed_ns` (its `sealed`) are recorded when given; `digest`
        identifies the batch's content (`Batch.digest`, of its signed payload; when None, one is
        made of the readings). Returns the readings whose seq was not received before; those
        that were are counted as duplicates, or as conflicts when the batch is not the one
        received before (see the module doc).
        """
        stream = self.streams.setdefault((gateway, epoch), Stream())
        for index, (first, last) in enumerate(evicted):
            count = sum(b - a + 1 for a, b in stream.evicted.add(first, last))
            reason = reasons[index] if reasons else RETENTION
            if count:
                stream.evicted_count += count
                stream.evicted_by_reason[reason] = stream.evicted_by_reason.get(reason, 0) + count
            stream.max_seq = max(stream.max_seq, last)
        fresh, conflicting = readings, 0
        if readings:
            first, last = readings[0]["seq"], readings[-1]["seq"]
            if last - first + 1 != len(readings):
                raise ValueError(f"batch seq {first}..{last} is not consecutive")
            digest = digest or readings_digest(readings)
            new = stream.received.add(first, last)
            if new == [(first, last)]:
                stream.digests.add(first, last, batch, digest)
            else:
                fresh = [r for r in readings if any(a <= r["seq"] <= b for a, b in new)]
                again = len(readings) - len(fresh)
                conflict = stream.digests.judge(first, last, batch, digest)
                if conflict is not None:
                    conflicting = again
                    stream.conflicts += again
                    if stream.first_conflict is None:
                        stream.first_conflict = f"gateway={gateway} epoch={epoch} {conflict}"
                elif not stream.digests.covers(first, last):
                    stream.unchecked += again
                stream.digests.add(first, last, batch, digest)  # a re-send of it is judged too
            stream.max_seq = max(stream.max_seq, last)
        stream.duplicates += len(readings) - len(fresh) - conflicting
        stream.readings += len(fresh)
        if batch is not None:
            stream.batches.add(batch, batch)
        if sealed_ns is not None:
            stream.saw(sealed_ns)
        return fresh

    def mark(self, gateway: str, epoch: str, seq: int, batch: int, sealed_ns: int) -> None:
        """A verified high-water mark: `epoch` had sealed up to `seq` and `batch` at
        `sealed_ns`. Marks only raise what is known (an older one, replayed, changes nothing)."""
        stream = self.streams.setdefault((gateway, epoch), Stream())
        stream.hwm_seq = max(stream.hwm_seq, seq)
        stream.hwm_batch = max(stream.hwm_batch, batch)
        stream.hwm_sealed = max(stream.hwm_sealed, sealed_ns)
        stream.saw(sealed_ns)

    def superseded(self, gateway: str, epoch: str) -> str | None:
        """A later epoch of `gateway`: one whose first `sealed` is after everything known of
        `epoch` (its batches and marks), so `epoch` has ended; None while it may be alive."""
        stream = self.streams.get((gateway, epoch))
        if stream is None or stream.last_sealed is None:
            return None
        for (other_gateway, other), later in self.streams.items():
            if (
                other_gateway == gateway
                and other != epoch
                and later.first_sealed is not None
                and later.first_sealed > stream.last_sealed
            ):
                return other
        return None

    def pending(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Per alive (gateway, epoch): the seq range sealed (its mark says) but not received."""
        return {
            key: tail
            for key, s in self.streams.items()
            if (tail := s.pending(superseded=self.superseded(*key) is not None))
        }

    def conflicts(self) -> int:
        """Readings received under a seq that an earlier, different batch held."""
        return sum(s.conflicts for s in self.streams.values())

    def end_epoch(self, gateway: str, epoch: str | None, last_seq: int | None, reason: str) -> None:
        """The gateway declared `epoch` ended at `last_seq` (None: unknown) for `reason`.

        Everything of it up to `last_seq` not received by now is lost, not a hole; with no
        `last_seq`, what followed the highest seq received cannot be counted.
        """
        if epoch is None:
            if (gateway, reason) not in self.unknown_ends:
                self.unknown_ends.append((gateway, reason))
            return
        stream = self.streams.setdefault((gateway, epoch), Stream())
        stream.ended = reason
        if last_seq is not None:
            stream.max_seq = max(stream.max_seq, last_seq)

    def lost(self) -> dict[tuple[str, str], list[tuple[int, int]]]:
        """Per ended (gateway, epoch): the seq ranges lost with it."""
        return {key: lost for key, s in self.streams.items() if (lost := s.lost())}

    def holes(self) -> dict[tuple[str, str], list[tuple[int, int]]]:
        """Per (gateway, epoch): seq ranges missing that nothing explains (an epoch superseded
        without a declaration: its pending tail too)."""
        return {
            key: h
            for key, s in self.streams.items()
            if (h := s.holes(superseded=self.superseded(*key) is not None))
        }

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {f"{g}\n{e}": s.to_json() for (g, e), s in self.streams.items()}
        if self.unknown_ends:
            data["unknown_ends"] = [list(end) for end in self.unknown_ends]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Completeness:
        tracker = cls()
        for key, value in data.items():
            if key == "unknown_ends":  # no stream key: those have a newline
                tracker.unknown_ends = [(g, reason) for g, reason in value]
                continue
            gateway, epoch = key.split("\n", 1)
            tracker.streams[(gateway, epoch)] = Stream.from_json(value)
        return tracker
