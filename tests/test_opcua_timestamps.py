"""Issue 8, case 2: de-duplication must not key on timestamps the device does not guarantee.

A changed value or status is never dropped, whatever its timestamps: frozen (some PLC gateways
and simulators keep one SourceTimestamp), absent, or going backwards. Each such reading carries
the server timestamp, else the receive time, and the node is logged once. The rule itself is
unit-tested in test_opcua_values.py; here it runs end to end on a real asyncua server, in both
modes.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from helpers.opcua_servers import Collector, UaTestServer, running, source_config
from helpers.wait import wait_for

from edge_agent.reading import Quality
from edge_agent.sources.opcua.source import OpcuaSource
from edge_agent.sources.opcua.values import datetime_ns

pytestmark = pytest.mark.integration

UNCERTAIN_LAST_USABLE = 0x40900000
READ_REQUEST = ua.ObjectIds.ReadRequest_Encoding_DefaultBinary


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    async with UaTestServer(tmp_path) as srv:
        yield srv


def speed_source(server: UaTestServer, mode: str) -> OpcuaSource:
    nodes = [{"name": "speed", "node_id": server.node_id("Speed")}]
    return OpcuaSource(source_config(server.endpoint, nodes, mode=mode))


def log_lines(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_values_changing_under_a_frozen_source_timestamp_all_arrive(
    server: UaTestServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The field case: a Double goes 10.0 -> 24.0 while its SourceTimestamp stays fixed; before
    the fix both modes forwarded 10.0 only and dropped the 14 changes without a word."""
    source, got = speed_source(server, mode), Collector()
    frozen = dt.datetime.now(dt.UTC)
    server_stamps = []
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        async with running(source, got):
            await got.wait_for(lambda rs: any(r.pt == "speed" for r in rs))
            for value in range(10, 25):
                server_stamps.append(dt.datetime.now(dt.UTC))
                await server.write(
                    "Speed", float(value), source_ts=frozen, server_ts=server_stamps[-1]
                )
                # each change is awaited (a poll sees only the latest value at its tick)
                await got.wait_for(lambda rs, v=float(value): any(r.value == v for r in rs))
    changes = [r for r in got.of("speed") if r.value is not None and r.value >= 10.0]
    assert [r.value for r in changes] == [float(v) for v in range(10, 25)]
    assert all(r.quality is Quality.GOOD for r in changes)
    # 10.0 carries the device's timestamp; each change under the frozen one the server's
    assert [r.ts_ns for r in changes] == [datetime_ns(frozen)] + [
        datetime_ns(stamp) for stamp in server_stamps[1:]
    ]
    assert source.state.counts["timestamp_frozen"] == 14
    (line,) = log_lines(caplog, "source timestamp did not change with its value")
    assert "node=speed" in line and f"source_ts={frozen.isoformat()}" in line


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_values_without_a_source_timestamp_arrive_once_each(
    server: UaTestServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another instance: no SourceTimestamp and a ServerTimestamp that never moves (a gateway
    that stamps nothing). Before the fix every change after the first was dropped as a repeat;
    a poll must still not re-send an unchanged value."""
    source, got = speed_source(server, mode), Collector()
    server_stamp = dt.datetime.now(dt.UTC)
    windows = []
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        async with running(source, got):
            await got.wait_for(lambda rs: any(r.pt == "speed" for r in rs))
            for value in (10.0, 11.0, 12.0):
                before = time.time_ns()
                await server.write("Speed", value, source_ts=None, server_ts=server_stamp)
                await got.wait_for(lambda rs, v=value: any(r.value == v for r in rs))
                windows.append((before, time.time_ns()))
            reads = server.rules.requests.count(READ_REQUEST)
            await wait_for(  # three more polls: no event announces a poll that finds nothing new
                lambda: server.rules.requests.count(READ_REQUEST) >= reads + 3,
                10,
                "three more Read requests",
            )
    changes = [r for r in got.of("speed") if r.value is not None and r.value >= 10.0]
    assert [r.value for r in changes] == [10.0, 11.0, 12.0]  # once each, even across polls
    assert changes[0].ts_ns == datetime_ns(server_stamp)  # the server's, the first time
    for reading, (before, after) in zip(changes[1:], windows[1:], strict=True):
        assert before <= reading.ts_ns <= after  # then the receive time: the server's is frozen
    assert source.state.counts["timestamp_missing"] == 3
    (line,) = log_lines(caplog, "gives no source timestamp")
    assert "node=speed" in line and "source_ts=none" in line


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_a_status_change_under_the_same_timestamp_and_value_arrives(
    server: UaTestServer, mode: str
) -> None:
    """Another instance: the value and the SourceTimestamp stay, the StatusCode changes."""
    source, got = speed_source(server, mode), Collector()
    stamp = dt.datetime.now(dt.UTC)
    async with running(source, got):
        await got.wait_for(lambda rs: any(r.pt == "speed" for r in rs))
        for code in (0, UNCERTAIN_LAST_USABLE, 0):
            await server.write("Speed", 10.0, status=code, source_ts=stamp)
            await got.wait_for(lambda rs, c=code: rs[-1].value == 10.0 and rs[-1].code == c)
    tail = [(r.value, r.code) for r in got.of("speed")][-3:]
    assert tail == [(10.0, 0), (10.0, UNCERTAIN_LAST_USABLE), (10.0, 0)]


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_a_source_timestamp_going_backwards_does_not_hide_the_change(
    server: UaTestServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another instance: the device clock steps back. The new value must not be filed before
    the old one, where a consumer ordering by time would never see it as current."""
    source, got = speed_source(server, mode), Collector()
    now = dt.datetime.now(dt.UTC)
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        async with running(source, got):
            await got.wait_for(lambda rs: any(r.pt == "speed" for r in rs))
            await server.write("Speed", 20.0, source_ts=now)
            await got.wait_for(lambda rs: any(r.value == 20.0 for r in rs))
            await server.write("Speed", 21.0, source_ts=now - dt.timedelta(hours=1))
            await got.wait_for(lambda rs: any(r.value == 21.0 for r in rs))
    latest = max(got.of("speed"), key=lambda r: r.ts_ns)
    assert latest.value == 21.0
    assert len(log_lines(caplog, "source timestamp went backwards")) == 1


def test_frozen_timestamps_on_many_nodes_are_logged_for_ten_and_counted_for_all(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gateway that freezes timestamps freezes them everywhere: ten lines, then one more."""
    nodes = [{"name": f"n{i}", "node_id": f"ns=2;i={i}"} for i in range(12)]
    source = OpcuaSource(source_config("opc.tcp://127.0.0.1:4840", nodes))
    stamp = dt.datetime.now(dt.UTC)
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        for value in (1.0, 2.0, 3.0):
            for i in range(12):
                data = ua.DataValue(ua.Variant(value), SourceTimestamp=stamp)
                assert source._convert(f"n{i}", data) is not None
    assert len(log_lines(caplog, "source timestamp did not change with its value")) == 10
    (more,) = log_lines(caplog, "More OPC UA nodes have source timestamps that do not change")
    assert "timestamp_frozen" in more
    assert source.state.counts["timestamp_frozen"] == 24
