"""An agent built from a `Blueprint` (what the child process that validated the file hands back:
light source configs and their points by column) is the agent built from the validated config."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.sample_configs import TWO_PLCS_AND_SIM

from edge_agent.agent import Agent
from edge_agent.blueprint import Blueprint
from edge_agent.config import parse_config
from edge_agent.sources.modbus.source import ModbusSource

pytestmark = pytest.mark.unit

CONFIG = TWO_PLCS_AND_SIM


def test_an_agent_built_from_a_blueprint_is_the_agent_built_from_the_config(
    tmp_path: Path,
) -> None:
    config = parse_config(CONFIG.format(dir=tmp_path))
    blueprint = Blueprint.of(config)
    direct = Agent(config)
    built = Agent(blueprint.config, prepared=blueprint.prepared)
    built.compact()
    assert built._source_digests == direct._source_digests
    assert built.config == direct.config
    pairs = list(zip(built.sources, direct.sources, strict=True))
    assert [a.name for a, _ in pairs] == ["plc-1", "plc-2", "sim"]
    for a, b in pairs:
        if isinstance(a, ModbusSource):
            assert isinstance(b, ModbusSource)
            assert list(a._points) == list(b._points)
            assert a.plan == b.plan
            assert a._filters.keys() == b._filters.keys()
            assert a._config == b._config.model_copy(update={"points": []})
    assert not built.source_context.prepared, "every source took what was prepared for it"
