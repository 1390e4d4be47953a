"""Report by exception: which polled values are worth sending.

Without a deadband every good value is sent on every poll. With one, a value is sent when it
moved more than the deadband from the last value sent (0: on any change), when its quality
changed, or when `heartbeat` has passed since it was last sent, so a consumer can tell a steady
value from a dead link. A bad point is sent when it turns bad and then once per heartbeat: an
outage of days should not write a null every second.
"""

from __future__ import annotations

from edge_agent.reading import Quality, Value


class ReportFilter:
    """The memory of one point: what was last sent, and when."""

    __slots__ = ("_at", "_quality", "_value", "deadband", "heartbeat")

    def __init__(self, deadband: float | None, heartbeat: float) -> None:
        self.deadband = deadband
        self.heartbeat = heartbeat
        self._value: Value = None
        self._quality: Quality | None = None
        self._at = 0.0

    def admit(self, value: Value, quality: Quality, now: float) -> bool:
        """True when this sample should be sent; remembers it if so."""
        if not self._due(value, quality, now):
            return False
        self._value, self._quality, self._at = value, quality, now
        return True

    def _due(self, value: Value, quality: Quality, now: float) -> bool:
        if quality != self._quality or now - self._at >= self.heartbeat:
            return True
        if quality == Quality.BAD:
            return False
        if self.deadband is None:
            return True
        last = self._value
        if _is_number(value) and _is_number(last):
            assert isinstance(value, int | float) and isinstance(last, int | float)
            moved = abs(value - last)
            return moved > self.deadband if self.deadband > 0 else moved != 0
        return value != last


def _is_number(value: Value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
