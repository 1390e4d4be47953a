"""Benchmark: CPU per Modbus TCP request through the agent's link, one request after another.

One pymodbus server runs in a separate process; this process sends `--requests` reads of
`--count` holding registers through `ModbusLink.read` (the path every poll takes) and reports
its own CPU time per request (user + system), best of `--rounds` rounds, since the machine is
shared and a round can be slowed by others.

    .venv/bin/python bench/modbus_requests.py [--requests 3000] [--count 60] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.sources.modbus.link import LinkPool, ReadError
from edge_agent.sources.modbus.plan import ReadRequest

SERVER = Path(__file__).with_name("modbus_poll.py")


async def measure(port: int, requests: int, count: int, rounds: int) -> list[float]:
    config = ModbusSourceConfig.model_validate({
        "type": "modbus", "name": "bench", "host": "127.0.0.1", "port": port, "timeout": "2s",
        "reconnect_min": "100ms", "reconnect_max": "100ms",
        "points": [{"name": "a", "register": "holding", "address": 0}],
    })  # fmt: skip
    links = LinkPool()
    link = links.acquire(config)
    request = ReadRequest("holding", 0, count, ())
    try:
        for _ in range(50):
            try:
                await link.read(request, unit=1, wait=2.0, device="bench")
                break
            except ReadError:
                await asyncio.sleep(0.1)
        results = []
        for _ in range(rounds):
            before = os.times()
            for _ in range(requests):
                await link.read(request, unit=1, wait=2.0, device="bench")
            after = os.times()
            cpu = (after.user - before.user) + (after.system - before.system)
            results.append(cpu / requests * 1e6)
        return results
    finally:
        links.release(config, link)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--serve", "--devices", "1", "--points", "100"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        (port,) = json.loads(proc.stdout.readline())
        results = asyncio.run(measure(port, args.requests, args.count, args.rounds))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    shown = " ".join(f"{r:.0f}" for r in results)
    print(f"requests={args.requests} x {args.rounds} rounds, {args.count} registers each")
    print(f"agent CPU per request: best {min(results):.0f} us (rounds: {shown} us)")


if __name__ == "__main__":
    main()
