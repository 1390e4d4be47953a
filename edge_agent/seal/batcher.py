"""Groups readings into batches, numbers them and seals them into the store.

Sources hand readings to `emit`, which waits when `capacity` readings are pending: back-pressure
instead of unbounded memory. A batch is sealed when it reaches `max_readings` or when its first
reading has waited `max_delay`; several ready batches go to the store in one transaction, up to
the store's MAX_TRANSACTION_BYTES.

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
from collections.abc import Sequence
from typing import Any

import cbor2

from edge_agent.errors import StoreError
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.envelope import Sealer
from edge_agent.store.sqlite import MAX_TRANSACTION_BYTES, SealedBatch, Store

log = logging.getLogger(__name__)

MAX_BATCHES_PER_TRANSACTION = 32
STORE_RETRY_S = 1.0
DECLARED_LOG_S = 10.0
"""Declarations in a row are logged once, then summed up at most this often."""
STOP_RETRIES = 5
"""Failed writes after which a stop gives up on unsealed readings rather than hang."""
ENCODABLE = (bool, int, float, str, type(None))


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
    ) -> None:
        self._store = store
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
        self._declare: list[tuple[int, int]] = []
        self._previous: dict[str, Any] | None = None
        self._stopping = False
        self._failed_writes = 0
        self._last_store_error: str | None = None
        self._unlogged_declared: list[tuple[int, int]] = []
        self._next_declared_log = 0.0
        self.sealed = asyncio.Event()
        """Set after every store write, for whoever waits for new batches (the forwarder)."""
        self.held_back_since: float | None = None
        """Wall time since which sources wait for room (the buffer is not taking readings)."""

    async def emit(self, readings: Sequence[Reading]) -> None:
        """Accept readings from a source; waits while the batcher is `capacity` behind."""
        while len(self._pending) >= self._capacity:
            if self.held_back_since is None:
                self.held_back_since = time.time()
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
        if len(self._pending) >= self._max_readings:
            self._full.set()

    async def run(self) -> None:
        """Seal batches until `stop()`; then seal what is pending and return.

        Stopping is a flag, not a cancellation, so that the final seal cannot be interrupted.
        """
        self._declare = await self._store.pending_evictions()
        self._previous = await self._store.previous_epoch()
        while not self._stopping:
            await self._wait_for_batch()
            await self.seal_pending()
        await self.seal_pending()
        self._log_declared(now=True)

    def stop(self) -> None:
        """Ask `run` to seal what is pending and return; sources must be stopped first."""
        self._stopping = True
        self._arrived.set()
        self._full.set()

    async def _wait_for_batch(self) -> None:
        if self._declare or self._previous or self._stopping:
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
                self._declare = await self._store.pending_evictions()

    async def _seal(self, readings: list[Reading]) -> list[SealedBatch]:
        """Seal `readings` into batches, numbered from the store's counters.

        Sealing a batch of 1,000 readings takes about a millisecond of CPU; a transaction holds
        up to MAX_BATCHES_PER_TRANSACTION of them, so the loop is given back between batches
        (sources keep their schedule, PUBACKs are handled). Only this task changes the counters
        and `_declare`, so they cannot move meanwhile.

        Pending evictions (and the previous epoch's end) are declared in a batch of their own,
        without readings: declarations are sent first and never evicted, so they must stay small.
        Sealing stops once the batches reach MAX_TRANSACTION_BYTES (the store's bound for one
        transaction); the caller stores the readings they hold and seals the rest next.
        """
        sealed_ns = time.time_ns()
        batch_no, seq = self._store.next_batch, self._store.next_seq
        batches: list[SealedBatch] = []
        declare = tuple(self._declare)
        previous = self._previous
        chunks = [readings[i : i + self._max_readings]
                  for i in range(0, len(readings), self._max_readings)]  # fmt: skip
        if declare or previous:
            chunks.insert(0, [])
        size = 0
        for chunk in chunks:
            if size >= MAX_TRANSACTION_BYTES:
                break
            if batches:
                await asyncio.sleep(0)
            seal = functools.partial(
                self._sealer.seal,
                gateway=self._gateway,
                epoch=self._store.epoch,
                batch=batch_no,
                first_seq=seq,
                sealed_ns=sealed_ns,
                evicted=declare,
                previous_epoch=previous,
            )
            try:
                data = seal(readings=chunk)
            except (TypeError, ValueError, cbor2.CBOREncodeError) as exc:
                data = seal(readings=self._encodable(chunk, exc))
            batches.append(
                SealedBatch(batch_no, seq, len(chunk), sealed_ns, data, declare, bool(previous))
            )
            batch_no, seq, declare, previous = batch_no + 1, seq + len(chunk), (), None
            size += len(data)
        return batches

    def _after_store(self, batches: list[SealedBatch]) -> None:
        count = sum(b.readings for b in batches)
        self._metrics.readings_sealed.inc(count)
        self._metrics.batches_sealed.inc(len(batches))
        if any(b.declares for b in batches):
            self._unlogged_declared.extend(r for b in batches for r in b.declares)
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
            log.info("Sources released after held_back_s=%.1f", time.time() - self.held_back_since)
            self.held_back_since = None
        self.sealed.set()

    def _log_declared(self, *, now: bool = False) -> None:
        """One line per declaration, summed up while they follow each other (a full disk)."""
        if not self._unlogged_declared or (not now and time.monotonic() < self._next_declared_log):
            return
        self._next_declared_log = time.monotonic() + DECLARED_LOG_S
        merged: list[list[int]] = []
        for first, last in sorted(self._unlogged_declared):
            if merged and first == merged[-1][1] + 1:
                merged[-1][1] = last
            else:
                merged.append([first, last])
        self._unlogged_declared = []
        log.info(
            "Declared evicted readings ranges=%s%s count=%d",
            merged[:5], " ..." if len(merged) > 5 else "", sum(b - a + 1 for a, b in merged),
        )  # fmt: skip

    def _encodable(self, readings: list[Reading], exc: Exception) -> list[Reading]:
        """A value CBOR cannot carry (a source bug) becomes a `bad` reading, never a crash."""
        fixed = [
            r if isinstance(r.value, ENCODABLE) else r._replace(value=None, quality=Quality.BAD)
            for r in readings
        ]
        bad = sorted({f"{r.src}.{r.pt}" for r in readings if not isinstance(r.value, ENCODABLE)})
        log.error("Readings with values that cannot be encoded marked bad points=%s error=%s",
                  bad, exc)  # fmt: skip
        return fixed

    async def _recover(self, exc: StoreError) -> bool:
        """A failed write: make room if the disk is full; True to retry at once.

        The store already evicted what the free pages needed to hold the batches; failing that,
        the oldest share goes here. Readings stay pending meanwhile; when `capacity` is reached,
        sources are held back. Without progress, the caller waits a moment before retrying.
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
            self._declare = await self._store.pending_evictions()
        except StoreError as again:
            log.debug("Could not make room in the buffer error=%s", again)
        return evicted > 0
