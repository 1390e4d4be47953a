"""Running real ModbusSource instances in a test and awaiting what they emit, with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import pytest

from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.reading import Reading
from edge_agent.sources.base import SourceState
from edge_agent.sources.modbus.link import LinkPool
from edge_agent.sources.modbus.source import ModbusSource
from helpers.wait import describe

WAIT = 5.0
"""Seconds any single expected poll may take before the test fails."""


def source_config(port: int, points: list[dict[str, Any]], **extra: Any) -> ModbusSourceConfig:
    """A TCP source on 127.0.0.1:`port` polling every 50 ms, with short timeouts and backoff."""
    data = {"type": "modbus", "name": extra.pop("name", "plc"), "host": "127.0.0.1",
            "port": port, "poll_interval": "50ms", "timeout": "200ms", "points": points,
            "reconnect_min": "50ms", "reconnect_max": "200ms", **extra}  # fmt: skip
    return ModbusSourceConfig.model_validate(data)


def rtu_config(serial_port: str, unit: int) -> ModbusSourceConfig:
    """An RTU source for `unit` on `serial_port` at 115200 baud, polling every 100 ms."""
    return ModbusSourceConfig.model_validate({
        "type": "modbus", "name": f"unit{unit}", "transport": "rtu", "serial_port": serial_port,
        "baudrate": 115200, "parity": "N", "unit_id": unit, "poll_interval": "100ms",
        "timeout": "150ms", "points": [
            {"name": "level", "register": "holding", "address": 0, "type": "float32"},
            {"name": "count", "register": "input", "address": 5, "type": "uint16"},
        ],
    })  # fmt: skip


class Polls:
    """The running source and the batches it emitted, one per poll with something to send."""

    def __init__(self, source: ModbusSource) -> None:
        self.source = source
        self.queue: asyncio.Queue[list[Reading]] = asyncio.Queue()

    async def emit(self, readings: Sequence[Reading]) -> None:
        await self.queue.put(list(readings))

    async def next(self) -> dict[str, Reading]:
        """The next poll's readings by point name; TimeoutError if none comes within WAIT s."""
        try:
            batch = await asyncio.wait_for(self.queue.get(), WAIT)
        except TimeoutError:
            raise TimeoutError(
                f"no poll from source {self.source.name} within {WAIT:g}s "
                f"(last error: {self.source.state.last_error})"
            ) from None
        return {r.pt: r for r in batch}

    async def until(self, predicate: Callable[[dict[str, Reading]], object]) -> dict[str, Reading]:
        """The first poll whose readings satisfy `predicate`, within WAIT s."""
        last: dict[str, Reading] | None = None
        loop = asyncio.get_running_loop()
        end = loop.time() + WAIT
        while loop.time() < end:
            try:
                batch = await asyncio.wait_for(self.queue.get(), end - loop.time())
            except TimeoutError:
                break
            last = {r.pt: r for r in batch}
            if predicate(last):
                return last
        raise TimeoutError(
            f"no poll from source {self.source.name} satisfied {describe(predicate)} within "
            f"{WAIT:g}s; last poll: {last}"
        )

    async def source_state_until(self, predicate: Callable[[SourceState], object]) -> None:
        """Poll the source's state (every 10 ms, at most WAIT s) until `predicate(state)` holds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + WAIT
        while not predicate(self.source.state):
            if loop.time() >= end:
                raise TimeoutError(
                    f"source {self.source.name} state never satisfied {describe(predicate)} "
                    f"within {WAIT:g}s; state: {self.source.state}"
                )
            await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(*configs: ModbusSourceConfig) -> AsyncIterator[list[Polls]]:
    """Run one source per config for the block; on exit each must end only by cancellation."""
    links = LinkPool()  # one pool, as an agent has: sources with the same link_key share a link
    polls = [Polls(ModbusSource(c, links)) for c in configs]
    tasks = [asyncio.create_task(p.source.run(p.emit), name=p.source.name) for p in polls]
    try:
        yield polls
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with pytest.raises(asyncio.CancelledError):
                await task  # run ends only by cancellation, never by raising
