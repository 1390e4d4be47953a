"""What the batches' `clock` maps say of a gateway's clock, for the verifier's summary.

Per gateway: how many batches were sealed with a synchronised clock (their times trustworthy to
the error given), how many with an unsynchronised one (their times the gateway's guess), how
many carried no `clock` (agents before contract 1.14), the boots seen, the largest error, and
the steps of the wall clock seen between batches of one boot: within a boot, `sealed - mono` is
constant unless the wall clock was stepped, so a change of it is a step of that size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

from edge_agent.seal.envelope import Batch

STEP_NS = 100_000_000
"""A change of `sealed - mono` within a boot this large is a step (as the agent counts them)."""
MAX_SAMPLES = 1_000_000
"""`(mono, sealed - mono)` pairs kept per gateway (about 100 bytes each); past this, steps
are looked for in the batches kept only."""


@dataclass
class GatewayClock:
    """The tally of one gateway's batches; times in ns."""

    batches: int = 0
    synced: int = 0
    unsynced: int = 0
    without: int = 0
    max_error_ns: int | None = None
    boots: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    """Boot id -> `(mono, sealed - mono)` of its batches, as they came (resent ones too)."""

    def steps(self) -> list[int]:
        """The wall-clock steps between batches of one boot, in the order they were sealed."""
        found = []
        for samples in self.boots.values():
            ordered = sorted(samples)
            for (_, before), (_, after) in pairwise(ordered):
                if abs(after - before) >= STEP_NS:
                    found.append(after - before)
        return found


class ClockTally:
    """Counts what each batch says of its gateway's clock (`Batch.clock`); no I/O."""

    def __init__(self) -> None:
        self.gateways: dict[str, GatewayClock] = {}

    def add(self, batch: Batch) -> None:
        """Count one verified batch (a duplicate too: its clock is as it was sealed)."""
        tally = self.gateways.setdefault(batch.gateway, GatewayClock())
        tally.batches += 1
        clock = batch.clock
        if clock is None:
            tally.without += 1
            return
        if clock.synced:
            tally.synced += 1
            if clock.error_ns is not None:
                tally.max_error_ns = max(tally.max_error_ns or 0, clock.error_ns)
        else:
            tally.unsynced += 1
        samples = tally.boots.setdefault(clock.boot, [])
        if sum(map(len, tally.boots.values())) < MAX_SAMPLES:
            samples.append((clock.mono, batch.sealed_ns - clock.mono))

    def lines(self) -> list[str]:
        """One summary line per gateway, and a CLOCK line for each whose times are a guess."""
        out = []
        for gateway, t in self.gateways.items():
            error = "unknown" if t.max_error_ns is None else f"{t.max_error_ns / 1e6:g}ms"
            found = t.steps()
            steps = ", ".join(f"{s / 1e9:+.3f}s" for s in found[:10])
            out.append(
                f"clock: gateway={gateway} batches={t.batches} synced={t.synced} "
                f"unsynced={t.unsynced} without_clock={t.without} boots={len(t.boots)} "
                f"max_error={error} steps={len(found)}" + (f" ({steps})" if steps else "")
            )
            if t.unsynced or found:
                out.append(
                    f"CLOCK: gateway={gateway} {t.unsynced} of {t.batches} batches were sealed "
                    f"with an unsynchronised clock and {len(found)} wall-clock steps were "
                    "seen: their times are the gateway's guess, not a measured time"
                )
        return out
