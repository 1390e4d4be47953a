"""fresh_copy: equal copies of validated config values, made of new objects (memory layout)."""

from __future__ import annotations

import pytest

from edge_agent.config import parse_config
from edge_agent.config.fresh import fresh_copy

pytestmark = pytest.mark.unit

CONFIG = """
gateway: {id: gw-1}
mqtt: {url: "mqtt://broker.example:1883"}
store: {path: /var/lib/edge-agent/buffer.db}
sources:
  - type: modbus
    name: plc-12345
    host: 10.0.0.12
    poll_interval: 1.5s
    points:
      - {name: line1.temperature, register: holding, address: 300, type: float32, scale: 0.1}
"""


def test_fresh_copy_is_equal_and_shares_no_text() -> None:
    config = parse_config(CONFIG)
    copy = fresh_copy(config)
    assert copy == config
    assert copy.model_dump() == config.model_dump()
    source, original = copy.sources[0], config.sources[0]
    assert source.host == original.host and source.host is not original.host
    assert source.name is not original.name
    assert source.poll_interval == original.poll_interval
    # the text of the file (literals of the code, such as defaults, are shared on purpose)
    assert copy.gateway.id is not config.gateway.id
    assert copy.mqtt.url == config.mqtt.url
    point_names = [p.name for p in source.points], [p.name for p in original.points]
    assert point_names[0] == point_names[1]
    assert all(a is not b for a, b in zip(*point_names, strict=True))


def test_fresh_copy_keeps_plain_values_and_types() -> None:
    value = {"a": [1, 2.5, "x" * 20, (3, "y" * 20)], "b": None, "c": True, 700: 1e300}
    copy = fresh_copy(value)
    assert copy == value
    assert type(copy["a"][3]) is tuple and copy["c"] is True
