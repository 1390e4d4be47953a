"""The one tick schedule and the one backoff that every polling and reconnecting loop uses."""

from __future__ import annotations

import asyncio

import pytest

from edge_agent.schedule import Backoff, ticks

pytestmark = [pytest.mark.unit, pytest.mark.timeout(30)]
EARLY = 0.001  # asyncio may wake a sleeper up to its clock resolution early


async def test_ticks_do_not_drift_however_long_each_pass_takes() -> None:
    loop = asyncio.get_running_loop()
    interval, seen = 0.05, []
    start = loop.time()
    async for tick in ticks(interval):
        seen.append((tick, loop.time() - start))
        if tick == 6:
            break
        await asyncio.sleep(0.02)  # the work of one pass, well inside the interval
    assert [tick for tick, _ in seen] == list(range(7))
    for tick, at in seen:
        assert at >= tick * interval - EARLY, (tick, at)
    # with drift each pass would start 20ms later than the one before: 6 * 70ms = 420ms
    assert seen[-1][1] < 6 * interval + 0.1


async def test_an_overrun_skips_the_missed_ticks_instead_of_bursting() -> None:
    loop = asyncio.get_running_loop()
    interval, seen = 0.2, []
    start = loop.time()
    async for tick in ticks(interval):
        seen.append((tick, loop.time() - start))
        if tick >= 2:
            break
        await asyncio.sleep(0.3)  # tick 0's pass overruns tick 1 (due at 0.2s)
    assert [tick for tick, _ in seen] == [0, 2], "tick 1 was missed: skipped, not run late"
    assert seen[1][1] >= 2 * interval - EARLY, "tick 2 waits for its own time"


async def test_with_grace_a_tick_runs_late_and_only_older_ones_are_skipped() -> None:
    loop = asyncio.get_running_loop()
    interval, seen = 0.2, []
    start = loop.time()
    async for tick in ticks(interval, grace=interval):
        seen.append((tick, loop.time() - start))
        if tick >= 3:
            break
        # pass 0 ends at 0.3s (tick 1 is 0.1s late: run at once); pass 1 ends at 0.75s (tick 2
        # is 0.35s late: skipped; tick 3 is 0.15s late: run at once)
        await asyncio.sleep(0.3 if tick == 0 else 0.45)
    assert [tick for tick, _ in seen] == [0, 1, 3]
    assert seen[1][1] == pytest.approx(0.3, abs=0.05)
    assert seen[2][1] == pytest.approx(0.75, abs=0.05)


def test_ticks_refuse_a_non_positive_interval() -> None:
    with pytest.raises(ValueError, match="positive"):
        ticks(0.0)


def test_backoff_doubles_to_its_cap_with_jitter_and_resets_on_success() -> None:
    backoff = Backoff(0.5, 4.0)
    for nominal in (0.5, 1.0, 2.0, 4.0, 4.0, 4.0):
        wait = backoff.next()
        assert nominal * 0.5 <= wait <= nominal, (nominal, wait)
    backoff.reset()
    assert 0.25 <= backoff.next() <= 0.5
    at_cap = [backoff.next() for _ in range(100)][10:]
    assert all(2.0 <= wait <= 4.0 for wait in at_cap)
    assert len(set(at_cap)) > 1, "jitter spreads the retries"


def test_backoff_stays_at_its_cap_after_any_number_of_failures() -> None:
    # A device down for hours: 2 ** failures once exceeded a float (OverflowError after 1024)
    backoff = Backoff(1.0, 30.0)
    waits = [backoff.next() for _ in range(5000)]
    assert 15.0 <= waits[-1] <= 30.0


def test_a_second_ceiling_for_stalled_attempts_and_growth_until_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The forwarder's two ceilings (issue 8 case 7): a broker that accepts the connection but
    takes no batch is retried up to `stalled_cap` apart, one that does not answer at most `cap`
    apart, and the delay keeps growing across both kinds until a success resets it."""
    monkeypatch.setattr("edge_agent.schedule.random.uniform", lambda a, b: b)  # no jitter
    backoff = Backoff(1.0, 5.0, stalled_cap=60.0)
    stalled = [backoff.next(stalled=True) for _ in range(8)]
    assert stalled == [1, 2, 4, 8, 16, 32, 60, 60], "a broker that takes nothing: up to 60 s"
    assert backoff.next() == 5, "one that does not answer: at most 5 s"
    assert backoff.next(stalled=True) == 60, "the growth was not lost meanwhile"
    backoff.reset()
    assert backoff.next(stalled=True) == 1
    assert Backoff(1.0, 5.0, stalled_cap=2.0).stalled_cap == 5.0, "never below the first cap"
    without = Backoff(1.0, 5.0)
    assert [without.next(stalled=True) for _ in range(5)] == [1, 2, 4, 5, 5]
