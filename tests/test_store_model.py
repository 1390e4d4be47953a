"""A model-based test of the store: random histories of append, take, ack, evict, crash, reopen,
and the end_to_end mode's mark-sent and consumer acknowledgements (docs/contract.md §4.10).

Hypothesis drives a real Store on a real SQLite file. A crash is a copy of the files as a
SIGKILL leaves them (the database, its -wal, the witness; not the -shm), taken between two
operations and opened in place of the original. After every step, against a model kept here:
- nothing acknowledged comes back;
- nothing unacknowledged disappears undeclared: every seq ever sealed is buffered, acknowledged,
  pending eviction, or declared by a buffered or acknowledged declaration;
- order is kept: declarations first, then batches in seq order, without overlap;
- the counters never go back within an epoch. A crash that also loses the -wal either lost
  nothing, or is recognised: the file is quarantined and the new epoch declares the old one's
  last seq.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from edge_agent.seal.ack import contains, normalize
from edge_agent.store.sqlite import BatchKey, SealedBatch, Store, StoredBatch

pytestmark = pytest.mark.faults

T = TypeVar("T")
MAX_BYTES = 24_000
"""Small enough that retention evicts within a few appends."""


def payload(first_seq: int, readings: int, declares: list[tuple[int, int]], size: int) -> bytes:
    """What a batch holds, readable back without sealing; padded to `size` bytes."""
    data = json.dumps({"first": first_seq, "readings": readings, "declares": declares}).encode()
    return data + b" " * max(0, size - len(data))


def contents(batch: StoredBatch) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(batch.data)
    return decoded


class StoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.root = Path(tempfile.mkdtemp(prefix="store-model-"))
        self.generation = 0
        self.clock = 0
        """The model's time, in ns, for `sent_ns`."""
        self.store = self.run(self.open(self.path()))
        self.reset_model()

    # -- plumbing --------------------------------------------------------------------------------

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coroutine)

    def path(self) -> Path:
        directory = self.root / str(self.generation)
        directory.mkdir(exist_ok=True)
        return directory / "buffer.db"

    async def open(self, path: Path) -> Store:
        store = Store(path, max_bytes=MAX_BYTES, max_age_s=86400)
        await store.open()
        return store

    def reset_model(self) -> None:
        self.epoch = self.store.epoch
        self.sealed = 0
        """The highest seq sealed in this epoch."""
        self.acked: set[int] = set()
        self.acked_keys: set[BatchKey] = set()
        self.declared_and_delivered: set[int] = set()

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        shutil.rmtree(self.root, ignore_errors=True)

    def everything(self) -> list[StoredBatch]:
        return self.run(self.store.take(100_000))

    # -- rules -----------------------------------------------------------------------------------

    @rule(
        sizes=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=4),
        padding=st.integers(min_value=100, max_value=6000),
        declare=st.booleans(),
    )
    def append(self, sizes: list[int], padding: int, declare: bool) -> None:
        """Seal batches (an empty one is a declaration, as the batcher makes them)."""
        pending = self.run(self.store.pending_evictions())
        batch_no, seq = self.store.next_batch, self.store.next_seq
        batches = []
        if declare and pending:
            data = payload(seq, 0, pending, 50)
            batches.append(SealedBatch(batch_no, seq, 0, time.time_ns(), data, tuple(pending)))
            batch_no += 1
        for size in sizes:
            if size == 0:
                continue
            data = payload(seq, size, [], padding)
            batches.append(SealedBatch(batch_no, seq, size, time.time_ns(), data))
            batch_no, seq = batch_no + 1, seq + size
        if self.run(self.store.append(batches)):
            event("retention evicted")
        self.sealed = seq - 1

    @rule(data=st.data())
    def take_and_ack(self, data: st.DataObject) -> None:
        """The forwarder: take the oldest, the broker acknowledges some of them."""
        limit = data.draw(st.integers(min_value=1, max_value=20))
        taken = self.run(self.store.take(limit))
        if not taken:
            return
        chosen = data.draw(st.lists(st.sampled_from(taken), unique_by=lambda b: b.key))
        self.run(self.store.ack([batch.key for batch in chosen]))
        for batch in chosen:
            self.acknowledged(batch)

    @rule(data=st.data())
    def take_and_mark_sent(self, data: st.DataObject) -> None:
        """end_to_end: the broker PUBACKs some batches; they stay, and are due again only after
        the ack timeout."""
        self.clock += 1_000
        taken = self.run(self.store.take_unacked(data.draw(st.integers(1, 20)), self.clock - 500))
        if not taken:
            return
        chosen = data.draw(st.lists(st.sampled_from(taken), unique_by=lambda b: b.key))
        keys = {batch.key for batch in chosen}
        self.run(self.store.mark_sent(sorted(keys), self.clock))
        before = {b.key for b in self.run(self.store.take_unacked(100_000, self.clock - 1))}
        assert not before & keys, "a batch sent just now is not due again"
        due = {b.key for b in self.run(self.store.take_unacked(100_000, self.clock))}
        assert keys <= due, "kept, and due once the timeout has passed"

    @rule(data=st.data())
    def consumer_acknowledges(self, data: st.DataObject) -> None:
        """A consumer's verified acknowledgement: exactly the batches it covers are deleted."""
        top = max(self.sealed, 1)
        spans = data.draw(st.lists(st.tuples(st.integers(1, top), st.integers(0, 30)), max_size=4))
        numbers = data.draw(
            st.lists(
                st.tuples(st.integers(0, self.store.next_batch), st.integers(0, 3)), max_size=3
            )
        )
        seqs = normalize([a, a + w] for a, w in spans)
        batches = normalize([a, a + w] for a, w in numbers)
        expected = [
            batch
            for batch in self.everything()
            if contains(batches, batch.key.id, batch.key.id)
            or (
                batch.key.kind == "readings"
                and contains(seqs, contents(batch)["first"],
                             contents(batch)["first"] + batch.readings - 1)
            )
        ]  # fmt: skip
        removed = self.run(self.store.consumer_ack(seqs, batches))
        assert sorted(removed) == sorted(batch.key for batch in expected)
        for batch in expected:
            self.acknowledged(batch)
        event("a consumer ack deleted batches" if removed else "a consumer ack deleted none")

    def acknowledged(self, batch: StoredBatch) -> None:
        content = contents(batch)
        self.acked_keys.add(batch.key)
        if content["declares"]:
            for first, last in content["declares"]:
                self.declared_and_delivered.update(range(first, last + 1))
        else:
            first = content["first"]
            self.acked.update(range(first, first + content["readings"]))

    @rule()
    def ack_again(self) -> None:
        """A duplicate PUBACK, after a reconnect: deleting twice changes nothing."""
        self.run(self.store.ack(sorted(self.acked_keys)[:10]))

    @rule(fraction=st.sampled_from([0.01, 0.1, 0.5]))
    def evict_for_a_full_disk(self, fraction: float) -> None:
        self.run(self.store.evict_oldest(fraction))

    @rule()
    def clean_restart(self) -> None:
        self.run(self.store.close())
        self.store = self.run(self.open(self.store.path))
        assert self.store.epoch == self.epoch and self.store.quarantined == []

    @rule()
    def crash(self) -> None:
        """SIGKILL between two operations: the files as they are, the process gone."""
        self.restart_from_crash(keep_wal=True)
        assert self.store.epoch == self.epoch and self.store.quarantined == []

    @rule()
    def crash_and_lose_the_wal(self) -> None:
        """The same, and someone removes the -wal: nothing lost, or the loss is recognised."""
        self.restart_from_crash(keep_wal=False)
        if self.store.epoch == self.epoch:
            assert self.store.quarantined == []
            # The counters did not go back, so no append was lost; a delete that was only in the
            # -wal was (an ack, an eviction): those batches are back, to be sent again, which
            # at-least-once delivery allows (consumers drop duplicates by seq). Never a loss.
            back = [b for b in self.everything() if b.key in self.acked_keys]
            for batch in back:
                self.acked_keys.discard(batch.key)
                content = contents(batch)
                if not content["declares"]:
                    first = content["first"]
                    self.acked.difference_update(range(first, first + content["readings"]))
            event("a lost -wal took acks back" if back else "a lost -wal held no acks")
            return
        event(
            "a lost -wal was recognised"
        )  # everything had been checkpointed: the invariants check nothing is lost
        [quarantine] = self.store.quarantined
        assert quarantine.epoch == self.epoch and quarantine.last_seq == self.sealed
        ended = self.run(self.store.previous_epoch())
        assert ended is not None
        assert (ended["epoch"], ended["last_seq"], ended["ended"]) == (
            self.epoch,
            self.sealed,
            "quarantined",
        )
        self.reset_model()

    def restart_from_crash(self, *, keep_wal: bool) -> None:
        old = self.store.path
        self.generation += 1
        new = self.path()
        suffixes = ["", "-committed"] + (["-wal"] if keep_wal else [])
        for suffix in suffixes:
            source = Path(f"{old}{suffix}")
            if source.exists():
                shutil.copyfile(source, Path(f"{new}{suffix}"))
        self.run(self.store.close())  # the original is left behind, as after a SIGKILL
        self.store = self.run(self.open(new))

    # -- invariants ------------------------------------------------------------------------------

    @invariant()
    def counters_never_go_back(self) -> None:
        assert self.store.next_seq == self.sealed + 1

    @invariant()
    def nothing_acknowledged_comes_back_and_order_is_kept(self) -> None:
        batches = self.everything()
        kinds = [batch.key.kind for batch in batches]
        assert kinds == sorted(kinds, key=lambda kind: kind != "declaration"), "declarations first"
        seen = 0
        for batch in batches:
            assert batch.key not in self.acked_keys
            content = contents(batch)
            if content["declares"]:
                continue
            first, last = content["first"], content["first"] + content["readings"] - 1
            assert first > seen, "batches in seq order, without overlap"
            assert not self.acked.intersection(range(first, last + 1))
            seen = last

    @invariant()
    def nothing_unacknowledged_disappears_undeclared(self) -> None:
        accounted = set(self.acked) | self.declared_and_delivered
        for batch in self.everything():
            content = contents(batch)
            for first, last in content["declares"]:
                accounted.update(range(first, last + 1))
            accounted.update(range(content["first"], content["first"] + content["readings"]))
        for first, last in self.run(self.store.pending_evictions()):
            accounted.update(range(first, last + 1))
        missing = set(range(1, self.sealed + 1)) - accounted
        assert not missing, f"undeclared loss: {sorted(missing)[:10]}"

    @invariant()
    def statistics_match_the_file(self) -> None:
        batches = self.everything()
        assert self.store.stats.batches == len(batches)
        assert self.store.stats.readings == sum(batch.readings for batch in batches)
        assert self.store.stats.bytes == sum(len(batch.data) for batch in batches)


StoreModel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_store_model = StoreModel.TestCase
