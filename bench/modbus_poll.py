"""Benchmark: 10 Modbus TCP devices x 200 points polled every second by the real ModbusSource.

The devices run in a separate process (pymodbus servers), so only the agent side is measured:
process CPU time of this process over the run, against one core. Prints requests per poll
with and without coalescing.

    .venv/bin/python bench/modbus_poll.py [--devices 10] [--points 200] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.reading import Reading
from edge_agent.sources.modbus.link import LinkPool
from edge_agent.sources.modbus.plan import naive_count
from edge_agent.sources.modbus.source import ModbusSource

TYPES = ["float32", "uint16", "int16", "int32", "float32", "uint16", "float64", "bool"]


def point_specs(count: int) -> list[dict[str, Any]]:
    """A realistic map: mixed types, packed with a small hole every 20 points."""
    points, address = [], 0
    for i in range(count):
        type_ = TYPES[i % len(TYPES)]
        spec: dict[str, Any] = {
            "name": f"p{i}",
            "register": "holding",
            "address": address,
            "type": type_,
        }
        if type_ == "bool":
            spec["bit"] = i % 16
        if type_ in ("int16", "uint16"):
            spec["scale"] = 0.1
        points.append(spec)
        address += {"float32": 2, "int32": 2, "float64": 4}.get(type_, 1)
        if i % 20 == 19:
            address += 3
    return points


def register_span(count: int) -> int:
    points = point_specs(count)
    return max(p["address"] for p in points) + 4


async def serve(devices: int, registers: int) -> None:
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # clients leaving at the end
    ports = []
    for _ in range(devices):
        device = SimDevice(
            id=1,
            simdata=[
                SimData(
                    0,
                    values=[(i * 37) & 0xFFFF for i in range(registers)],
                    datatype=DataType.REGISTERS,
                )
            ],
        )
        server = ModbusTcpServer([device], address=("127.0.0.1", 0))
        await server.serve_forever(background=True)
        ports.append(server.transport.sockets[0].getsockname()[1])
    print(json.dumps(ports), flush=True)
    await asyncio.Event().wait()


async def bench(ports: list[int], points: int, seconds: float) -> None:
    specs = point_specs(points)
    links = LinkPool()
    sources = [
        ModbusSource(
            ModbusSourceConfig.model_validate(
                {
                    "type": "modbus",
                    "name": f"dev{i}",
                    "host": "127.0.0.1",
                    "port": port,
                    "poll_interval": "1s",
                    "timeout": "1s",
                    "points": specs,
                }
            ),
            links,
        )
        for i, port in enumerate(ports)
    ]
    counted = {"readings": 0, "bad": 0}

    async def sink(readings: Sequence[Reading]) -> None:
        counted["readings"] += len(readings)
        counted["bad"] += sum(r.value is None for r in readings)

    tasks = [asyncio.create_task(s.run(sink), name=s.name) for s in sources]
    await asyncio.sleep(2.0)  # warm-up: connections made, first polls done
    start_cpu, start_wall = time.process_time(), time.monotonic()
    start_readings = counted["readings"]
    start_requests = sum(s.state.counts["requests"] for s in sources)
    await asyncio.sleep(seconds)
    cpu, wall = time.process_time() - start_cpu, time.monotonic() - start_wall
    readings = counted["readings"] - start_readings
    requests = sum(s.state.counts["requests"] for s in sources) - start_requests
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    naive = naive_count(sources[0]._points) * len(sources)
    planned = sum(len(s.plan) for s in sources)
    print(f"devices={len(sources)} points/device={points} interval=1s run={wall:.1f}s")
    print(f"requests per poll (all devices): {naive} without coalescing, {planned} planned")
    print(f"requests sent: {requests} ({requests / wall:.1f}/s)")
    print(f"readings: {readings} ({readings / wall:.0f}/s), bad: {counted['bad']}")
    print(f"agent CPU: {cpu:.2f}s over {wall:.1f}s = {100 * cpu / wall:.2f}% of one core")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.devices, register_span(args.points)))
        return
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            "--devices",
            str(args.devices),
            "--points",
            str(args.points),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ports = json.loads(proc.stdout.readline())
        asyncio.run(bench(ports, args.points, args.seconds))
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
