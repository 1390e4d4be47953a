"""A fleet whose batches reference point catalogues (contract §4.12), for the ingest tests and
bench/ingest.py's `--catalogue`.

Each gateway of helpers/fleet.py's `Fleet` seals with the real `Sealer(key, payload_format=2,
catalogue=True)`: its batches carry `cat` and `cp` instead of their points' names, and the
catalogue they reference (`sealer.catalogue` after each seal) is what the agent publishes,
retained, on `{prefix}/{gateway}/catalogue/{digest}`. What the agent's forwarder does with it
(publish it before the first batch that references it, on every connection) is not simulated:
a test publishes it when its case says so (before the batches, after them, never).

    fleet = catalogue_fleet(tmp_path / "fleet", gateways=2, points=7)
    messages = fleet.seal_rounds(5, 100)
    publish_catalogues(broker.url, catalogues_of(fleet))      # retained, QoS 1
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from edge_agent.seal.catalogue import Catalogue, catalogue_topic
from edge_agent.seal.envelope import Sealer
from helpers.fleet import Fleet, Message, Publisher, SimulatedGateway


def use_catalogues(gateway: SimulatedGateway) -> None:
    """Make `gateway` seal format-2 batches that reference its point catalogue."""
    gateway.sealer = Sealer(gateway.key, payload_format=2, catalogue=True)


def catalogue_fleet(directory: Path, *, gateways: int, points: int = 50, prefix: str = "") -> Fleet:
    """`gateways` simulated gateways (helpers/fleet.py) sealing with catalogues, each with
    point names of its own (`gw-001.line3.p10`): the same names would make the same catalogue,
    one digest for the whole fleet, as it would for identical gateways."""
    fleet = Fleet(directory, gateways=gateways, payload_format=2, points=points,
                  **({"prefix": prefix} if prefix else {}))  # fmt: skip
    for member in fleet.members:
        member.points = [(src, f"{member.gateway_id}.{pt}") for src, pt in member.points]
        use_catalogues(member)
    return fleet


def catalogue_of(gateway: SimulatedGateway) -> Catalogue:
    """The catalogue `gateway`'s last batch references (it has sealed one with readings)."""
    catalogue = gateway.sealer.catalogue
    assert catalogue is not None, f"{gateway.gateway_id} has sealed no batch with a catalogue"
    return catalogue


def catalogue_message(prefix: str, gateway: str, catalogue: Catalogue) -> Message:
    """The catalogue as the agent publishes it: its topic and its payload."""
    return Message(catalogue_topic(prefix, gateway, catalogue.digest), catalogue.payload,
                   gateway, "", 0, 0, 0)  # fmt: skip


def catalogues_of(fleet: Fleet) -> list[Message]:
    """The current catalogue of every gateway of `fleet` (each has sealed a batch)."""
    return [catalogue_message(fleet.prefix, g.gateway_id, catalogue_of(g)) for g in fleet.members]


def publish_catalogues(url: str, messages: Iterable[Message], *, retain: bool = True) -> None:
    """Publish catalogue messages at QoS 1 (retained, as the agent does, unless `retain` is
    False); returns once the broker has acknowledged each."""
    with Publisher(url) as publisher:
        for message in messages:
            if retain:
                publisher.publish_retained(message.topic, message.payload)
            else:
                publisher.publish([message])


def names(gateway: SimulatedGateway, messages: Sequence[Message]) -> dict[int, tuple[str, str]]:
    """(src, pt) of every seq `gateway` sealed in `messages`: its readings go over its points in
    turn from the first of each batch (SimulatedGateway.readings)."""
    points = gateway.points
    return {
        seq: points[(seq - m.first_seq) % len(points)]
        for m in messages
        if m.gateway == gateway.gateway_id
        for seq in range(m.first_seq, m.last_seq + 1)
    }
