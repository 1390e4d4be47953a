"""The OPC UA source on a real asyncua server: modes, quality, bad nodes, restart, no writes."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
from asyncua import ua
from helpers.opcua_servers import Collector, UaTestServer, running, source_config
from helpers.wait import wait_for

from edge_agent.config.opcua import OpcuaSourceConfig
from edge_agent.reading import Quality
from edge_agent.sources.opcua.source import OpcuaSource
from edge_agent.sources.opcua.values import BAD_NOT_CONNECTED, datetime_ns

pytestmark = pytest.mark.integration

BAD_NODE_ID_UNKNOWN = 0x80340000
UNCERTAIN_LAST_USABLE = 0x40900000
BAD_SENSOR_FAILURE = 0x808D0000


def make_config(server: UaTestServer, **overrides: Any) -> OpcuaSourceConfig:
    nodes = overrides.pop("nodes", None) or [
        {"name": name.lower(), "node_id": server.node_id(name)}
        for name in ("Speed", "Count", "Running", "Label", "Stamp", "Raw", "Series")
    ]
    return source_config(server.endpoint, nodes, **overrides)


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    async with UaTestServer(tmp_path) as srv:
        yield srv


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_every_type_arrives_with_its_source_timestamp(
    server: UaTestServer, mode: str
) -> None:
    stamp = await server.write("Speed", 2.5)
    source, got = OpcuaSource(make_config(server, mode=mode)), Collector()
    async with running(source, got):
        await got.wait_for(
            lambda rs: (
                {r.pt for r in rs}
                >= {"speed", "count", "running", "label", "stamp", "raw", "series"}
            )
        )
        first = {r.pt: r for r in reversed(got.readings)}
        assert first["speed"].value == 2.5
        assert first["speed"].ts_ns == datetime_ns(stamp)
        assert first["speed"].quality is Quality.GOOD and first["speed"].code == 0
        assert first["count"].value == 7 and isinstance(first["count"].value, int)
        assert first["running"].value is True
        assert first["label"].value == "mill"
        assert first["stamp"].value == 1704164645_000_000_000
        assert first["raw"].value == "0102"
        assert first["series"].value == "[1.0, 2.0]"
        assert source.state.up
        stamp = await server.write("Speed", 3.5)
        await got.wait_for(lambda rs: any(r.pt == "speed" and r.value == 3.5 for r in rs))
        assert got.of("speed")[-1].ts_ns == datetime_ns(stamp)
    # an unchanged value is never re-sent: one reading per sample
    assert len({(r.ts_ns, r.value) for r in got.of("count")}) == len(got.of("count")) == 1


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_status_gives_quality_and_a_bad_value_is_never_sent(
    server: UaTestServer, mode: str
) -> None:
    source, got = OpcuaSource(make_config(server, mode=mode)), Collector()
    async with running(source, got):
        await got.wait_for(lambda rs: any(r.pt == "speed" for r in rs))
        await server.write("Speed", 9.0, status=UNCERTAIN_LAST_USABLE)
        await got.wait_for(lambda rs: rs[-1:] and any(r.code == UNCERTAIN_LAST_USABLE for r in rs))
        await server.write("Speed", 666.0, status=BAD_SENSOR_FAILURE)
        await got.wait_for(lambda rs: any(r.code == BAD_SENSOR_FAILURE for r in rs))
        await server.write("Speed", 4.0)
        await got.wait_for(lambda rs: any(r.pt == "speed" and r.value == 4.0 for r in rs))
    speed = got.of("speed")
    uncertain = [r for r in speed if r.code == UNCERTAIN_LAST_USABLE]
    assert uncertain and all(r.quality is Quality.UNCERTAIN and r.value == 9.0 for r in uncertain)
    bad = [r for r in speed if r.code == BAD_SENSOR_FAILURE]
    assert len(bad) == 1  # reported when it turns bad, not on every poll
    assert bad[0].quality is Quality.BAD and bad[0].value is None
    assert all(r.value != 666.0 for r in got.readings)


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_an_unknown_node_is_bad_and_the_others_keep_flowing(
    server: UaTestServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = [
        {"name": "speed", "node_id": server.node_id("Speed")},
        {"name": "ghost", "node_id": "ns=2;s=DoesNotExist"},
        {"name": "count", "node_id": server.node_id("Count")},
    ]
    source, got = OpcuaSource(make_config(server, mode=mode, nodes=nodes)), Collector()
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        async with running(source, got):
            await got.wait_for(lambda rs: {r.pt for r in rs} >= {"speed", "ghost", "count"})
            await server.write("Speed", 5.0)
            await got.wait_for(lambda rs: any(r.pt == "speed" and r.value == 5.0 for r in rs))
            await server.write("Count", 8)
            await got.wait_for(lambda rs: any(r.pt == "count" and r.value == 8 for r in rs))
    (ghost,) = got.of("ghost")
    assert (ghost.quality, ghost.value, ghost.code) == (Quality.BAD, None, BAD_NODE_ID_UNKNOWN)
    assert source.state.up
    lines = [r.getMessage() for r in caplog.records if "node is bad" in r.getMessage()]
    assert len(lines) == 1 and "node=ghost" in lines[0] and "BadNodeIdUnknown" in lines[0]


async def test_absolute_deadband_per_node_overrides_the_source(server: UaTestServer) -> None:
    nodes = [
        {
            "name": "speed",
            "node_id": server.node_id("Speed"),
            "deadband": {"type": "absolute", "value": 1.0},
            "queue_size": 5,
            "sampling_interval": "50ms",
        },
        {"name": "count", "node_id": server.node_id("Count")},
    ]
    config = make_config(
        server,
        nodes=nodes,
        deadband={"type": "absolute", "value": 100},
        sampling_interval="200ms",
        queue_size=20,
    )
    source, got = OpcuaSource(config), Collector()
    async with running(source, got):
        await got.wait_for(lambda rs: {r.pt for r in rs} >= {"speed", "count"})
        for value in (1.7, 2.0, 4.0):
            await server.write("Speed", value)
        for value in (50, 200):
            await server.write("Count", value)
        await got.wait_for(lambda rs: any(r.pt == "count" and r.value == 200 for r in rs))
        await got.wait_for(lambda rs: any(r.pt == "speed" and r.value == 4.0 for r in rs))
    assert [r.value for r in got.of("speed")] == [1.5, 4.0]
    assert [r.value for r in got.of("count")] == [7, 200]


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_data_resumes_after_a_server_restart(
    server: UaTestServer, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    nodes = [
        {"name": "speed", "node_id": server.node_id("Speed")},
        {"name": "count", "node_id": server.node_id("Count")},
    ]
    source, got = OpcuaSource(make_config(server, mode=mode, nodes=nodes)), Collector()
    served: set[float] = {1.5}
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        async with running(source, got):
            await got.wait_for(lambda rs: any(r.pt == "speed" for r in rs))
            await server.write("Speed", 10.0)
            served.add(10.0)
            await got.wait_for(lambda rs: any(r.value == 10.0 for r in rs))
            await server.stop()
            await got.wait_for(lambda rs: any(r.code == BAD_NOT_CONNECTED for r in rs))
            assert not source.state.up
            await server.start()
            await got.wait_for(lambda rs: rs[-1].code != BAD_NOT_CONNECTED and source.state.up)
            for value in (11.0, 12.0):  # one at a time: a poll sees only the latest
                served.add(value)
                await server.write("Speed", value)
                await got.wait_for(lambda rs, v=value: any(r.value == v for r in rs))
    speed = got.of("speed")
    good = [r for r in speed if r.quality is Quality.GOOD]
    assert {r.value for r in good} <= served  # nothing good that the server did not serve
    down = [r for r in speed if r.code == BAD_NOT_CONNECTED]
    assert len(down) == 1 and down[0].value is None
    after = speed[speed.index(down[0]) + 1 :]
    assert [r.value for r in after][-2:] == [11.0, 12.0]
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "source is down" in m]) == 1
    assert len([m for m in messages if "source is up" in m]) == 2


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_no_write_call_or_node_management_request_is_sent(
    server: UaTestServer, mode: str
) -> None:
    source, got = OpcuaSource(make_config(server, mode=mode)), Collector()
    async with running(source, got):
        await got.wait_for(lambda rs: len({r.pt for r in rs}) == 7)
        await server.write("Speed", 6.0)
        await got.wait_for(lambda rs: any(r.value == 6.0 for r in rs))
    assert server.rules.requests  # the recorder saw the session's requests
    assert server.rules.write_like() == []


async def test_a_server_that_is_down_at_start_is_retried(tmp_path: Path) -> None:
    server = UaTestServer(tmp_path)
    source, got = OpcuaSource(make_config(server)), Collector()
    try:
        async with running(source, got):
            await wait_for(  # no event exists for a failed attempt
                lambda: source.state.errors > 0, 10, "a failed attempt"
            )
            assert not source.state.up and source.state.last_error
            await server.start()
            await got.wait_for(lambda rs: any(r.pt == "speed" for r in rs))
            assert source.state.up
    finally:
        await server.stop()
    assert not any(r.code == BAD_NOT_CONNECTED for r in got.readings)


EXTRA = {
    "Ratio": (0.5, ua.VariantType.Float),
    "Serial": ("VNSE3", ua.VariantType.String),
}


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_nan_and_infinity_with_good_status_are_bad_and_logged_once(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 8: a Double NaN and a Float +Inf with Good status were delivered as good numbers."""
    async with UaTestServer(tmp_path, extra=EXTRA) as server:
        nodes = [
            {"name": "speed", "node_id": server.node_id("Speed")},
            {"name": "ratio", "node_id": server.node_id("Ratio")},
        ]
        source, got = OpcuaSource(make_config(server, mode=mode, nodes=nodes)), Collector()
        with caplog.at_level(logging.INFO, logger="edge_agent"):
            async with running(source, got):
                await got.wait_for(lambda rs: {r.pt for r in rs} == {"speed", "ratio"})
                await server.write("Speed", math.nan)  # status Good
                await server.write("Ratio", math.inf)
                await got.wait_for(
                    lambda rs: {r.pt for r in rs if r.quality is Quality.BAD} == {"speed", "ratio"}
                )
                await server.write("Speed", math.nan)  # a new sample, still NaN: nothing new
                await server.write("Ratio", -math.inf)  # a new reason: logged, nothing sent
                await wait_for(  # a log line is all a refused value with the same code makes
                    lambda: any("-Infinity" in m.getMessage() for m in caplog.records),
                    10,
                    "the -Infinity log line",
                )
                await server.write("Speed", 2.0)
                await server.write("Ratio", 0.25)
                await got.wait_for(lambda rs: any(r.value == 0.25 for r in rs))
                await got.wait_for(lambda rs: any(r.value == 2.0 for r in rs))
    assert not [
        r for r in got.readings if isinstance(r.value, float) and not math.isfinite(r.value)
    ]
    speed = [(r.value, r.quality, r.code) for r in got.of("speed")]
    assert speed == [(1.5, Quality.GOOD, 0), (None, Quality.BAD, 0), (2.0, Quality.GOOD, 0)]
    ratio = got.of("ratio")
    assert (ratio[0].value, ratio[-1].value) == (0.5, 0.25)
    assert all((r.value, r.quality, r.code) == (None, Quality.BAD, 0) for r in ratio[1:-1])
    messages = [r.getMessage() for r in caplog.records if "OPC UA node" in r.getMessage()]
    rejected = "OPC UA node value rejected, sent as bad; source=plc"
    status = "status=Good (0x00000000)"
    speed_id, ratio_id = server.node_id("Speed"), server.node_id("Ratio")
    assert sorted(messages) == sorted(
        [
            f"{rejected} node=speed node_id={speed_id} {status} error=Double value is NaN",
            f"{rejected} node=ratio node_id={ratio_id} {status} error=Float value is +Infinity",
            f"{rejected} node=ratio node_id={ratio_id} {status} error=Float value is -Infinity",
            "OPC UA node recovered; source=plc node=speed",
            "OPC UA node recovered; source=plc node=ratio",
        ]
    )


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_server_text_is_cleaned_and_text_that_is_not_utf8_is_bad(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A String with a C terminator and junk after it, then bytes that are not UTF-8 (asyncua
    hands those on as lone surrogates, which CBOR cannot encode: sealing crashed on them)."""
    async with UaTestServer(tmp_path, extra=EXTRA) as server:
        nodes = [{"name": "serial", "node_id": server.node_id("Serial")}]
        source, got = OpcuaSource(make_config(server, mode=mode, nodes=nodes)), Collector()
        with caplog.at_level(logging.INFO, logger="edge_agent"):
            async with running(source, got):
                await got.wait_for(lambda rs: len(rs) == 1)
                await server.write("Serial", "VNSE4\x00-0\x00\x00")
                await got.wait_for(lambda rs: rs[-1].value == "VNSE4")
                await server.write("Serial", "OK\udcc3(")  # the bytes 4F 4B C3 28 on the wire
                await got.wait_for(lambda rs: rs[-1].quality is Quality.BAD)
                await server.write("Serial", "PUMP1  \udcff\udcff")  # space and 0xFF padding
                await got.wait_for(lambda rs: rs[-1].value == "PUMP1")
    assert [(r.value, r.quality) for r in got.readings] == [
        ("VNSE3", Quality.GOOD),
        ("VNSE4", Quality.GOOD),
        (None, Quality.BAD),
        ("PUMP1", Quality.GOOD),
    ]
    messages = [r.getMessage() for r in caplog.records if "OPC UA node" in r.getMessage()]
    assert messages == [
        "OPC UA node value rejected, sent as bad; source=plc node=serial "
        f"node_id={server.node_id('Serial')} status=Good (0x00000000) "
        "error=String text is not UTF-8: byte 0xC3 at offset 2",
        "OPC UA node recovered; source=plc node=serial",
    ]
