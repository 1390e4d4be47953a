"""The simulated fleet (helpers/fleet.py) sends what real agents send, where they send it.

The ingest tests and bench/ingest.py count on it: every batch opens with its own gateway's key
(formats 1 and 2), the seqs are what the fleet says it took, and batches published while no
worker runs wait in a shared subscription's persistent session.
"""

from __future__ import annotations

import threading
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from helpers.fleet import Fleet, persistent_session, publish, taken
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.envelope import Opener
from edge_agent.seal.keys import load_public_key

pytestmark = pytest.mark.integration


def test_fleet_batches_open_with_each_gateways_key_and_wait_in_a_shared_session(
    tmp_path: Path, broker: Mosquitto
) -> None:
    fleet = Fleet(tmp_path / "fleet", gateways=4, payload_format=0, points=7)
    shared = f"$share/ingest/{fleet.prefix}/+/batch"
    persistent_session(broker.url, "worker-a", shared)
    messages = fleet.seal_rounds(3, readings=100)
    messages.append(fleet.members[0].declare([fleet.members[0].skip(5)]))
    assert publish(broker.url, messages) == len(messages)

    received: list[bytes] = []
    done = threading.Event()

    def on_message(_c: object, _u: object, message: mqtt.MQTTMessage) -> None:
        received.append(message.payload)
        if len(received) == len(messages):
            done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, "worker-a", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect("127.0.0.1", broker.port, clean_start=False, properties=properties)
    client.loop_start()
    try:
        assert done.wait(20), f"{len(received)} of {len(messages)} queued batches delivered"
    finally:
        client.disconnect()
        client.loop_stop()

    opener = Opener([load_public_key(path) for _, path in fleet.key_files()])
    seqs: dict[tuple[str, str], set[int]] = {}
    declared = []
    for payload in received:
        batch = opener.open(payload)
        seqs.setdefault((batch.gateway, batch.epoch), set()).update(
            r["seq"] for r in batch.readings
        )
        declared.extend(batch.evicted)
        assert {type(r["v"]) for r in batch.readings} <= {float, int, bool, str, type(None)}
    assert seqs == taken(messages)
    assert declared == [(301, 305)]
    assert sum(len(s) for s in seqs.values()) == 4 * 3 * 100
