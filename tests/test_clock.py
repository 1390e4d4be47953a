"""The clocks: adjtimex's struct and state, the per-batch `clock` map, the step detector, the
age clock that `store.max_age` uses, and the verifier's tally of what batches say.

The kernel is asked for real (adjtimex with modes=0 reads only). Steps of the wall clock are
injected through the clock functions ClockWatch takes: a unit test cannot step the real clock
(the fault suite does, under libfaketime, in test_clock_faults.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.clock import ClockWatch, KernelClock, boot_id, read_kernel_clock
from edge_agent.clock.kernel import STA_UNSYNC, KernelClockReader, Timex, kernel_clock
from edge_agent.clock.watch import STEP_NS
from edge_agent.config.schema import MqttConfig
from edge_agent.consumer.clock_report import ClockTally
from edge_agent.errors import EnvelopeError
from edge_agent.forward.mqtt import Forwarder
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Batch, ClockState, Opener, Sealer
from edge_agent.store.sqlite import Store

pytestmark = pytest.mark.unit

S = 1_000_000_000
T0 = 1_760_000_000 * S
HOUR, DAY = 3600 * S, 86400 * S
SYNCED = KernelClock(synced=True, error_ns=2_000_000)


class Clocks:
    """A wall and a monotonic clock the test moves: `tick` moves both, `step` the wall only."""

    def __init__(self) -> None:
        self.wall, self.mono = T0, 5 * S
        self.kernel_reads = 0

    def tick(self, ns: int) -> None:
        self.wall += ns
        self.mono += ns

    def step(self, ns: int) -> None:
        self.wall += ns

    def kernel(self) -> KernelClock:
        self.kernel_reads += 1
        return SYNCED

    def watch(self, boot: str = "boot-1") -> ClockWatch:
        return ClockWatch(boot=boot, wall_ns=lambda: self.wall, mono_ns=lambda: self.mono,
                          kernel=self.kernel)  # fmt: skip


# --- the kernel's view ---------------------------------------------------------------------


@pytest.mark.skipif(ctypes.sizeof(ctypes.c_long) != 8, reason="the LP64 layout (x86_64, aarch64)")
def test_struct_timex_has_the_lp64_layout_of_glibc() -> None:
    assert ctypes.sizeof(Timex) == 208
    assert (Timex.esterror.offset, Timex.status.offset, Timex.tai.offset) == (32, 40, 160)


def test_adjtimex_is_read_for_real() -> None:
    state = read_kernel_clock()
    assert isinstance(state.synced, bool)
    assert state.error_ns is None or state.error_ns >= 0
    assert state.synced or state.error_ns is None


@pytest.mark.parametrize(
    ("status", "esterror", "expected"),
    [
        (STA_UNSYNC, 16_000_000, KernelClock(False, None)),
        (STA_UNSYNC | 0x1, 500, KernelClock(False, None)),  # an error is meaningless unsynced
        (0x1, 1_500, KernelClock(True, 1_500_000)),  # µs -> ns
        (0x2001, 0, KernelClock(True, 0)),
        (0x1, 16_000_000, KernelClock(True, None)),  # the kernel's cap: unknown
    ],
)
def test_the_kernel_state_is_read_from_status_and_esterror(
    status: int, esterror: int, expected: KernelClock
) -> None:
    assert kernel_clock(Timex(status=status, esterror=esterror)) == expected


def test_a_refused_adjtimex_falls_back_to_the_timesyncd_flag(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The packaged unit's seccomp filter answers EPERM; here a stand-in function does (root in
    this test process is never refused), logged once, then the flag file says."""
    calls = []

    def refused(_: object) -> int:
        calls.append(1)
        ctypes.set_errno(1)  # EPERM
        return -1

    flag = tmp_path / "synchronized"
    reader = KernelClockReader(refused, flag)
    assert reader() == KernelClock(synced=False, error_ns=None)
    flag.touch()
    assert reader() == KernelClock(synced=True, error_ns=None)
    assert len(calls) == 1  # not asked again
    warnings = [r.getMessage() for r in caplog.records if "adjtimex" in r.getMessage()]
    assert len(warnings) == 1 and "Operation not permitted" in warnings[0]


def test_boot_id_is_the_kernels_or_empty(tmp_path: Path) -> None:
    assert len(boot_id()) == 36  # a UUID on Linux
    (tmp_path / "boot_id").write_text("abc\n")
    assert boot_id(tmp_path / "boot_id") == "abc"
    assert boot_id(tmp_path / "missing") == ""


