"""The agent's two clocks: the wall clock it stamps, and the monotonic clock it measures with.

Reading times and a batch's `sealed` are the wall clock as read, stepped or not: that is what the
gateway believed, and a consumer is told how far to trust it by the batch's `clock` map
(`state`, docs/contract.md §4.3). Everything the agent measures (timers, backoffs, the age of a
buffered batch for `store.max_age`, the ages in /status) uses CLOCK_MONOTONIC, which a step of
the wall clock does not move.

The age clock. A buffered batch records when it was sealed on the *age clock*: the monotonic
clock plus an anchor, `age = monotonic + anchor`, where the anchor is the wall clock minus the
monotonic clock when the boot's first agent started (kept in the buffer's meta, `adopt`). It
reads like the wall clock until the wall clock is stepped, and never jumps: within a boot, a
batch's age is exact whatever the wall clock did. A new boot starts a new anchor from the wall
clock (monotonic time restarts at boot), so ages across a reboot are wall-clock differences.

A step is a change of `wall - age` by STEP_NS or more between two `check`s, a second apart in
the agent (an NTP slew moves both clocks alike; only a step moves one, and a drift between
checks is followed, not summed). It is logged once with its size and counted.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from edge_agent.clock.kernel import KernelClock, boot_id, read_kernel_clock

log = logging.getLogger(__name__)

STEP_NS = 100_000_000
"""A change of `wall - monotonic` this large is a step (ntpd steps above 128 ms, chrony's
makestep is usually 1 s; a slew moves it by at most 0.5 ms/s)."""
KERNEL_EVERY_NS = 1_000_000_000
"""The kernel's clock state is read at most this often, however many batches are sealed."""
PAIR_SPREAD_NS = 1_000_000
"""A wall reading is taken between two monotonic ones no further apart than this (retried)."""


@dataclass(frozen=True)
class Step:
    """A step of the wall clock: `size_ns` (positive: forward) and the wall time after it."""

    size_ns: int
    wall_ns: int


class ClockWatch:
    """The clock state for each batch, the age clock, and the detection of wall-clock steps.

    Not thread-safe; used from the event loop. `wall_ns`, `mono_ns` and `kernel` are the
    clocks read (time.time_ns, time.monotonic_ns, adjtimex); tests pass their own.
    """

    def __init__(
        self,
        *,
        boot: str | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
        mono_ns: Callable[[], int] = time.monotonic_ns,
        kernel: Callable[[], KernelClock] = read_kernel_clock,
    ) -> None:
        self.boot = boot_id() if boot is None else boot
        self._wall, self._mono, self._read_kernel = wall_ns, mono_ns, kernel
        self._kernel: KernelClock | None = None
        self._kernel_at = 0
        wall, mono = self._pair()
        self.anchor_ns = wall - mono
        """The age clock is `monotonic + anchor_ns` (ns)."""
        self.offset_ns = 0
        """`wall - age` as of the last check (ns): the sum of the steps since the anchor."""
        self.steps = 0
        """Steps detected by this process."""
        self.last_step: Step | None = None

    def adopt(self, boot: object, anchor_ns: object, offset_ns: object) -> Step | None:
        """Continue the age clock of an earlier run, if it ran in this boot (values as kept by
        `persisted`, None or anything else: a new boot or no earlier run). Returns the step the
        wall clock made while the agent was stopped, if any (logged and counted as any step)."""
        if boot != self.boot or not self.boot or type(anchor_ns) is not int:
            return None
        self.anchor_ns = anchor_ns
        self.offset_ns = offset_ns if type(offset_ns) is int else 0
        return self.check(while_stopped=True)

    def persisted(self) -> dict[str, int | str]:
        """What `adopt` needs at the next start: `{"clock_boot", "clock_anchor_ns",
        "clock_offset_ns"}` (kept in the buffer's meta)."""
        return {
            "clock_boot": self.boot,
            "clock_anchor_ns": self.anchor_ns,
            "clock_offset_ns": self.offset_ns,
        }

    def wall_ns(self) -> int:
        """Now on the wall clock (ns since the Unix epoch), as read: what a batch's `sealed` is."""
        return self._wall()

    def age_ns(self) -> int:
        """Now on the age clock (ns since the epoch as of the anchor); never jumps in a boot."""
        return self._mono() + self.anchor_ns

    def check(self, *, while_stopped: bool = False) -> Step | None:
        """Look for a step of the wall clock since the last check; log and count one found."""
        wall, mono = self._pair()
        offset = wall - (mono + self.anchor_ns)
        size = offset - self.offset_ns
        self.offset_ns = offset  # a slow drift, if any, is followed, never summed into a step
        if abs(size) < STEP_NS:
            return None
        self.steps += 1
        self.last_step = step = Step(size, wall)
        log.warning(
            "Wall clock stepped%s step_s=%+.3f now=%s: reading times and `sealed` follow the wall"
            " clock; ages, timers and store.max_age follow the monotonic clock",
            " while the agent was stopped" if while_stopped else "", size / 1e9, _iso(wall),
        )  # fmt: skip
        return step

    def state(self) -> dict[str, Any]:
        """The `clock` map of a batch sealed now (docs/contract.md §4.3): `{"synced": bool,
        "error_ns": int | None, "boot": str, "mono": int}`. The kernel is asked at most once
        every KERNEL_EVERY_NS; `mono` is read each time."""
        mono = self._mono()
        if self._kernel is None or mono - self._kernel_at >= KERNEL_EVERY_NS:
            self._kernel, self._kernel_at = self._read_kernel(), mono
        kernel = self._kernel
        return {"synced": kernel.synced, "error_ns": kernel.error_ns, "boot": self.boot,
                "mono": mono}  # fmt: skip

    def status(self) -> dict[str, Any]:
        """The `clock` section of /status (docs/contract.md §3), strict-JSON ready."""
        state = self.state()
        step = self.last_step
        return {
            "synced": state["synced"],
            "error_ns": state["error_ns"],
            "boot": self.boot,
            "steps": self.steps,
            "last_step_s": None if step is None else round(step.size_ns / 1e9, 3),
            "last_step_at": None if step is None else _iso(step.wall_ns),
            "offset_s": round(self.offset_ns / 1e9, 3),
        }

    def _pair(self) -> tuple[int, int]:
        """(wall, monotonic) read together: a wall reading between two monotonic ones."""
        for _ in range(3):
            before = self._mono()
            wall = self._wall()
            after = self._mono()
            if after - before < PAIR_SPREAD_NS:
                break
        return wall, (before + after) // 2


def _iso(wall_ns: int) -> str:
    try:
        return datetime.fromtimestamp(wall_ns / 1e9, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return str(wall_ns)
