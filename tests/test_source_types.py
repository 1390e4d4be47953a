"""The SOURCE_TYPES registry: one factory per source `type` the configuration accepts."""

from __future__ import annotations

import typing

import pytest

from edge_agent.config.schema import SourceConfig
from edge_agent.config.simulated import SimulatedSourceConfig
from edge_agent.sources import SOURCE_TYPES, SourceContext, build_source
from edge_agent.sources.simulated import SimulatedSource

pytestmark = pytest.mark.unit


def test_every_configurable_source_type_has_a_factory_and_no_other() -> None:
    models = typing.get_args(typing.get_args(SourceConfig)[0])
    types = {typing.get_args(m.model_fields["type"].annotation)[0] for m in models}
    assert set(SOURCE_TYPES) == types


def test_a_factory_builds_its_source_and_refuses_another_types_config() -> None:
    config = SimulatedSourceConfig(type="simulated", name="sim", points=2)
    assert isinstance(build_source(config, SourceContext()), SimulatedSource)
    with pytest.raises(TypeError, match="source 'sim': expected a ModbusSourceConfig"):
        SOURCE_TYPES["modbus"](config, SourceContext())