# --- the watch: state per batch, steps, the age clock ----------------------------------------


def test_state_reads_the_kernel_at_most_once_a_second() -> None:
    clocks = Clocks()
    watch = clocks.watch()
    states = []
    for _ in range(2500):  # 2,500 batches in 2.5 s
        states.append(watch.state())
        clocks.tick(1_000_000)
    assert clocks.kernel_reads == 3
    assert states[0] == {"synced": True, "error_ns": 2_000_000, "boot": "boot-1", "mono": 5 * S}
    assert states[-1]["mono"] == 5 * S + 2499 * 1_000_000  # mono is read for every batch
    assert watch.state()["mono"] - states[0]["mono"] == 2500 * 1_000_000


def test_a_step_is_detected_once_with_its_size_either_way() -> None:
    clocks = Clocks()
    watch = clocks.watch()
    clocks.tick(S)
    assert watch.check() is None
    clocks.step(DAY)
    step = watch.check()
    assert step is not None and step.size_ns == DAY and step.wall_ns == clocks.wall
    clocks.tick(S)
    assert watch.check() is None  # once per step
    clocks.step(-HOUR)
    back = watch.check()
    assert back is not None and back.size_ns == -HOUR
    assert watch.steps == 2
    assert watch.status()["steps"] == 2 and watch.status()["last_step_s"] == -3600.0
    assert watch.status()["offset_s"] == 23 * 3600.0


def test_a_slew_is_not_a_step() -> None:
    clocks = Clocks()
    watch = clocks.watch()
    for _ in range(1000):  # a drift of 500 ppm (more than an NTP slew) for 1,000 s
        clocks.tick(S)
        clocks.step(500_000)
        assert watch.check() is None
    assert watch.steps == 0 and watch.offset_ns == 500_000_000  # followed, not a step
    clocks.step(STEP_NS)
    step = watch.check()
    assert step is not None and step.size_ns == STEP_NS


def test_the_age_clock_ignores_steps_of_the_wall_clock() -> None:
    clocks = Clocks()
    watch = clocks.watch()
    start = watch.age_ns()
    assert start == T0  # it reads as the wall clock until a step
    clocks.tick(10 * S)
    clocks.step(DAY)
    clocks.tick(5 * S)
    clocks.step(-HOUR)
    assert watch.age_ns() - start == 15 * S


def test_the_age_clock_carries_on_across_restarts_within_a_boot() -> None:
    clocks = Clocks()
    first = clocks.watch()
    kept = first.persisted()
    clocks.tick(60 * S)
    clocks.step(DAY)  # while the agent was stopped
    second = clocks.watch()
    step = second.adopt(kept["clock_boot"], kept["clock_anchor_ns"], kept["clock_offset_ns"])
    assert step is not None and step.size_ns == DAY
    assert second.age_ns() == first.age_ns()  # the same clock: ages of buffered batches hold
    assert second.steps == 1


def test_a_new_boot_starts_the_age_clock_from_the_wall_clock() -> None:
    clocks = Clocks()
    kept = clocks.watch("boot-1").persisted()
    clocks.step(DAY)
    clocks.mono = 3 * S  # monotonic time restarts at boot
    second = clocks.watch("boot-2")
    assert second.adopt(kept["clock_boot"], kept["clock_anchor_ns"], None) is None
    assert second.age_ns() == clocks.wall
    assert second.adopt(None, None, None) is None  # a buffer that never kept one


# --- the batch's `clock` map in both formats -------------------------------------------------

READINGS = [Reading("plc", "t", T0, 1.5, Quality.GOOD), Reading("plc", "n", T0, 7, Quality.GOOD)]
STATE = {"synced": False, "error_ns": None, "boot": "b00t", "mono": 123_456_789}


def sealed(payload_format: int, clock: dict[str, Any] | None, **extra: Any) -> tuple[bytes, Any]:
    key = Ed25519PrivateKey.generate()
    data = Sealer(key, payload_format=payload_format).seal(
        gateway="gw", epoch="ep", batch=1, first_seq=1, readings=READINGS, sealed_ns=T0,
        clock=clock, **extra,
    )  # fmt: skip
    return data, Opener([key.public_key()])


