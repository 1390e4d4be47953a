"""The Modbus source against real pymodbus TCP servers: values, faults, sharing, recovery."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from helpers.modbus_devices import (
    MOTOR_POINTS,
    RECEIVED_CODES,
    WRITE_CODES,
    MisbehavingTcpDevice,
    TestUnit,
    motor_unit,
    tcp_server,
)
from helpers.modbus_sources import running, source_config
from helpers.ports import free_port

from edge_agent.reading import Quality

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


@pytest.fixture(autouse=True, scope="module")
def _never_a_write_code() -> Any:
    yield
    assert RECEIVED_CODES, "no Modbus request reached a test device"
    assert not WRITE_CODES & set(RECEIVED_CODES), sorted(set(RECEIVED_CODES))


async def test_every_table_and_type_in_one_poll_of_four_requests() -> None:
    unit = motor_unit()
    async with (
        tcp_server(unit) as server,
        running(source_config(server.port, MOTOR_POINTS)) as (polls,),
    ):
        batch = await polls.next()
    assert {k: r.value for k, r in batch.items()} == {
        "current": 123.456, "counter": 42, "temp": pytest.approx(-12.5), "tag": "PUMP1",
        "running": True, "power": -2, "c0": True, "c2": True, "door": True,
    }  # fmt: skip
    assert {r.quality for r in batch.values()} == {Quality.GOOD}
    assert len({r.ts_ns for r in batch.values()}) == 1
    assert len(polls.source.plan) == 4  # coils, discrete, holding 0..20 (gaps bridged), input
    assert server.requests[:4] == [(1, 1, 0, 3), (1, 2, 0, 1), (1, 3, 0, 21), (1, 4, 0, 2)]
    assert polls.source.state.up and polls.source.state.last_error is None


async def test_an_exception_response_marks_exactly_that_read_bad_and_logs_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unit = motor_unit()
    unit.exceptions[3] = 6  # holding registers answer "server device busy"
    caplog.set_level(logging.INFO, logger="edge_agent")
    async with (
        tcp_server(unit) as server,
        running(source_config(server.port, MOTOR_POINTS)) as (polls,),
    ):
        first = await polls.next()
        for _ in range(3):
            await polls.next()
        state = polls.source.state
        assert state.up  # it answered: the device is there, one read is refused
        assert state.last_error is not None
        assert "unit 1 holding 0..20 (21 registers): exception 6 (server device busy)" in (
            state.last_error
        )
        assert state.errors >= 4
        assert polls.source.state.counts["exception"] >= 4
        del unit.exceptions[3]
        recovered = await polls.until(lambda b: "current" in b)
    holding = {"current", "counter", "temp", "tag", "running"}
    assert {k for k, r in first.items() if r.quality == Quality.BAD} == holding
    assert all(first[k].value is None and first[k].ts_ns == first["power"].ts_ns for k in holding)
    assert first["power"].value == -2 and first["power"].quality == Quality.GOOD
    assert recovered["current"].quality == Quality.GOOD
    failed = [r for r in caplog.records if r.getMessage().startswith("Modbus read failed")]
    assert len(failed) == 1, [r.getMessage() for r in failed]
    assert "device=plc unit=1 read=holding 0..20" in failed[0].getMessage()
    assert any(r.getMessage().startswith("Modbus read recovered") for r in caplog.records)


async def test_illegal_address_on_a_bridged_read_falls_back_to_smaller_reads(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unit = TestUnit(1, holding={0: [1, 2], 10: [3]})  # 2..9 unmapped: exception 2
    points = [{"name": "a", "register": "holding", "address": 0, "type": "uint32"},
              {"name": "b", "register": "holding", "address": 10}]  # fmt: skip
    caplog.set_level(logging.INFO, logger="edge_agent")
    async with tcp_server(unit) as server, running(source_config(server.port, points)) as (polls,):
        first = await polls.next()
        await polls.next()
    assert {k: r.value for k, r in first.items()} == {"a": 0x00010002, "b": 3}
    assert [(r.address, r.count) for r in polls.source.plan] == [(0, 2), (10, 1)]
    assert server.requests[:3] == [(1, 3, 0, 11), (1, 3, 0, 2), (1, 3, 10, 1)]
    assert (1, 3, 0, 11) not in server.requests[3:]
    said = [r for r in caplog.records if "refused a coalesced read" in r.getMessage()]
    assert len(said) == 1


async def test_a_unit_that_stops_answering_goes_down_and_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    unit = motor_unit()
    caplog.set_level(logging.INFO, logger="edge_agent")
    async with (
        tcp_server(unit) as server,
        running(source_config(server.port, MOTOR_POINTS)) as (polls,),
    ):
        await polls.until(lambda b: b["current"].quality == Quality.GOOD)
        unit.set_silent(True)
        bad = await polls.until(lambda b: b["current"].quality == Quality.BAD)
        state = polls.source.state
        assert not state.up
        assert state.last_error == (
            f"plc (tcp 127.0.0.1:{server.port} unit 1): "
            "unit 1 coil 0..2 (3 bits): no answer within 0.2s"
        )
        # the first read timed out; the others were not sent, yet all points are bad
        assert {r.quality for r in bad.values()} == {Quality.BAD}
        assert all(r.value is None for r in bad.values())
        unit.set_silent(False)
        await polls.until(lambda b: b.get("current") and b["current"].quality == Quality.GOOD)
        assert polls.source.state.up
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("Modbus device down") for m in messages) == 1
    assert sum(m.startswith("Modbus device up") for m in messages) == 2  # start, recovery


async def test_units_behind_one_gateway_share_one_connection_and_a_dead_one_blocks_nobody() -> None:
    units = [motor_unit(1), motor_unit(2), motor_unit(3)]
    async with tcp_server(*units) as server:
        configs = [source_config(server.port, MOTOR_POINTS, name=f"u{u.unit}", unit_id=u.unit)
                   for u in units]  # fmt: skip
        async with running(*configs) as polls:
            for p in polls:
                await p.next()
            units[1].set_silent(True)
            await polls[1].until(lambda b: b["current"].quality == Quality.BAD)
            # while unit 2 is silent, units 1 and 3 keep answering, poll after poll
            loop = asyncio.get_running_loop()
            started = loop.time()
            for _ in range(5):
                for index in (0, 2):
                    batch = await polls[index].next()
                    assert batch["current"].quality == Quality.GOOD
            # 5 polls at 50ms, each costing unit 2 at most one 200ms timeout
            assert loop.time() - started < 5 * (0.05 + 0.2) + 0.5
            assert polls[0].source.state.up and not polls[1].source.state.up
        assert server.connections == 1  # one connection, never reset by the silent unit


async def test_no_server_backs_off_then_connects_when_it_appears() -> None:
    port = free_port()
    config = source_config(port, MOTOR_POINTS)
    async with running(config) as (polls,):
        bad = await polls.next()
        assert {r.quality for r in bad.values()} == {Quality.BAD}
        state = polls.source.state
        assert not state.up
        assert state.last_error == (
            f"plc (tcp 127.0.0.1:{port} unit 1): cannot connect to 127.0.0.1:{port} "
            "(refused or unreachable)"
        )
        async with tcp_server(motor_unit(), port=port):
            good = await polls.until(lambda b: "current" in b)
            assert good["current"].value == 123.456 and polls.source.state.up
        # the server goes away: the points turn bad again, the source keeps running
        await polls.until(lambda b: b["current"].quality == Quality.BAD)
        assert not polls.source.state.up


def _drop_last_register(frame: bytes) -> bytes:
    """A read-registers answer one register short, with consistent lengths."""
    if len(frame) > 9 and frame[7] in (3, 4):
        body = frame[9:-2]
        return (
            frame[:4] + (len(body) + 3).to_bytes(2, "big") + frame[6:8] + bytes([len(body)]) + body
        )
    return frame


async def test_a_short_response_marks_its_points_bad_without_a_value() -> None:
    # pymodbus' server cannot be told to answer short, so its outgoing frames are rewritten.
    async with (
        tcp_server(motor_unit(), mangle=_drop_last_register) as server,
        running(source_config(server.port, MOTOR_POINTS)) as (polls,),
    ):
        batch = await polls.next()
        assert batch["power"].quality == Quality.BAD and batch["power"].value is None
        assert batch["current"].quality == Quality.BAD
        assert batch["c0"].quality == Quality.GOOD
        assert polls.source.state.counts["short"] >= 2
        assert "short response (1 of 2)" in str(polls.source.state.last_error) or (
            "short response (20 of 21)" in str(polls.source.state.last_error)
        )


async def test_deadband_reports_changes_and_a_heartbeat() -> None:
    unit = TestUnit(1, holding={0: [100, 0]})
    points = [{"name": "level", "register": "holding", "address": 0, "deadband": 5,
               "heartbeat": "400ms"},
              {"name": "tick", "register": "holding", "address": 1}]  # fmt: skip
    async with tcp_server(unit) as server, running(source_config(server.port, points)) as (polls,):
        assert (await polls.next())["level"].value == 100
        unit.set_register("holding", 0, 104)  # within the deadband: not sent
        await polls.until(lambda b: "level" not in b)
        for _ in range(3):
            assert "level" not in await polls.next()
        unit.set_register("holding", 0, 106)  # moved 6 from the last value sent
        moved = await polls.until(lambda b: "level" in b)
        assert moved["level"].value == 106
        loop = asyncio.get_running_loop()
        sent_at = loop.time()
        beat = await polls.until(lambda b: "level" in b)  # unchanged: the heartbeat
        assert beat["level"].value == 106
        assert 0.3 <= loop.time() - sent_at <= 0.7


async def test_device_text_is_cleaned_and_a_refused_value_is_logged_once_per_change(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 8, strings: `0x4142 0x00FF 0xFFFF` is "AB" (it was bad, with no log line), and
    "VNSE3\\0-0" is "VNSE3"; text that is not UTF-8 and a NaN are bad, logged once each."""
    unit = TestUnit(
        1,
        holding={0: [0x4142, 0x00FF, 0xFFFF,           # 0: "AB", NUL, erased-flash bytes
                     0x564E, 0x5345, 0x3300, 0x2D30,   # 3: "VNSE3\0-0"
                     0x4F4B, 0xC328, 0x2020,           # 7: "OK", 0xC3 0x28 (not UTF-8), spaces
                     0x7FC0, 0x0000]},                 # 10: float32 NaN
    )  # fmt: skip
    points = [
        {"name": "tag", "register": "holding", "address": 0, "type": "string", "length": 3},
        {"name": "serial", "register": "holding", "address": 3, "type": "string", "length": 4},
        {"name": "label", "register": "holding", "address": 7, "type": "string", "length": 3},
        {"name": "temp", "register": "holding", "address": 10, "type": "float32"},
    ]
    caplog.set_level(logging.INFO, logger="edge_agent")
    async with tcp_server(unit) as server, running(source_config(server.port, points)) as (polls,):
        first = await polls.next()
        for _ in range(3):  # more polls of the same registers: no more log lines
            later = await polls.next()
            assert set(later) == {"tag", "serial"}  # a bad point is sent when it turns bad
        unit.set_register("holding", 8, 0x2020)  # "OK" and padding
        unit.set_register("holding", 10, 0x4148)  # 12.5
        recovered = await polls.until(lambda b: "label" in b)
        state = polls.source.state
        assert state.up and state.counts["rejected"] >= 8
    assert {k: (r.value, r.quality) for k, r in first.items()} == {
        "tag": ("AB", Quality.GOOD),
        "serial": ("VNSE3", Quality.GOOD),
        "label": (None, Quality.BAD),
        "temp": (None, Quality.BAD),
    }
    assert {k: (r.value, r.quality) for k, r in recovered.items()} == {
        "tag": ("AB", Quality.GOOD),
        "serial": ("VNSE3", Quality.GOOD),
        "label": ("OK", Quality.GOOD),
        "temp": (12.5, Quality.GOOD),
    }
    messages = [r.getMessage() for r in caplog.records if "Modbus point value" in r.getMessage()]
    assert messages == [
        "Modbus point value rejected device=plc unit=1 point=label "
        "error=string: text is not UTF-8: byte 0xC3 at offset 2",
        "Modbus point value rejected device=plc unit=1 point=temp error=float32: value is NaN",
        "Modbus point value recovered device=plc unit=1 point=label failed_polls=4",
        "Modbus point value recovered device=plc unit=1 point=temp failed_polls=4",
    ]


