"""Sources of readings, one module per protocol; SOURCE_TYPES maps a config `type` to its factory.

A protocol stack is imported only when a source that uses it is built: a Modbus-only gateway never
loads asyncua, an OPC UA-only one never loads pymodbus.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.config.opcua import OpcuaSourceConfig
from edge_agent.config.schema import SourceConfig
from edge_agent.config.simulated import SimulatedSourceConfig
from edge_agent.sources.base import Emit, Source, SourceState
from edge_agent.sources.simulated import SimulatedSource

if TYPE_CHECKING:
    from edge_agent.sources.modbus.link import LinkPool


class SourceContext:
    """What the sources of one agent share: the agent makes one and passes it to `build_source`.

    Today that is the pool of Modbus links (sources on one connection or serial line share a
    link). The pool is made when the first Modbus source asks for it, so that a gateway without
    Modbus sources does not import pymodbus.
    """

    def __init__(self, prepared: dict[str, object] | None = None) -> None:
        self._modbus_links: LinkPool | None = None
        self.prepared: dict[str, object] = prepared or {}
        """What `prepare_source` made of a source's config, by source name: its builder takes it
        (once) in place of what the light config it is given leaves out."""

    @property
    def modbus_links(self) -> LinkPool:
        """The Modbus link pool of this agent (one for all its Modbus sources)."""
        if self._modbus_links is None:
            from edge_agent.sources.modbus.link import LinkPool  # noqa: PLC0415 - lazy: pymodbus

            self._modbus_links = LinkPool()
        return self._modbus_links


SourceFactory = Callable[[SourceConfig, SourceContext], Source]
"""Builds the source for one validated config of its type, with what sources share."""

C = TypeVar("C", ModbusSourceConfig, OpcuaSourceConfig, SimulatedSourceConfig)


def _expect(config: SourceConfig, kind: type[C]) -> C:
    if not isinstance(config, kind):
        raise TypeError(f"source {config.name!r}: expected a {kind.__name__}, got {config!r}")
    return config


def _simulated(config: SourceConfig, context: SourceContext) -> Source:
    return SimulatedSource(_expect(config, SimulatedSourceConfig))


def _modbus(config: SourceConfig, context: SourceContext) -> Source:
    from edge_agent.sources.modbus.source import ModbusSource  # noqa: PLC0415 - lazy: pymodbus

    points = context.prepared.pop(config.name, None)
    return ModbusSource(_expect(config, ModbusSourceConfig), context.modbus_links, points)


def _opcua(config: SourceConfig, context: SourceContext) -> Source:
    from edge_agent.sources.opcua.source import OpcuaSource  # noqa: PLC0415 - lazy: asyncua

    return OpcuaSource(_expect(config, OpcuaSourceConfig))


SOURCE_TYPES: dict[str, SourceFactory] = {
    "simulated": _simulated,
    "modbus": _modbus,
    "opcua": _opcua,
}
"""Config `type` -> factory; a new protocol adds its config model to the union and a line here."""


def prepare_source(config: SourceConfig) -> tuple[SourceConfig, object | None]:
    """A lighter config of one source and what it leaves out, in a compact form, or None.

    What a child process that validated the file hands back (edge_agent/config/isolated.py):
    for a Modbus source, its config without `points` and the points by column (`PointTable`:
    a few bytes a point beyond its name, where the config holds a pydantic model). A source
    built from the light config takes the rest from `SourceContext.prepared` under its name.
    Other types come back as they are.
    """
    if isinstance(config, ModbusSourceConfig):
        from edge_agent.sources.modbus.plan import PointSpec, PointTable  # noqa: PLC0415

        table = PointTable(PointSpec.of(p) for p in config.points)
        return config.model_copy(update={"points": []}), table
    return config, None


def build_source(config: SourceConfig, context: SourceContext) -> Source:
    """The source for one validated source config; ValueError for a type with no factory."""
    factory = SOURCE_TYPES.get(config.type)
    if factory is None:
        raise ValueError(f"unknown source type {config.type!r}")
    return factory(config, context)


__all__ = [
    "SOURCE_TYPES",
    "Emit",
    "Source",
    "SourceContext",
    "SourceFactory",
    "SourceState",
    "build_source",
    "prepare_source",
]
