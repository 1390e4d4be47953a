"""The contract every source keeps: `run(emit)` forever, and a state that health can read."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from edge_agent.reading import Reading

Emit = Callable[[Sequence[Reading]], Awaitable[None]]
"""Hands readings to the batcher; awaiting it applies back-pressure when the queue is full."""


@dataclass
class SourceState:
    """What /status shows of a source; a source updates it, nobody else does."""

    up: bool = False
    last_error: str | None = None
    readings: int = 0
    errors: int = 0
    since: float = field(default_factory=time.time)
    counts: Counter[str] = field(default_factory=Counter)
    """Per-kind counts the protocol keeps (Modbus: requests, timeout, exception, short, ...)."""

    def mark_up(self) -> bool:
        """Record success; True when this is a change of state (worth one log line)."""
        changed = not self.up
        if changed:
            self.up, self.since = True, time.time()
        self.last_error = None
        return changed

    def mark_down(self, error: str) -> bool:
        """Record failure; True when the state or the error changed (worth one log line)."""
        changed = self.up or self.last_error != error
        self.errors += 1
        if changed:
            self.up, self.last_error, self.since = False, error, time.time()
        return changed


class Source(Protocol):
    """A source of readings; a failure inside it marks it down and never escapes `run`."""

    name: str
    state: SourceState

    async def run(self, emit: Emit) -> None: ...
