"""Sources of readings, one module per protocol; SOURCE_TYPES maps a config `type` to its class."""

from __future__ import annotations

from typing import Any

from edge_agent.sources.base import Emit, Source, SourceState
from edge_agent.sources.simulated import SimulatedSource


def build_source(config: Any) -> Source:
    """The source for one validated source config; imports protocol stacks only when used."""
    if config.type == "simulated":
        return SimulatedSource(config)
    if config.type == "modbus":
        from edge_agent.sources.modbus.source import ModbusSource  # noqa: PLC0415 - lazy: heavy import

        return ModbusSource(config)
    if config.type == "opcua":
        from edge_agent.sources.opcua.source import OpcuaSource  # noqa: PLC0415 - lazy: heavy import

        return OpcuaSource(config)
    raise ValueError(f"unknown source type {config.type!r}")


__all__ = ["Emit", "Source", "SourceState", "build_source"]
