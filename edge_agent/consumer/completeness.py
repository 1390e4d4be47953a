"""The completeness rule of docs/contract.md §4, as a consumer checks it.

For each (gateway, epoch), the received `seq` values and every declared `evicted` range must
cover 1..max seq with no hole. Duplicates (at-least-once delivery) carry the same `seq` and are
dropped here. Evicted readings are counted by the reason declared with their range
(`evicted_reasons`: `retention`, `too_large`, `undeliverable`; `retention` when unsaid).

An epoch can also be declared ended (`previous_epoch` in the first batch of the next one): its
buffer was quarantined, went missing or was replaced, so whatever of it up to `last_seq` has not
arrived never will. Those readings are lost, explained by the declaration: `lost()` lists them
with the reason, and they are not holes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any

from edge_agent.seal.envelope import RETENTION


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
    """The batch numbers received (for the consumer acknowledgement's `batches`, §4.10)."""

    def held(self) -> list[list[int]]:
        """The seqs this consumer holds: received or declared evicted (§4.10 `seqs`)."""
        combined = Coverage(self.received.ranges())
        for first, last in self.evicted.ranges():
            combined.add(first, last)
        return combined.ranges()

    def holes(self) -> list[tuple[int, int]]:
        """Seq ranges neither received nor declared evicted nor lost with an ended epoch."""
        return [] if self.ended is not None else self._missing()

    def lost(self) -> list[tuple[int, int]]:
        """Seq ranges lost with the epoch's end (not received, not declared evicted)."""
        return self._missing() if self.ended is not None else []

    def _missing(self) -> list[tuple[int, int]]:
        combined = Coverage(self.received.ranges())
        for first, last in self.evicted.ranges():
            combined.add(first, last)
        return combined.holes(self.max_seq)

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
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Stream:
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
            # State files written before batch numbers were kept: none known.
            Coverage(data.get("batches") or []),
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
    ) -> list[dict[str, Any]]:
        """Account for one batch; `reasons` says why each `evicted` range was dropped; `batch`
        is its batch number, when known."""
        stream = self.streams.setdefault((gateway, epoch), Stream())
        for index, (first, last) in enumerate(evicted):
            count = sum(b - a + 1 for a, b in stream.evicted.add(first, last))
            reason = reasons[index] if reasons else RETENTION
            if count:
                stream.evicted_count += count
                stream.evicted_by_reason[reason] = stream.evicted_by_reason.get(reason, 0) + count
            stream.max_seq = max(stream.max_seq, last)
        fresh = readings
        if readings:
            first, last = readings[0]["seq"], readings[-1]["seq"]
            if last - first + 1 != len(readings):
                raise ValueError(f"batch seq {first}..{last} is not consecutive")
            new = stream.received.add(first, last)
            if new != [(first, last)]:
                fresh = [r for r in readings if any(a <= r["seq"] <= b for a, b in new)]
            stream.max_seq = max(stream.max_seq, last)
        stream.duplicates += len(readings) - len(fresh)
        stream.readings += len(fresh)
        if batch is not None:
            stream.batches.add(batch, batch)
        return fresh

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
        return {key: h for key, s in self.streams.items() if (h := s.holes())}

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
