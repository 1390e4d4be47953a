"""A simulated fleet of gateways for the ingest tests and bench/ingest.py.

Each `SimulatedGateway` has its own Ed25519 key (written with `seal.keys.write_keypair`, as
`edge-agent keygen` does, so `ingest keys add` enrols its `signing.pub`), its own epoch, and a
real `Sealer` (payload format 1 or 2): the batches are byte for byte what an agent with that key,
epoch and readings seals, published on `{prefix}/{gateway}/batch` at QoS 1 as the forwarder
does. What is *not* simulated is the agent itself (its buffer, its retries, the end-to-end
acknowledgement): a test that needs those starts real agents with `agent_fleet`.

The fleet keeps the ledger of what it published (`taken`: readings per gateway and epoch, every
seq) so that a test compares it with the rows in the database.

    fleet = Fleet(tmp_path / "fleet", gateways=20, payload_format=2)
    messages = fleet.seal_round(readings=500)        # one batch per gateway
    published = publish(broker.url, messages)       # QoS 1, returns once every PUBACK is in
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_agent.demo.broker import Mosquitto
from edge_agent.reading import Quality, Reading
from edge_agent.seal.envelope import Sealer
from edge_agent.seal.keys import PUBLIC_NAME, load_private_key, write_keypair
from helpers.agent import AgentProcess, agent_config

TOPIC_PREFIX = "site/fleet"


@dataclass(frozen=True)
class Message:
    """One sealed batch ready to publish: where, what, and which seqs it carries."""

    topic: str
    payload: bytes
    gateway: str
    epoch: str
    batch: int
    first_seq: int
    """First seq of the readings; the batch carries `count` readings (0: a declaration)."""
    count: int

    @property
    def last_seq(self) -> int:
        """Last seq carried (first_seq - 1 for a declaration)."""
        return self.first_seq + self.count - 1


class SimulatedGateway:
    """One gateway's identity and counters: seals batches exactly as the agent does.

    `points` (source, point) names are read in turn with values of every contract type: float
    (most), integer, bool, text and a `bad` null, so a consumer's decoder sees all of them.
    """

    def __init__(
        self,
        gateway_id: str,
        directory: Path,
        *,
        prefix: str = TOPIC_PREFIX,
        payload_format: int = 1,
        points: int = 50,
        seed: int = 0,
    ) -> None:
        self.gateway_id = gateway_id
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.kid = write_keypair(directory)
        self.public_key_path = directory / PUBLIC_NAME
        self.key = load_private_key(directory / "signing.key")
        self.sealer = Sealer(self.key, payload_format=payload_format)
        self.topic = f"{prefix}/{gateway_id}/batch"
        self.epoch = uuid.uuid4().hex
        self.next_seq = 1
        self.next_batch = 1
        self.points = [(f"plc{i % 3}", f"line{i % 7}.p{i}") for i in range(points)]
        self._random = random.Random(seed)

    def new_epoch(self) -> str:
        """Start a new epoch (as a replaced buffer does): seqs and batch numbers from 1."""
        self.epoch = uuid.uuid4().hex
        self.next_seq = self.next_batch = 1
        return self.epoch

    def readings(self, count: int, ts_ns: int) -> list[Reading]:
        """`count` readings over the points in turn, one poll (one ts) per round of points."""
        rnd = self._random
        out = []
        for i in range(count):
            src, pt = self.points[i % len(self.points)]
            ts = ts_ns + (i // len(self.points)) * 1_000_000
            kind = i % 20
            if kind < 15:
                out.append(Reading(src, pt, ts, round(rnd.uniform(-50, 150), 2), Quality.GOOD))
            elif kind < 17:
                out.append(Reading(src, pt, ts, rnd.randrange(-1000, 100_000), Quality.GOOD))
            elif kind == 17:
                out.append(Reading(src, pt, ts, rnd.random() < 0.5, Quality.GOOD))
            elif kind == 18:
                out.append(Reading(src, pt, ts, f"state-{rnd.randrange(4)}", Quality.UNCERTAIN))
            else:
                out.append(Reading(src, pt, ts, None, Quality.BAD, 0x80000000))
        return out

    def seal(self, count: int, *, ts_ns: int | None = None) -> Message:
        """Seal the next batch of `count` readings (numbered on from the last batch)."""
        first = self.next_seq
        data = self.sealer.seal(
            gateway=self.gateway_id,
            epoch=self.epoch,
            batch=self.next_batch,
            first_seq=first,
            readings=self.readings(count, ts_ns or time.time_ns()),
            sealed_ns=time.time_ns(),
        )
        message = Message(
            self.topic, data, self.gateway_id, self.epoch, self.next_batch, first, count
        )
        self.next_seq += count
        self.next_batch += 1
        return message

    def declare(self, evicted: Sequence[tuple[int, int]], reasons: Sequence[str] = ()) -> Message:
        """Seal a declaration batch (no readings) saying `evicted` seq ranges were dropped.

        The ranges must lie below `next_seq`: skip them first with `skip(count)`.
        """
        data = self.sealer.seal(
            gateway=self.gateway_id,
            epoch=self.epoch,
            batch=self.next_batch,
            first_seq=self.next_seq,
            readings=[],
            sealed_ns=time.time_ns(),
            evicted=evicted,
            reasons=reasons,
        )
        message = Message(
            self.topic, data, self.gateway_id, self.epoch, self.next_batch, self.next_seq, 0
        )
        self.next_batch += 1
        return message

    def skip(self, count: int) -> tuple[int, int]:
        """Number `count` readings that are never sent (a hole); returns their (first, last)."""
        first = self.next_seq
        self.next_seq += count
        return first, first + count - 1


@dataclass
class Fleet:
    """`gateways` simulated gateways named `gw-000`.. under `directory` (one key dir each).

    `payload_format` 1 or 2 for all, or 0 for a mix (even gateways format 1, odd format 2).
    """

    directory: Path
    gateways: int = 20
    payload_format: int = 1
    points: int = 50
    prefix: str = TOPIC_PREFIX
    members: list[SimulatedGateway] = field(init=False)

    def __post_init__(self) -> None:
        self.members = [
            SimulatedGateway(
                f"gw-{n:03d}",
                self.directory / f"gw-{n:03d}",
                prefix=self.prefix,
                payload_format=self.payload_format or 1 + n % 2,
                points=self.points,
                seed=n,
            )
            for n in range(self.gateways)
        ]

    def seal_round(self, readings: int) -> list[Message]:
        """One batch of `readings` readings from every gateway, in gateway order."""
        return [gateway.seal(readings) for gateway in self.members]

    def seal_rounds(self, rounds: int, readings: int) -> list[Message]:
        """`rounds` rounds, interleaved as a fleet publishes (round 1 of all, then round 2...)."""
        return [m for _ in range(rounds) for m in self.seal_round(readings)]

    def key_files(self) -> list[tuple[str, Path]]:
        """(gateway id, public key PEM) of every member: what `ingest keys add` enrols."""
        return [(g.gateway_id, g.public_key_path) for g in self.members]


def taken(messages: Iterable[Message]) -> dict[tuple[str, str], set[int]]:
    """The seqs of the readings in `messages` per (gateway, epoch): what a consumer must hold."""
    seqs: dict[tuple[str, str], set[int]] = {}
    for m in messages:
        seqs.setdefault((m.gateway, m.epoch), set()).update(range(m.first_seq, m.last_seq + 1))
    return seqs


class Publisher:
    """One MQTT 5 connection publishing sealed batches at QoS 1 (paho, as any client would).

    `publish(messages)` returns once the broker has acknowledged (PUBACK) every one of them;
    TimeoutError after `timeout` seconds names how many are still unacknowledged.
    """

    def __init__(self, url: str, *, client_id: str | None = None) -> None:
        host, _, port = url.removeprefix("mqtt://").rpartition(":")
        self._client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"fleet-{uuid.uuid4().hex[:8]}",
            protocol=mqtt.MQTTv5,
        )
        self._client.max_inflight_messages_set(1000)
        self._client.max_queued_messages_set(0)
        self._connected = threading.Event()
        self._client.on_connect = lambda *_args: self._connected.set()
        self._client.connect(host, int(port), clean_start=True)
        self._client.loop_start()
        if not self._connected.wait(10):
            self.close()
            raise TimeoutError(f"fleet publisher could not connect to {url}")

    def publish(self, messages: Sequence[Message], *, timeout: float = 60.0) -> int:
        """Publish every message at QoS 1; return how many once all are acknowledged."""
        infos = [self._client.publish(m.topic, m.payload, qos=1) for m in messages]
        end = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.0, end - time.monotonic()))
            if not info.is_published():
                waiting = sum(not i.is_published() for i in infos)
                raise TimeoutError(f"{waiting} of {len(infos)} batches not acknowledged")
        return len(infos)

    def publish_retained(self, topic: str, payload: bytes) -> None:
        """One retained QoS 1 message (a high-water mark, a status), acknowledged."""
        info = self._client.publish(topic, payload, qos=1, retain=True)
        info.wait_for_publish(10)

    def close(self) -> None:
        """Disconnect cleanly and stop the network thread."""
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def publish(url: str, messages: Sequence[Message], *, timeout: float = 60.0) -> int:
    """Publish `messages` over one new connection; return the count once all are PUBACKed."""
    with Publisher(url) as publisher:
        return publisher.publish(messages, timeout=timeout)


def persistent_session(url: str, client_id: str, topic: str, *, qos: int = 1) -> None:
    """Create a broker session that outlives its connection, subscribed to `topic`.

    `topic` may be a shared subscription (`$share/GROUP/...`): the broker then queues what is
    published to it until a subscriber of the group connects (how the benchmark puts batches
    at the broker before any worker runs). Session Expiry: one hour.
    """
    host, _, port = url.removeprefix("mqtt://").rpartition(":")
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    subscribed = threading.Event()
    client.on_subscribe = lambda *_args: subscribed.set()
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 3600
    client.connect(host, int(port), clean_start=False, properties=properties)
    client.loop_start()
    try:
        client.subscribe(topic, qos=qos)
        if not subscribed.wait(10):
            raise TimeoutError(f"no SUBACK for {topic}")
    finally:
        client.disconnect()
        client.loop_stop()


def agent_fleet(
    directory: Path,
    broker: Mosquitto,
    count: int,
    *,
    prefix: str = TOPIC_PREFIX,
    points: int = 20,
    interval: str = "100ms",
    **overrides: Any,
) -> list[AgentProcess]:
    """`count` real `edge-agent run` processes (not started), gateways `agent-000`.., each with
    its own key in `directory/agent-NNN/keys` and a simulated source of `points` points.

    `overrides` are config sections merged as in `agent_config` (e.g. `mqtt={"ack": ...}` for
    the end-to-end acknowledgement). The public keys to enrol are `keys/signing.pub`.
    """
    agents = []
    for n in range(count):
        home = directory / f"agent-{n:03d}"
        keys = home / "keys"
        home.mkdir(parents=True, exist_ok=True)
        write_keypair(keys)
        sources = [{"type": "simulated", "name": "sim", "interval": interval, "points": points}]
        config = agent_config(home, broker, keys, sources, **overrides)
        config["gateway"] = {"id": f"agent-{n:03d}"}
        config["mqtt"]["topic_prefix"] = prefix
        agents.append(AgentProcess(config, home))
    return agents
