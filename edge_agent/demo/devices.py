"""The demo's simulated plant: a Modbus TCP device and a secured OPC UA server, on free ports.

Each device is started on the demo's exit stack (so it stops on every way out) and answers with
the agent's source configuration for it.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("edge_agent.demo")


async def start_devices(stack: contextlib.AsyncExitStack, state_dir: Path) -> list[dict[str, Any]]:
    """Start every simulated device; return the agent's source config for each one running."""
    sources: list[dict[str, Any]] = []
    for start in (_modbus, _opcua):
        source = await start(stack, state_dir)
        if source is not None:
            sources.append(source)
    return sources


async def _modbus(stack: contextlib.AsyncExitStack, state_dir: Path) -> dict[str, Any] | None:
    """A motor PLC whose values change with the clock; polled, so report-by-exception shows."""
    del state_dir
    from edge_agent.demo.modbus_device import modbus_points, start_modbus_device  # noqa: PLC0415

    port, stop = await start_modbus_device("127.0.0.1", 0)
    stack.push_async_callback(stop)
    return {
        "type": "modbus",
        "name": "plc",
        "transport": "tcp",
        "host": "127.0.0.1",
        "port": port,
        "unit_id": 1,
        "poll_interval": "500ms",
        "points": modbus_points(),
    }


async def _opcua(stack: contextlib.AsyncExitStack, state_dir: Path) -> dict[str, Any] | None:
    """A mill SCADA server, Basic256Sha256 SignAndEncrypt, its demo certificate pinned."""
    from edge_agent.demo.opcua_device import DemoOpcuaServer  # noqa: PLC0415 - asyncua is slow

    server = await stack.enter_async_context(DemoOpcuaServer(state_dir / "opcua", port=0))
    return server.source_config(name="scada", pki_dir=state_dir / "opcua" / "client-pki")
