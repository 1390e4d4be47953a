"""The Modbus link alone, with a real pymodbus client: a device gone for hours stays down.

(How units on one port share a link: test_modbus_link_sharing.py.)
"""

from __future__ import annotations

import socket

import pytest

from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.sources.modbus.link import LinkDownError, LinkSettings, ModbusLink
from edge_agent.sources.modbus.plan import ReadRequest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


def closed_port() -> int:
    """A local TCP port that nothing listens on: connecting is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_a_device_gone_for_hours_stays_a_link_down_error() -> None:
    # Over 1024 failed connects the old backoff computed reconnect_min * 2**1024: OverflowError,
    # which the source logged with a traceback on every poll from then on.
    config = ModbusSourceConfig.model_validate({
        "type": "modbus", "name": "gone", "host": "127.0.0.1", "port": closed_port(),
        "timeout": "200ms", "reconnect_min": 1e-6, "reconnect_max": 1e-6,
        "points": [{"name": "level", "register": "holding", "address": 0, "type": "uint16"}],
    })  # fmt: skip
    link = ModbusLink(LinkSettings.of(config))
    request = ReadRequest("holding", 0, 1, (0,))
    for _ in range(1100):
        with pytest.raises(LinkDownError, match="refused or unreachable"):
            await link.read(request, unit=1, wait=0.2, device="gone")
    assert link.connects == 0
    link.close()