@pytest.mark.parametrize("payload_format", [1, 2])
def test_the_clock_map_goes_out_and_comes_back_in_both_formats(payload_format: int) -> None:
    data, opener = sealed(payload_format, STATE, evicted=[(1, 5)])
    batch = opener.open(data)
    assert batch.clock == ClockState(False, None, "b00t", 123_456_789)
    assert batch.clock.to_json() == STATE
    assert [r["v"] for r in batch.readings] == [1.5, 7] and batch.evicted == [(1, 5)]
    body = cbor2.loads(zstandard.ZstdDecompressor().decompress(cbor2.loads(data).value[2]))
    assert body["clock"] == STATE


@pytest.mark.parametrize("payload_format", [1, 2])
def test_a_batch_without_clock_still_reads(payload_format: int) -> None:
    data, opener = sealed(payload_format, None)
    assert opener.open(data).clock is None  # an agent before contract 1.14


def test_format_1_with_clock_is_byte_for_byte_what_cbor2_writes() -> None:
    data, _ = sealed(1, STATE)
    body = cbor2.loads(zstandard.ZstdDecompressor().decompress(cbor2.loads(data).value[2]))
    assert list(body)[-1] == "clock"
    raw = zstandard.ZstdDecompressor().decompress(cbor2.loads(data).value[2])
    assert raw == cbor2.dumps(body)


@pytest.mark.parametrize(
    ("clock", "error"),
    [
        ({**STATE, "synced": 1}, "clock.synced"),
        ({**STATE, "error_ns": -1}, "clock.error_ns"),
        ({**STATE, "error_ns": 1.5}, "clock.error_ns"),
        ({**STATE, "boot": b"x"}, "clock.boot"),
        ({**STATE, "mono": None}, "clock.mono"),
    ],
)
def test_a_malformed_clock_is_an_envelope_error_naming_the_key(clock: Any, error: str) -> None:
    data, opener = sealed(1, clock)
    with pytest.raises(EnvelopeError, match=error):
        opener.open(data)


def test_a_clock_that_is_not_a_map_is_refused() -> None:
    with pytest.raises(EnvelopeError, match="clock is not a map"):
        ClockState.parse(["synced"])


def test_keys_a_later_agent_adds_to_clock_are_ignored() -> None:
    data, opener = sealed(2, {**STATE, "source": "gps"})
    batch = opener.open(data)
    assert batch.clock is not None and batch.clock.boot == "b00t"


# --- the batcher and the store: timestamps as read, ages on the monotonic clock ---------------


async def test_retention_by_age_follows_the_monotonic_clock_through_steps(tmp_path: Path) -> None:
    clocks = Clocks()
    watch = clocks.watch()
    key = Ed25519PrivateKey.generate()
    store = Store(tmp_path / "b.db", max_bytes=2**30, max_age_s=3600, now_ns=watch.age_ns)
    await store.open()
    batcher = Batcher(store, Sealer(key), Metrics(), gateway="gw", max_readings=100,
                      max_delay=0.05, capacity=10_000, clock=watch)  # fmt: skip
    opener = Opener([key.public_key()])

    async def seal(at_wall: Callable[[], int]) -> Batch:
        await batcher.emit([Reading("sim", "p", at_wall(), 1.0, Quality.GOOD)])
        await batcher.seal_pending()
        return opener.open((await store.take(1000))[-1].data)

    first = await seal(lambda: clocks.wall)
    clocks.tick(S)
    clocks.step(2 * HOUR)  # forward past max_age: nothing is old yet
    assert watch.check() is not None
    second = await seal(lambda: clocks.wall)
    assert second.sealed_ns - first.sealed_ns == 2 * HOUR + S  # `sealed` is the wall clock read
    assert second.readings[0]["ts"] == clocks.wall  # and so is the reading's time
    assert all(not b.evicted for b in [opener.open(b.data) for b in await store.take(1000)])
    clocks.tick(S)
    clocks.step(-3 * HOUR)  # back past both batches' wall times: nothing becomes young or old
    await seal(lambda: clocks.wall)
    assert all(not b.evicted for b in [opener.open(b.data) for b in await store.take(1000)])
    assert (await store.oldest_sealed_ns()) == T0  # the age clock: 2 s old, whatever the wall
    clocks.tick(3600 * S - S)  # the first batch is now an hour old, truly
    await seal(lambda: clocks.wall)
    batches = [opener.open(b.data) for b in await store.take(1000)]
    assert [b.evicted for b in batches if b.evicted] == [[(1, 1)]]  # declared by retention
    assert all(b.clock is not None and b.clock.boot == "boot-1" for b in batches)
    await store.close()


