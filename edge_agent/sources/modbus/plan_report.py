"""`check-config --plan`: the Modbus reads the agent will send for each device, before it runs.

Shows what coalescing bought (requests per poll against one read per point) and which points
each read serves, so a gap that should not be bridged, or a limit set too high, is visible
without touching a device.
"""

from __future__ import annotations

import sys
from typing import TextIO

from edge_agent.config.modbus import ModbusSourceConfig, shared_link_problems
from edge_agent.config.schema import Config
from edge_agent.sources.modbus.plan import naive_count, plan_reads


def print_plans(config: Config, out: TextIO = sys.stdout) -> None:
    """One block per Modbus source, and any conflict between sources sharing a line."""
    sources = [s for s in config.sources if isinstance(s, ModbusSourceConfig)]
    if not sources:
        print("No Modbus sources: nothing to plan.", file=out)
        return
    for source in sources:
        print(file=out)
        print_plan(source, out)
    for loc, message in shared_link_problems(config.sources):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        print(f"warning: {path}: {message}", file=out)


def print_plan(source: ModbusSourceConfig, out: TextIO) -> None:
    requests = plan_reads(
        source.points,
        max_registers=source.max_registers_per_read,
        max_bits=source.max_bits_per_read,
        max_gap=source.max_gap,
    )
    print(
        f"{source.name} ({source.describe()}), every {source.poll_interval:g}s: "
        f"{len(source.points)} points in {len(requests)} requests per poll "
        f"({naive_count(source.points)} without coalescing; max_gap {source.max_gap}, "
        f"max {source.max_registers_per_read} registers / {source.max_bits_per_read} bits)",
        file=out,
    )
    for request in requests:
        members = [source.points[i] for i in request.points]
        used: set[int] = set()
        for point in members:
            used.update(range(point.address, point.address + point.width))
        unused = request.count - len(used)
        names = ", ".join(p.name for p in members)
        gap = f", {unused} unused" if unused else ""
        print(f"  FC{request.function_code} {request.describe()}{gap}: {names}", file=out)
