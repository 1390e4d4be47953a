"""When the backlog will be gone: the acknowledgement rate and the backlog's trend, over a window.

The forwarder reports every group of acknowledged batches (`acked`) and the health endpoint
looks (`estimate`); both pass the buffer's reading count, which the store keeps in memory, so an
estimate costs no SQL. Samples are kept at most every MIN_SPACING_S over the last `window_s`
seconds (a few dozen), plus the newest one older than the window, so a rate rests on the whole
window once the agent has run that long, and decays to 0 when acknowledgements stop. When they
start again after a pause of more than RESUME_GAP_S (an outage ends), the window starts over at
the first of them: the estimate of a drain that has just begun is not diluted by the outage.

A leaf module: times are `time.monotonic()` seconds passed in by the caller.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

WINDOW_S = 10.0
"""The recent window over which rates are measured."""
MIN_SPACING_S = 0.25
"""Samples closer than this replace the newest one instead of adding one."""
RESUME_GAP_S = 2.0
"""A pause in acknowledgements longer than this ends the window (see the module docstring)."""


@dataclass(frozen=True)
class Drain:
    """The drain over the recent window. Rates are per second; `net_readings_s` is how fast the
    backlog shrinks (acknowledged and evicted minus sealed; negative while it grows)."""

    acked_readings_s: float
    acked_batches_s: float
    net_readings_s: float
    eta_s: float | None
    """Seconds until the buffer is empty at the net rate: 0 when empty, None when not draining
    (the backlog grows or holds)."""
    window_s: float
    """The span the rates were measured over (shorter than WINDOW_S just after start)."""

    def to_json(self) -> dict[str, float | None]:
        """Rounded for /status: rates to 0.1/s, the estimate to 0.1 s."""
        return {
            "acked_readings_s": round(self.acked_readings_s, 1),
            "acked_batches_s": round(self.acked_batches_s, 1),
            "net_readings_s": round(self.net_readings_s, 1),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "window_s": round(self.window_s, 1),
        }


@dataclass(frozen=True)
class _Sample:
    at: float
    readings: int
    """Readings acknowledged since start (cumulative)."""
    batches: int
    backlog: int
    """Readings in the buffer."""


class DrainMeter:
    """Cumulative acknowledgements and backlog samples; see the module docstring."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window = window_s
        self._readings = 0
        self._batches = 0
        self._samples: deque[_Sample] = deque()
        self._last_ack: float | None = None

    def acked(self, readings: int, batches: int, backlog: int, now: float) -> None:
        """`batches` holding `readings` readings were acknowledged; `backlog` readings remain."""
        if self._last_ack is None or now - self._last_ack > RESUME_GAP_S:
            self._samples.clear()  # a new window, from just before this acknowledgement
            self._samples.append(_Sample(now, self._readings, self._batches, backlog + readings))
        self._last_ack = now
        self._readings += readings
        self._batches += batches
        self._sample(backlog, now)

    def estimate(self, backlog: int, now: float) -> Drain:
        """The drain up to `now`, with `backlog` readings buffered now."""
        self._sample(backlog, now)
        newest = self._samples[-1]
        base = self._samples[0]
        span = newest.at - base.at
        if span <= 0:
            return Drain(0.0, 0.0, 0.0, 0.0 if backlog == 0 else None, 0.0)
        net = (base.backlog - newest.backlog) / span
        if backlog == 0:
            eta: float | None = 0.0
        else:
            eta = backlog / net if net > 0 else None
        return Drain(
            acked_readings_s=(newest.readings - base.readings) / span,
            acked_batches_s=(newest.batches - base.batches) / span,
            net_readings_s=net,
            eta_s=eta,
            window_s=span,
        )

    def _sample(self, backlog: int, now: float) -> None:
        sample = _Sample(now, self._readings, self._batches, backlog)
        samples = self._samples
        if len(samples) > 1 and now - samples[-2].at < MIN_SPACING_S:
            samples[-1] = sample
        else:
            samples.append(sample)
        # Keep one sample at or before the window's start: the base of every rate.
        while len(samples) > 2 and samples[1].at <= now - self._window:
            samples.popleft()
