"""Groups readings into batches, numbers them and seals them into the store.

Sources hand readings to `emit`, which waits when `capacity` readings are pending: back-pressure
instead of unbounded memory. A batch is sealed when it reaches `max_readings` or when its first
reading has waited `max_delay`; several ready batches go to the store in one transaction, up to
the store's MAX_TRANSACTION_BYTES.

A batch is also kept within `max_bytes` sealed bytes, the payload the link can carry (from
`mqtt.max_packet_size` or the broker's advertised limit, as the forwarder reports it): a batch
that would be larger holds fewer readings, so batches fit the link by construction. Only a
single reading larger than the limit makes a batch that does not fit; the forwarder then evicts
and declares it.

Point catalogues (docs/contract.md §4.12): a batch that references one is stored with it
(`SealedBatch.catalogue`, taken from the sealer right after the seal), and the store keeps it in
the transaction of the first such batch. At start the sealer resumes from the newest catalogue
the store holds, and a new sealer (a key rotation) from the current one, so that neither a
restart nor a rotation makes a new catalogue for the same points.

Readings a source could not hand over while the batcher was full never get a `seq`, so they
leave no hole to declare; the wait is made visible instead: one log line when sources start to
be held back and one when they are released, and `held_back_since` for health.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

import cbor2

from edge_agent.audit import audit
from edge_agent.clock import ClockWatch
from edge_agent.errors import StoreError
from edge_agent.metrics import Metrics
from edge_agent.reading import Reading, conforming, needs_check
from edge_agent.seal import hwm
from edge_agent.seal.catalogue import Catalogue, CatalogueError
from edge_agent.seal.envelope import Sealer
from edge_agent.store.sqlite import MAX_TRANSACTION_BYTES, SealedBatch, Store

log = logging.getLogger(__name__)

MAX_BATCHES_PER_TRANSACTION = 32
STORE_RETRY_S = 1.0
DECLARED_LOG_S = 10.0
"""Declarations in a row are logged once, then summed up at most this often."""
STOP_RETRIES = 5
"""Failed writes after which a stop gives up on unsealed readings rather than hang."""


class Batcher:
    def __init__(
        self,
        store: Store,
        sealer: Sealer,
        metrics: Metrics,
        *,
        gateway: str,
        max_readings: int,
        max_delay: float,
        capacity: int,
        max_bytes: int | None = None,
        clock: ClockWatch | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        """Each batch's `clock` map and its time on the age clock (None: neither, tests)."""
        self._sealer = sealer
        self._metrics = metrics
        self._gateway = gateway
        self._max_readings = max_readings
        self._max_delay = max_delay
        self._capacity = max(capacity, max_readings)
        self._pending: list[Reading] = []
        self._first_at: float | None = None
        self._arrived = asyncio.Event()
        self._full = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._declare: list[tuple[int, int, str]] = []
        self._redeclare = False
        self._previous: dict[str, Any] | None = None
        """The previous epoch's end, until a sealed batch carries it (Store.previous_epoch)."""
        self.max_bytes = max_bytes
        """Largest sealed batch in bytes (None: no limit); see `set_max_bytes`."""
        self._fit = max_readings
        """Readings that fitted in `max_bytes` last time: where the next batch starts trying."""
        self._stopping = False
        self._failed_writes = 0
        self._last_store_error: str | None = None
        self._refused: set[str] = set()
        """Points already logged by `_conforming`."""
        self._unlogged_declared: list[tuple[int, int, str]] = []
        self._next_declared_log = 0.0
        self._catalogue: Catalogue | None = None
        """The catalogue the last stored batch referencing one referenced (or the one resumed):
        what a new sealer resumes from."""
        self.sealed = asyncio.Event()
        """Set after every store write, for whoever waits for new batches (the forwarder)."""
        self.held_back_since: float | None = None
        """Monotonic time (time.monotonic) since which sources wait for room (the buffer is not
        taking readings): a step of the wall clock does not make them look held back."""
        self.taken = 0
        """Readings accepted from the sources since this start (`emit`)."""
        self.sealed_readings = 0
        """Readings sealed into the store since this start: equals `taken` after a clean stop."""

    async def emit(self, readings: Sequence[Reading]) -> None:
        """Accept readings from a source; waits while the batcher is `capacity` behind."""
        while len(self._pending) >= self._capacity:
            if self.held_back_since is None:
                self.held_back_since = time.monotonic()
                log.warning(
                    "Sources held back: the buffer is not taking readings pending=%d error=%s",
                    len(self._pending), self._last_store_error or "sealing is behind",
                )  # fmt: skip
            self._space.clear()
            await self._space.wait()
        if not self._pending:
            self._first_at = asyncio.get_running_loop().time()
            self._arrived.set()
        self._pending.extend(readings)
        self.taken += len(readings)
        self._metrics.readings_taken.inc(len(readings))
        if len(self._pending) >= self._max_readings:
            self._full.set()

    def set_max_bytes(self, limit: int | None) -> None:
        """Seal later batches within `limit` bytes (the forwarder learns the link's limit)."""
        if limit != self.max_bytes:
            log.info("Batches sealed within max_bytes=%s", limit)
            self.max_bytes = limit
            self._fit = self._max_readings

    def declare_pending(self) -> None:
        """The store has new pending evictions (the forwarder evicted a batch): declare them."""
        self._redeclare = True
        self._arrived.set()

    async def run(self) -> None:
        """Seal batches until `stop()`; then seal what is pending and return.

        Stopping is a flag, not a cancellation, so that the final seal cannot be interrupted.
        """
        self._declare = await self._store.pending_declarations()
        self._previous = await self._store.previous_epoch()
        await self._resume_catalogue()
        while not self._stopping:
            await self._wait_for_batch()
            await self.seal_pending()
        await self.seal_pending()
        self._log_declared(now=True)

    def high_water_mark(self) -> bytes:
        """The signed high-water mark (seal/hwm.py) of what the store holds committed now: its
        epoch, the highest seq and batch number sealed (0: none), signed with the current key.

        Read from the store's counters in memory (set at open, advanced at every commit): no
        query, and right after a restart too.
        """
        mark = hwm.HighWaterMark(
            gateway=self._gateway,
            epoch=self._store.epoch,
            seq=self._store.next_seq - 1,
            batch=self._store.next_batch - 1,
            sealed_ns=time.time_ns(),
        )
        return mark.seal(self._sealer.signer)

    @property
    def sealer(self) -> Sealer:
        """The sealer that signs the next batch."""
        return self._sealer

    def use_sealer(self, sealer: Sealer) -> None:
        """Sign every batch sealed from now on with `sealer` (a key rotation, at a reload).

        Takes effect at the next batch: batches already sealed keep their signature and are
        sent as they are, so consumers must trust both keys while the backlog drains
        (docs/security.md). Safe to call from any task of the event loop, at any time. The new
        sealer resumes from the current point catalogue (same points: no new catalogue).
        """
        if self._catalogue is not None:
            sealer.resume_catalogue(self._catalogue)
        self._sealer = sealer

    async def _resume_catalogue(self) -> None:
        """Let the sealer reference the store's newest point catalogue (invariant 6 of
        store/sqlite.py) rather than make a new one for the same points. A catalogue the store
        holds but that does not parse is logged and left: the sealer makes a new one."""
        found = await self._store.newest_catalogue()
        if found is None:
            return
        digest, payload = found
        try:
            catalogue = Catalogue.parse(payload, digest)
        except CatalogueError as exc:
            log.warning("The buffer's newest point catalogue is unusable; a new one is made"
                        " digest=%s error=%s", digest.hex(), exc)  # fmt: skip
            return
        self._catalogue = catalogue
        self._sealer.resume_catalogue(catalogue)
        log.info("Resumed the point catalogue digest=%s points=%d", digest.hex(),
                 len(catalogue.points))  # fmt: skip

    def stop(self) -> None:
        """Ask `run` to seal what is pending and return; sources must be stopped first."""
        self._stopping = True
        self._arrived.set()
        self._full.set()

    async def _wait_for_batch(self) -> None:
        if self._declare or self._redeclare or self._previous or self._stopping:
            return
        await self._arrived.wait()
        if self._stopping or self._first_at is None:
            return
        timeout = self._first_at + self._max_delay - asyncio.get_running_loop().time()
        if timeout > 0 and len(self._pending) < self._max_readings:
            self._full.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._full.wait(), timeout)

    async def seal_pending(self) -> None:
        """Seal and store everything pending, retrying on store errors; readings are kept."""
        if self._redeclare:
            self._redeclare = False
            try:
                self._declare = await self._store.pending_declarations()
            except StoreError as exc:
                self._redeclare = True  # the next round tries again
                log.debug("Could not read pending evictions error=%s", exc)
        while self._pending or self._declare or self._previous:
            count = min(len(self._pending), self._max_readings * MAX_BATCHES_PER_TRANSACTION)
            batches = await self._seal(self._pending[:count])
            count = sum(b.readings for b in batches)
            try:
                evicted = await self._store.append(batches)
            except StoreError as exc:
                self._metrics.store_errors.inc()
                if self._stopping and self._failed_writes >= STOP_RETRIES:
                    log.error("Stopping with readings that could not be sealed count=%d error=%s",
                              len(self._pending), exc)  # fmt: skip
                    return
                if not await self._recover(exc):
                    await asyncio.sleep(STORE_RETRY_S)
                continue
            if self._failed_writes:
                log.info("Buffer writable again after failed_attempts=%d", self._failed_writes)
                self._failed_writes, self._last_store_error = 0, None
            del self._pending[:count]
            self._after_store(batches)
            if evicted:
                self._metrics.readings_evicted.inc(evicted)
                self._declare = await self._store.pending_declarations()
                reason = "disk full" if self._store.disk_full else "retention"
                audit("eviction", "success", readings=evicted, reason=reason,
                      epoch=self._store.epoch)  # fmt: skip

    async def _seal(self, readings: list[Reading]) -> list[SealedBatch]:
        """Seal `readings` into batches, numbered from the store's counters.

        Sealing a batch of 1,000 readings takes about a millisecond of CPU; a transaction holds
        up to MAX_BATCHES_PER_TRANSACTION of them, so the loop is given back between batches
        (sources keep their schedule, PUBACKs are handled). Only this task changes the counters
        and `_declare`, so they cannot move meanwhile.

        Pending evictions (and the previous epoch's end, in the first) are declared in batches
        of their own, without readings, ahead of the readings: declarations are sent first and
        never evicted, so they must stay small. Sealing readings stops once the batches reach
        MAX_TRANSACTION_BYTES (the store's bound for one transaction); the caller stores the
        readings they hold and seals the rest next.

        `sealed` in the payload is the wall clock as read; the store keeps each batch's time on
        the age clock (`ClockWatch.age_ns`), which measures `store.max_age` whatever the wall
        clock does. The `clock` map is the same for the batches of one call.
        """
        clock = self._clock
        sealed_ns = time.time_ns() if clock is None else clock.wall_ns()
        stored_ns = sealed_ns if clock is None else clock.age_ns()
        sealer = self._sealer  # `use_sealer` may swap it while this yields
        seal = functools.partial(
            sealer.seal, gateway=self._gateway, epoch=self._store.epoch, sealed_ns=sealed_ns,
            clock=None if clock is None else clock.state(),
        )  # fmt: skip
        batch_no, seq = self._store.next_batch, self._store.next_seq
        batches: list[SealedBatch] = []
        runs = _merged(self._declare)
        previous = self._previous
        while runs or previous:
            count, data = self._declaration_within(seal, batch_no, seq, runs, previous)
            declares = tuple(pair for run in runs[:count] for pair in run[3])
            batches.append(
                SealedBatch(batch_no, seq, 0, stored_ns, data, declares, previous is not None)
            )
            batch_no, runs, previous = batch_no + 1, runs[count:], None
        size = sum(len(b.data) for b in batches)
        stored = {self._catalogue.digest} if self._catalogue is not None else set()
        start = 0
        while start < len(readings) and size < MAX_TRANSACTION_BYTES:
            if batches:
                await asyncio.sleep(0)
            count, data = self._seal_within(seal, batch_no, seq, readings, start)
            catalogue = sealer.catalogue  # the one this batch references, if any
            batches.append(SealedBatch(batch_no, seq, count, stored_ns, data, catalogue=catalogue))
            batch_no, seq, start = batch_no + 1, seq + count, start + count
            size += len(data)
            if catalogue is not None and catalogue.digest not in stored:
                stored.add(catalogue.digest)  # a new one is written with the batch
                size += len(catalogue.payload)
        return batches

    def _declaration_within(
        self, seal: Callable[..., bytes], batch_no: int, seq: int, runs: list[_Run],
        previous: dict[str, Any] | None,
    ) -> tuple[int, bytes]:  # fmt: skip
        """Seal as many of `runs` as fit `max_bytes` in one declaration, with `previous` (the
        previous epoch's end) if given: (how many runs, bytes)."""
        count = len(runs)
        while True:
            part = runs[:count]
            evicted, reasons = [(r[0], r[1]) for r in part], [r[2] for r in part]
            data = seal(batch=batch_no, first_seq=seq, readings=[], evicted=evicted,
                        reasons=reasons, previous_epoch=previous)  # fmt: skip
            if self._fits(data) or count <= 1:
                return count, data
            count = max(1, count // 2)

    def _fits(self, data: bytes) -> bool:
        return self.max_bytes is None or len(data) <= self.max_bytes

    def _seal_within(
        self, seal: Callable[..., bytes], batch_no: int, seq: int, readings: list[Reading],
        start: int,
    ) -> tuple[int, bytes]:  # fmt: skip
        """Seal as many of `readings[start:]` as fit `max_bytes`: (how many, sealed bytes).

        Values the rules refuse are made bad first (`_conforming`), in `readings` itself, so a
        batch sealed again is not checked again. Too large, the batch is sealed again with
        proportionally fewer readings; `_fit` remembers the count, so a binding limit costs
        about one extra seal per batch.
        """
        count = min(len(readings) - start, self._max_readings, self._fit)
        while True:
            chunk = readings[start : start + count]
            if needs_check(chunk):
                readings[start : start + count] = chunk = self._conforming(chunk)
            try:
                data = seal(batch=batch_no, first_seq=seq, readings=chunk)
            except (TypeError, ValueError, cbor2.CBOREncodeError):  # text CBOR cannot carry
                readings[start : start + count] = chunk = self._conforming(chunk)
                data = seal(batch=batch_no, first_seq=seq, readings=chunk)
            limit = self.max_bytes
            if limit is None or len(data) <= limit or count == 1:
                break
            count = max(1, min(count - 1, count * limit * 9 // (len(data) * 10)))
            self._fit = count
        if not self._fits(data):
            log.warning(
                "A reading is larger than a batch may be; sealed alone, it will be evicted and"
                " declared seq=%d point=%s.%s bytes=%d max_bytes=%s",
                seq, chunk[0].src, chunk[0].pt, len(data), self.max_bytes,
            )  # fmt: skip
        elif self.max_bytes is not None and len(data) * 2 < self.max_bytes:
            self._fit = min(self._max_readings, max(self._fit, count * 2))
        return count, data

    def _after_store(self, batches: list[SealedBatch]) -> None:
        for batch in batches:
            if batch.catalogue is not None:
                self._catalogue = cast("Catalogue", batch.catalogue)
        count = sum(b.readings for b in batches)
        self.sealed_readings += count
        self._metrics.readings_sealed.inc(count)
        self._metrics.batches_sealed.inc(len(batches))
        if any(b.declares for b in batches):
            self._unlogged_declared.extend(self._declare)
            self._declare = []
        self._log_declared()
        if any(b.ends_previous for b in batches) and self._previous is not None:
            log.info(
                "Declared the end of the previous epoch epoch=%s last_seq=%s ended=%s",
                self._previous.get("epoch"), self._previous.get("last_seq"),
                self._previous.get("ended"),
            )  # fmt: skip
            self._previous = None
        if not self._pending:
            self._arrived.clear()
            self._first_at = None
        else:
            self._first_at = asyncio.get_running_loop().time()
        self._space.set()
        if self.held_back_since is not None and len(self._pending) < self._capacity:
            held_back_s = time.monotonic() - self.held_back_since
            log.info("Sources released after held_back_s=%.1f", held_back_s)
            self.held_back_since = None
        self.sealed.set()

    def _log_declared(self, *, now: bool = False) -> None:
        """One line per declaration, summed up while they follow each other (a full disk)."""
        if not self._unlogged_declared or (not now and time.monotonic() < self._next_declared_log):
            return
        self._next_declared_log = time.monotonic() + DECLARED_LOG_S
        merged = _merged_ranges(self._unlogged_declared)
        self._unlogged_declared = []
        log.info(
            "Declared evicted readings ranges=%s%s count=%d",
            [list(r) for r in merged[:5]], " ..." if len(merged) > 5 else "",
            sum(last - first + 1 for first, last, _ in merged),
        )  # fmt: skip

    def _conforming(self, readings: list[Reading]) -> list[Reading]:
        """A value the rules refuse (a source bug) becomes a `bad` reading, never a crash.

        Sources apply edge_agent.reading themselves; this is the last check before signing, so
        that no NaN, infinity or unencodable text is ever sealed as a value. Logged once per
        point (a source bug to report, not a device state to follow).
        """
        fixed, changed = conforming(readings)
        for reading, reason in changed:
            point = f"{reading.src}.{reading.pt}"
            if point not in self._refused:
                self._refused.add(point)
                log.error("Reading refused by the value rules, sealed as bad point=%s error=%s",
                          point, reason)  # fmt: skip
        return fixed

    async def _recover(self, exc: StoreError) -> bool:
        """A failed write: make room if the disk is full; True to retry at once.

        The store already evicted what the free pages needed to hold the batches; failing that,
        the oldest share goes here (the store logs it). Readings stay pending meanwhile; when
        `capacity` is reached, sources are held back. Without progress, the caller waits a
        moment before retrying.
        """
        self._failed_writes += 1
        if str(exc) != self._last_store_error:
            self._last_store_error = str(exc)
            log.error("Could not store batch, will retry error=%s", exc)
        evicted = 0
        try:
            if exc.disk_full:
                evicted = await self._store.evict_oldest()
                if evicted:
                    self._metrics.readings_evicted.inc(evicted)
                    audit("eviction", "success", readings=evicted, reason="disk full",
                          epoch=self._store.epoch)  # fmt: skip
            self._declare = await self._store.pending_declarations()
        except StoreError as again:
            log.debug("Could not make room in the buffer error=%s", again)
        return evicted > 0


_Run = tuple[int, int, str, list[tuple[int, int]]]
"""Declared ranges merged: first seq, last seq, reason, and the pending pairs it covers."""


def _merged(pending: Sequence[tuple[int, int, str]]) -> list[_Run]:
    """Adjacent ranges with one reason as one: `(first, last, reason, the pending pairs)`.

    Retention evicts oldest first, so its ranges usually touch: a thousand evicted batches are
    declared as one range, not a thousand. The pairs are what the store clears once declared.
    """
    runs: list[_Run] = []
    for first, last, reason in sorted(pending):
        if runs and runs[-1][1] + 1 == first and runs[-1][2] == reason:
            head, _, _, pairs = runs[-1]
            runs[-1] = (head, last, reason, [*pairs, (first, last)])
        else:
            runs.append((first, last, reason, [(first, last)]))
    return runs


def _merged_ranges(pending: Sequence[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    return [(first, last, reason) for first, last, reason, _ in _merged(pending)]
