"""Groups readings into batches, numbers them and seals them into the store.

Sources hand readings to `emit`, which waits when `capacity` readings are pending: back-pressure
instead of unbounded memory. A batch is sealed when it reaches `max_readings` or when its first
reading has waited `max_delay`; several ready batches go to the store in one transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Sequence

import cbor2

from edge_agent.errors import StoreError
from edge_agent.metrics import Metrics
from edge_agent.reading import Reading, conforming, needs_check
from edge_agent.seal.envelope import Sealer
from edge_agent.store.sqlite import SealedBatch, Store

log = logging.getLogger(__name__)

MAX_BATCHES_PER_TRANSACTION = 32
STORE_RETRY_S = 1.0
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
        self._stopping = False
        self._failed_writes = 0
        self._last_store_error: str | None = None
        self._refused: set[str] = set()
        """Points already logged by `_conforming`."""
        self.sealed = asyncio.Event()
        """Set after every store write, for whoever waits for new batches (the forwarder)."""

    def use_sealer(self, sealer: Sealer) -> None:
        """Seal from now on with `sealer` (a new signing key on reload).

        Batches already sealed keep the signature and key id they were sealed with; readings
        still pending are sealed with the new key. Nothing is re-sealed or re-sent.
        """
        self._sealer = sealer

    @property
    def sealer(self) -> Sealer:
        """The sealer in use (its `kid` names the signing key)."""
        return self._sealer

    async def emit(self, readings: Sequence[Reading]) -> None:
        """Accept readings from a source; waits while the batcher is `capacity` behind."""
        while len(self._pending) >= self._capacity:
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
        while not self._stopping:
            await self._wait_for_batch()
            await self.seal_pending()
        await self.seal_pending()

    def stop(self) -> None:
        """Ask `run` to seal what is pending and return; sources must be stopped first."""
        self._stopping = True
        self._arrived.set()
        self._full.set()

    async def _wait_for_batch(self) -> None:
        if self._declare or self._stopping:
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
        while self._pending or self._declare:
            count = min(len(self._pending), self._max_readings * MAX_BATCHES_PER_TRANSACTION)
            batches = await self._seal(self._pending[:count])
            try:
                evicted = await self._store.append(batches)
            except StoreError as exc:
                self._metrics.store_errors.inc()
                if self._stopping and self._failed_writes >= STOP_RETRIES:
                    log.error("Stopping with readings that could not be sealed count=%d error=%s",
                              len(self._pending), exc)  # fmt: skip
                    return
                await self._recover(exc)
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

        Pending evictions are declared in a batch of their own, without readings: declarations
        are sent first and never evicted, so they must stay small.
        """
        sealed_ns = time.time_ns()
        batch_no, seq = self._store.next_batch, self._store.next_seq
        batches: list[SealedBatch] = []
        declare = tuple(self._declare)
        chunks = [readings[i : i + self._max_readings]
                  for i in range(0, len(readings), self._max_readings)]  # fmt: skip
        if declare:
            chunks.insert(0, [])
        for chunk in chunks:
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
            )
            checked = self._conforming(chunk) if needs_check(chunk) else chunk
            try:
                data = seal(readings=checked)
            except (TypeError, ValueError, cbor2.CBOREncodeError):  # text CBOR cannot carry
                data = seal(readings=self._conforming(checked))
            batches.append(SealedBatch(batch_no, seq, len(chunk), sealed_ns, data, declare))
            batch_no, seq, declare = batch_no + 1, seq + len(chunk), ()
        return batches

    def _after_store(self, batches: list[SealedBatch]) -> None:
        count = sum(b.readings for b in batches)
        self._metrics.readings_sealed.inc(count)
        self._metrics.batches_sealed.inc(len(batches))
        if any(b.declares for b in batches):
            log.info(
                "Declared evicted readings ranges=%s",
                [list(r) for b in batches for r in b.declares],
            )
            self._declare = []
        if not self._pending:
            self._arrived.clear()
            self._first_at = None
        else:
            self._first_at = asyncio.get_running_loop().time()
        self._space.set()
        self.sealed.set()

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

    async def _recover(self, exc: StoreError) -> None:
        """A failed write: make room if the disk is full, then wait a moment before retrying.

        Readings stay pending meanwhile; when `capacity` is reached, sources are slowed.
        """
        self._failed_writes += 1
        if str(exc) != self._last_store_error:
            self._last_store_error = str(exc)
            log.error("Could not store batch, will retry error=%s", exc)
        try:
            if exc.disk_full:
                evicted = await self._store.evict_oldest()
                if evicted:
                    self._metrics.readings_evicted.inc(evicted)
                    log.warning("Disk full: evicted oldest readings count=%d", evicted)
            self._declare = await self._store.pending_evictions()
        except StoreError as again:
            log.debug("Could not make room in the buffer error=%s", again)
        await asyncio.sleep(STORE_RETRY_S)
