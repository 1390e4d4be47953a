"""When to act next: a drift-free tick schedule for polling loops, and a reconnect backoff.

Every loop of the agent that repeats or retries uses these two, so there is one rule for each:
- `ticks`: tick n is due at start + n * interval (no drift, however long each pass takes); a
  tick more than `grace` seconds overdue when the previous pass ends is skipped, so a slow pass
  never causes a burst of catch-up passes.
- `Backoff`: the n-th wait after a success is min(cap, first * 2**n) times a random factor in
  [0.5, 1.0) ("equal jitter", AWS Architecture Blog, "Exponential Backoff And Jitter", 2015): never
  more than the cap, never less than half the nominal wait, and spread so that many gateways
  that lost the same broker or device do not retry in step. A second, higher cap may apply to
  attempts that reached the other side but achieved nothing (the forwarder's
  `mqtt.reconnect_max_stalled`).
"""

from __future__ import annotations

import asyncio
import math
import random


class Ticks:
    """An async iterator of tick numbers 0, 1, 2, ... on a drift-free schedule; see `ticks`."""

    def __init__(self, interval: float, grace: float) -> None:
        self.interval = interval
        self.grace = grace
        self._start: float | None = None
        self._tick = 0

    def __aiter__(self) -> Ticks:
        return self

    async def __anext__(self) -> int:
        loop = asyncio.get_running_loop()
        if self._start is None:  # the first tick is due at once
            self._start = loop.time()
            return 0
        self._tick += 1
        late = loop.time() - (self._start + self._tick * self.interval)
        if late > self.grace:  # skip to the first tick no more than `grace` overdue
            self._tick += math.ceil((late - self.grace) / self.interval)
        await asyncio.sleep(max(self._start + self._tick * self.interval - loop.time(), 0.0))
        return self._tick


def ticks(interval: float, *, grace: float = 0.0) -> Ticks:
    """Tick numbers, each yielded when due: tick n at start + n * `interval` seconds.

    The first tick (0) is yielded at once; "start" is that moment, on the event loop's clock.
    Tick numbers count intervals since start, so a skipped tick leaves a gap in the numbers.
    `grace` (seconds) is how late a tick may still run: the default 0 skips every tick whose
    time has passed when the previous pass ends (a device poll that overran waits for the next
    slot instead of polling back to back); a source whose ticks are data (the simulated one)
    runs a tick up to one interval late instead.
    """
    if interval <= 0:
        raise ValueError(f"tick interval must be positive, not {interval}")
    return Ticks(interval, grace)


class Backoff:
    """Capped exponential backoff with jitter; `reset` after a success.

    `first` and `cap` are seconds. `next()` returns the wait before the next attempt: the n-th
    call since the last reset returns min(cap, first * 2**n) * uniform(0.5, 1.0).

    A loop whose failures differ in cost may give a second, higher ceiling, `stalled_cap`
    (seconds, never below `cap`): `next(stalled=True)` after an attempt that reached the other
    side but achieved nothing (a broker that accepts the connection and takes no batch: every
    attempt costs it a session) waits up to it, `next()` after one that reached nothing (which
    costs nobody anything) still waits at most `cap`. The nominal wait doubles up to
    `stalled_cap` with either kind of failure, so the delay keeps growing until `reset`, however
    the failures alternate. Without `stalled_cap`, both kinds wait at most `cap`.
    """

    def __init__(self, first: float, cap: float, stalled_cap: float | None = None) -> None:
        self.first = first
        self.cap = cap
        self.stalled_cap = cap if stalled_cap is None else max(stalled_cap, cap)
        self._nominal = first

    def next(self, *, stalled: bool = False) -> float:
        """The wait (seconds) before the next attempt; the one after it is twice as long.

        `stalled`: the attempt reached the other side but made no progress (see the class).
        """
        ceiling = self.stalled_cap if stalled else self.cap
        wait = min(self._nominal, ceiling) * random.uniform(0.5, 1.0)  # noqa: S311 - jitter only
        self._nominal = min(self._nominal * 2, self.stalled_cap)
        return wait

    def reset(self) -> None:
        """After a success: the next wait is `first` again."""
        self._nominal = self.first
