"""The demo's parts in process: which broker it picks, and what its view and status line show.

(`edge-agent demo` run as a process: test_demo.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.demo import embedded_broker
from edge_agent.demo.embedded_broker import EmbeddedBroker, MosquittoBroker, choose_broker
from edge_agent.demo.view import Snapshot, SourceRow, render, sparkline, status_line

pytestmark = pytest.mark.unit


def test_auto_uses_mosquitto_when_installed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_broker, "mosquitto_path", lambda: "/usr/sbin/mosquitto")
    monkeypatch.setattr("edge_agent.demo.broker.mosquitto_path", lambda: "/usr/sbin/mosquitto")
    broker = choose_broker("auto", tmp_path)
    assert isinstance(broker, MosquittoBroker)


def test_auto_falls_back_to_embedded_without_mosquitto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import amqtt  # noqa: F401 - the embedded broker; a test extra, so never skipped

    monkeypatch.setattr(embedded_broker, "mosquitto_path", lambda: None)
    broker = choose_broker("auto", tmp_path)
    assert isinstance(broker, EmbeddedBroker)


def test_no_broker_at_all_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded_broker, "mosquitto_path", lambda: None)
    monkeypatch.setattr(embedded_broker, "embedded_available", lambda: False)
    with pytest.raises(embedded_broker.BrokerUnavailableError, match=r"edge-agent\[demo\]"):
        choose_broker("auto", tmp_path)


def _snapshot(**changes: object) -> Snapshot:
    snap = Snapshot(
        gateway="demo-gw", elapsed_s=75, broker="mosquitto", broker_url="mqtt://127.0.0.1:1883",
        mqtt_protocol="5", health_url="http://127.0.0.1:8710",
        sources=[
            SourceRow("sim", "simulated", up=True, polled=100, verified=90,
                      latest={"temperature": 21.456, "pump_on": True}),
            SourceRow("plc", "modbus", up=False, last_error="connection refused"),
        ],
        mqtt_connected=True, buffer_readings=12, buffer_bytes=2048, buffer_oldest_s=0.4,
        batches_verified=9, readings_verified=90, max_seq=90, throughput=20.0,
    )  # fmt: skip
    for key, value in changes.items():
        setattr(snap, key, value)
    return snap


def test_view_shows_the_facts_and_fits_the_width() -> None:
    lines = render(_snapshot(), width=60, color=False)
    text = "\n".join(lines)
    assert all(len(line) <= 60 for line in lines)
    assert "running 01:15" in text
    assert "http://127.0.0.1:8710" in text
    assert "temperature=21.46" in text
    assert "DOWN" in text and "connection refused" in text
    assert "connected" in text
    assert "12 readings · 2.0 KiB" in text
    assert "complete: seq 1..90, no holes" in text


def test_view_reports_holes_outage_and_colour() -> None:
    lines = render(_snapshot(missing=3, outage_left_s=4.2, mqtt_connected=False), width=100)
    text = "\n".join(lines)
    assert "3 readings missing" in text
    assert "back in 4s" in text
    assert "\x1b[31mdisconnected\x1b[0m" in text


def test_view_shows_the_point_catalogues_and_the_batches_waiting_for_theirs() -> None:
    assert "catalogues" not in "\n".join(render(_snapshot(), width=100, color=False))
    text = "\n".join(render(_snapshot(catalogues=2, waiting=3), width=100, color=False))
    assert "2 point catalogues received · 3 batches wait for theirs" in text
    assert "missing=0 catalogues=0 rate=" in status_line(_snapshot())
    assert "catalogues=2 waiting=3 rate=" in status_line(_snapshot(catalogues=2, waiting=3))


def test_status_line_and_sparkline() -> None:
    line = status_line(_snapshot())
    assert "sim=up/90 plc=down/0" in line
    assert "buffer=12r/2.0 KiB/0.4s" in line
    assert sparkline([0, 5, 10], 30) == "▁▄█"
    assert sparkline([0, 0], 30) == "▁▁"
