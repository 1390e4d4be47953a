"""The demo OPC UA server and the source config it hands to the agent work together, secured."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from helpers.opcua_servers import Collector, running

from edge_agent.config.opcua import OpcuaSourceConfig
from edge_agent.demo.opcua_device import DemoOpcuaServer
from edge_agent.reading import Quality
from edge_agent.sources.opcua.source import OpcuaSource

pytestmark = pytest.mark.integration


async def test_demo_server_feeds_the_source_over_a_pinned_secure_channel(tmp_path: Path) -> None:
    async with DemoOpcuaServer(tmp_path, port=0) as server:
        assert server.certificate_path.exists()
        key = tmp_path / "demo-server-key.pem"
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        config = OpcuaSourceConfig.model_validate(server.source_config())
        assert config.security.policy == "Basic256Sha256"
        source, got = OpcuaSource(config), Collector()
        async with running(source, got):
            await got.wait_for(
                lambda rs: len({r.value for r in rs if r.pt == "mill_throughput"}) >= 3
            )
        assert {r.pt for r in got.readings} >= {"mill_speed", "mill_power", "mill_running"}
        assert all(r.quality is Quality.GOOD for r in got.readings)
