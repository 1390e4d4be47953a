"""Issue 8, case 5: node ids written with their namespace URI (`nsu=`), resolved at every connect.

Namespace indexes are positions in the server's namespace table and may change when the server
restarts; the URI form is what users should write. These run on a real asyncua server that
registers its namespaces in a chosen order, and re-registers them in another order on restart.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from helpers.opcua_servers import (
    NAMESPACE,
    OTHER_NAMESPACE,
    Collector,
    UaTestServer,
    running,
    source_config,
)

from edge_agent.reading import Quality, Reading
from edge_agent.sources.opcua.source import OpcuaSource
from edge_agent.sources.opcua.values import BAD_NOT_CONNECTED

pytestmark = pytest.mark.integration

BAD_NODE_ID_UNKNOWN = 0x80340000
NOWHERE = "urn:example:nowhere"


def good_in(readings: list[Reading], point: str) -> list[object]:
    return [r.value for r in readings if r.pt == point and r.quality is Quality.GOOD]


def good(got: Collector, point: str) -> list[object]:
    return good_in(got.readings, point)


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_a_node_id_with_a_namespace_uri_is_read(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The field case: `nsu=...;s=...` for a namespace at index 3 passed check-config, then read
    BadNodeIdUnknown forever while `ns=3;...` worked. A URI the server does not have is a clear
    error naming the node and the URI, and only that node is bad."""
    async with UaTestServer(tmp_path, namespaces=(OTHER_NAMESPACE, NAMESPACE)) as server:
        assert server.indexes[NAMESPACE] == 3
        nodes = [
            {"name": "level", "node_id": f"nsu={NAMESPACE};s=Speed"},
            {"name": "level_by_index", "node_id": "ns=3;s=Speed"},
            {"name": "ghost", "node_id": f"nsu={NOWHERE};s=Speed"},
        ]
        source, got = OpcuaSource(source_config(server.endpoint, nodes, mode=mode)), Collector()
        with caplog.at_level(logging.INFO, logger="edge_agent"):
            async with running(source, got):
                await got.wait_for(lambda rs: {r.pt for r in rs} >= {"level", "ghost"})
                await server.write("Speed", 2.5)
                await got.wait_for(lambda rs: good_in(rs, "level")[-1:] == [2.5])
                await got.wait_for(lambda rs: good_in(rs, "level_by_index")[-1:] == [2.5])
    assert good(got, "level") == [1.5, 2.5]
    (ghost,) = got.of("ghost")
    assert (ghost.quality, ghost.value, ghost.code) == (Quality.BAD, None, BAD_NODE_ID_UNKNOWN)
    assert source.state.up
    (line,) = [r.getMessage() for r in caplog.records if "node is bad" in r.getMessage()]
    assert "node=ghost" in line and f"namespace {NOWHERE} is not on the server" in line
    assert NAMESPACE in line  # what the server has instead, to spot a typo


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_namespaces_renumbered_by_a_server_restart_are_followed(
    tmp_path: Path, mode: str
) -> None:
    """Another instance: the server restarts with its namespaces registered in the other order.
    A node id resolved once would now read the other namespace's node; both namespaces hold a
    Speed and a Label (its own URI), so a wrong resolution shows as a wrong value."""
    server = UaTestServer(tmp_path, namespaces=(OTHER_NAMESPACE, NAMESPACE))
    nodes = [
        {"name": "speed", "node_id": f"nsu={NAMESPACE};s=Speed"},
        {"name": "other_label", "node_id": f"nsu={OTHER_NAMESPACE};s=Label"},
    ]
    source, got = OpcuaSource(source_config(server.endpoint, nodes, mode=mode)), Collector()
    try:
        await server.start()
        async with running(source, got):
            await server.write("Speed", 2.0)
            await got.wait_for(lambda rs: any(r.value == 2.0 for r in rs))
            await server.stop()
            await got.wait_for(lambda rs: any(r.code == BAD_NOT_CONNECTED for r in rs))
            server.namespaces = (NAMESPACE, OTHER_NAMESPACE)
            await server.start()
            assert server.indexes == {NAMESPACE: 2, OTHER_NAMESPACE: 3}
            await server.write("Speed", -7.0, namespace=OTHER_NAMESPACE)
            await server.write("Speed", 7.0)
            await got.wait_for(lambda rs: any(r.value == 7.0 for r in rs))
            await got.wait_for(lambda rs: len(good_in(rs, "other_label")) >= 2)
    finally:
        await server.stop()
    assert -7.0 not in good(got, "speed")
    assert good(got, "speed")[-1] == 7.0
    assert set(good(got, "other_label")) == {OTHER_NAMESPACE}  # never NAMESPACE's "mill"
    assert len(good(got, "other_label")) == 2  # before and after the restart
