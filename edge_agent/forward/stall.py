"""How long the broker has owed us an answer: the clock behind `mqtt.ack_stall` and the link check.

A frozen broker (SIGSTOP, a hung process), a half-open path (a dead switch, a stalled VPN) and a
broker that stopped reading all look the same from the agent: the TCP connection stays up, the
kernel takes what is published, and nothing comes back. paho's own keep-alive check (paho-mqtt
2.2 `_check_keepalive`) notices only after two keep-alive periods: it sends a PINGREQ once the
link has been quiet for one, counts that as traffic received, and closes only when a second
period passes without a byte. This clock notices sooner and for the right reason: it measures the
time since the broker last answered (a PUBACK) while a publish awaits its answer, counted from the
later of that answer and the oldest unanswered publish. A slow link that keeps acknowledging,
however slowly the bytes go, never reaches a stall; a silent one does, whatever the cause.

A leaf module: times are `time.monotonic()` seconds passed in by the caller.
"""

from __future__ import annotations


class AnswerClock:
    """Publishes awaiting their PUBACK, by packet id, and when the broker last answered one."""

    def __init__(self, now: float) -> None:
        """`now`: the connection's start (its CONNACK), monotonic seconds."""
        self._sent: dict[int, float] = {}
        self.last_answer = now
        """Monotonic time of the broker's last PUBACK (or of the CONNACK before the first)."""

    def sent(self, mid: int, now: float) -> None:
        """Publish `mid` left for the broker at `now` and awaits its PUBACK."""
        self._sent.setdefault(mid, now)

    def answered(self, mid: int, now: float) -> None:
        """A PUBACK for `mid` (any reason code: the broker is alive) arrived at `now`."""
        self._sent.pop(mid, None)
        self.last_answer = now

    def forget(self, mid: int) -> None:
        """`mid` no longer awaits an answer (its publish was abandoned)."""
        self._sent.pop(mid, None)

    @property
    def waiting(self) -> int:
        """Publishes awaiting their PUBACK."""
        return len(self._sent)

    def overdue(self, now: float) -> float | None:
        """Seconds the broker has owed an answer without giving any, or None when nothing
        awaits one: `now` minus the later of the last answer and the oldest unanswered send."""
        if not self._sent:
            return None
        # Dicts keep insertion order and ids are inserted as sent: the first is the oldest.
        oldest = next(iter(self._sent.values()))
        return max(0.0, now - max(self.last_answer, oldest))