async def test_a_late_tcp_answer_has_a_stale_transaction_id_and_is_discarded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 8 case 1 over TCP: two reads of the same size, one answered after its timeout."""
    caplog.set_level(logging.INFO, logger="edge_agent")
    unit = TestUnit(1, holding={0: [0x42F6, 0xE979], 100: [0x4148, 0x0000]})
    points = [
        {"name": "level", "register": "holding", "address": 0, "type": "float32"},
        {"name": "flow", "register": "holding", "address": 100, "type": "float32"},
    ]
    async with MisbehavingTcpDevice(unit) as device:
        device.misbehave.latency = 0.02  # the next answer trails the late one
        async with running(source_config(device.port, points)) as (polls,):
            await polls.until(lambda b: b["flow"].quality == Quality.GOOD)
            device.misbehave.late[(1, 0)] = 0.3  # timeout 0.2 s
            await polls.until(lambda b: b["level"].quality == Quality.BAD)
            batches = [await polls.next() for _ in range(5)]
            state = polls.source.state
    for batch in batches:
        assert {k: r.value for k, r in batch.items()} == {"level": 123.456, "flow": 12.5}
    assert state.counts["timeout"] == 1 and state.counts["late"] == 1
    late = [r.getMessage() for r in caplog.records
            if r.getMessage().startswith("Modbus late reply discarded")]  # fmt: skip
    assert len(late) == 1
    assert "function 3 answer of 4 bytes with transaction id" in late[0]


async def test_a_bad_point_is_sent_when_it_turns_bad_then_once_per_heartbeat() -> None:
    """With and without a deadband: an outage is not a bad reading per poll."""
    unit = TestUnit(1, holding={0: [7, 8]})
    points = [{"name": "plain", "register": "holding", "address": 0},
              {"name": "banded", "register": "holding", "address": 1, "deadband": 0}]  # fmt: skip
    async with tcp_server(unit) as server:
        config = source_config(server.port, points, heartbeat="600ms")
        async with running(config) as (polls,):
            await polls.until(lambda b: b.get("plain") and b["plain"].quality == Quality.GOOD)
            unit.set_silent(True)
            first = await polls.until(lambda b: b["plain"].quality == Quality.BAD)
            loop = asyncio.get_running_loop()
            turned = loop.time()
            assert first["banded"].quality == Quality.BAD
            again = await polls.next()  # polls in between send nothing: this is the heartbeat
            assert set(again) == {"plain", "banded"}
            assert {r.quality for r in again.values()} == {Quality.BAD}
            assert loop.time() - turned >= 0.5
            unit.set_silent(False)
            back = await polls.until(lambda b: b["plain"].quality == Quality.GOOD)
            assert back["plain"].value == 7 and back["banded"].value == 8