async def test_the_backlog_ends_on_the_age_clock_whatever_the_wall_clock_does(
    tmp_path: Path,
) -> None:
    """After an outage the forwarder sends batches sealed since (or 2 x reconnect_max before)
    the connection ahead of the backlog: a step of the wall clock must not make the backlog
    fresh (a step back) nor fresh batches backlog (a step forward)."""
    clocks = Clocks()
    watch = clocks.watch()
    store = Store(tmp_path / "b.db", max_bytes=2**30, max_age_s=86400, now_ns=watch.age_ns)
    await store.open()
    batcher = Batcher(store, Sealer(Ed25519PrivateKey.generate()), Metrics(), gateway="gw",
                      max_readings=100, max_delay=0.05, capacity=10_000, clock=watch)  # fmt: skip
    forwarder = Forwarder(MqttConfig(url="mqtt://127.0.0.1:1", reconnect_max=10), "gw", store,
                          batcher.sealed, Metrics())  # fmt: skip

    async def seal() -> int:
        await batcher.emit([Reading("sim", "p", clocks.wall, 1.0, Quality.GOOD)])
        await batcher.seal_pending()
        return (await store.take(1000))[-1].key.id

    try:
        backlog = await seal()
        clocks.tick(HOUR)  # the outage
        clocks.step(-2 * HOUR)  # back: on the wall clock the backlog now looks an hour ahead
        assert await forwarder._backlog_end() == backlog
        fresh = await seal()
        clocks.tick(S)
        clocks.step(DAY)  # forward: on the wall clock the fresh batch looks a day old
        assert fresh > backlog
        assert await forwarder._backlog_end() == backlog  # sealed 1 s ago, within 2 x 10 s
        clocks.tick(30 * S)
        assert await forwarder._backlog_end() == fresh  # now truly older than 2 x reconnect_max
    finally:
        await store.close()


async def test_the_anchor_kept_in_the_buffer_carries_ages_across_a_restart(tmp_path: Path) -> None:
    """What Agent._adopt_clock does at start: the anchor goes through the buffer's meta."""
    clocks = Clocks()
    first = clocks.watch()
    store = Store(tmp_path / "b.db", max_bytes=2**30, max_age_s=3600, now_ns=first.age_ns)
    await store.open()
    for key, value in first.persisted().items():
        await store.remember(key, value)
    await store.close()
    clocks.tick(30 * S)
    clocks.step(-HOUR)  # while stopped
    second = clocks.watch()
    store = Store(tmp_path / "b.db", max_bytes=2**30, max_age_s=3600, now_ns=second.age_ns)
    await store.open()
    kept = [store.recall(k) for k in ("clock_boot", "clock_anchor_ns", "clock_offset_ns")]
    step = second.adopt(*kept)
    await store.close()
    assert step is not None and step.size_ns == -HOUR
    assert second.age_ns() == first.age_ns() == T0 + 30 * S


# --- the verifier's tally ----------------------------------------------------------------------


def batch(sealed_ns: int, mono: int, *, synced: bool = True, boot: str = "b1") -> Batch:
    return Batch("gw", "ep", 1, [], sealed_ns, clock=ClockState(synced, 1000, boot, mono))


def test_the_tally_finds_steps_within_a_boot_in_the_order_they_were_sealed() -> None:
    tally = ClockTally()
    for sealed_ns, mono in [(T0, S), (T0 + DAY + S, 2 * S), (T0, S)]:  # the first one resent
        tally.add(batch(sealed_ns, mono))
    tally.add(batch(T0 + DAY + 2 * S - HOUR, 3 * S, synced=False))
    tally.add(batch(T0, S, boot="b2"))  # another boot: mono restarts, no step
    tally.add(Batch("gw", "ep", 2, [], T0))  # an agent before 1.14
    lines = tally.lines()
    assert lines[0] == (
        "clock: gateway=gw batches=6 synced=4 unsynced=1 without_clock=1 boots=2 "
        "max_error=0.001ms steps=2 (+86400.000s, -3600.000s)"
    )
    assert lines[1].startswith("CLOCK: gateway=gw 1 of 6 batches were sealed with an unsynch")


def test_the_tally_of_a_synced_steady_clock_says_so_in_one_line() -> None:
    tally = ClockTally()
    for n in range(10):
        tally.add(batch(T0 + n * S, S + n * S))
    assert tally.lines() == [
        "clock: gateway=gw batches=10 synced=10 unsynced=0 without_clock=0 boots=1 "
        "max_error=0.001ms steps=0"
    ]
