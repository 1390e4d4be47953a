"""Configuration of the simulated source: deterministic signals for demos, tests and benchmarks."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from edge_agent.config.blocks import MAX_POINTS
from edge_agent.config.types import Duration, Finite, Name, StrictModel, duplicate_problems


class SimulatedPoint(StrictModel):
    name: Name
    signal: Literal["sine", "ramp", "square", "counter", "constant", "random"] = "sine"
    period: Duration = 60.0
    amplitude: Finite = 1.0
    offset: Finite = 0.0


class SimulatedSourceConfig(StrictModel):
    type: Literal["simulated"]
    name: Name
    interval: Duration = 1.0
    points: int | list[SimulatedPoint] = Field(default=10)

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-field problems, as (location relative to this source, message)."""
        if isinstance(self.points, int):
            if self.points < 1:
                return [(("points",), "must be at least 1")]
            if self.points > MAX_POINTS:
                return [(("points",), f"more than the {MAX_POINTS:,} points a configuration "
                         "may have")]  # fmt: skip
            return []
        return duplicate_problems([p.name for p in self.points], "points", "name")

    def point_list(self) -> list[SimulatedPoint]:
        """The points, a count expanded to default points named p0..pN-1."""
        if isinstance(self.points, int):
            return [SimulatedPoint(name=f"p{i}") for i in range(self.points)]
        return list(self.points)
