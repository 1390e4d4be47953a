"""`edge-agent ingest` at fleet scale, with faults: a worker SIGKILLed, the database stopped.

The worker is killed while PostgreSQL shows its COPY running (its group's transaction open):
a worker that PUBACKed before COMMIT loses those batches here (checked: 2,600 readings lost
with paho's automatic acknowledgement), and a kill between COMMIT and PUBACK shows as readings
redelivered and recognised.

All real: Mosquitto, PostgreSQL (initdb of the tests' own), `edge-agent ingest run` worker
processes of one shared subscription, and 20 simulated gateways (helpers/fleet.py: each its own
key and real Sealer, formats 1 and 2 mixed) publishing at QoS 1. Each case prints its ledger:
taken (readings published) / verified (distinct rows) / duplicates (rows stored twice) /
declared (seqs declared evicted) / lost (taken, neither stored nor declared), and asserts
duplicates and lost are 0 and `edge-agent ingest report` is clean (exit 0).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from helpers.agent import AgentProcess
from helpers.fleet import Fleet, Message, Publisher, agent_fleet, taken
from helpers.ingest_fleet import (
    AckCollector,
    FleetWorker,
    covered,
    kill_mid_copy,
    ledger,
    prepare_database,
    report,
    stored_readings,
)
from helpers.postgres import PostgresServer
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.keys import load_public_key, write_keypair

pytestmark = pytest.mark.faults

GATEWAYS = 20
READINGS = 200
"""Readings per batch."""


def workers(
    broker: Mosquitto, dsn: str, directory: Path, count: int, ack_key: Path, prefix: str
) -> list[FleetWorker]:
    return [
        FleetWorker(
            broker, dsn, directory, client_id=f"ingest-{n}", topic_prefix=prefix, ack_key=ack_key
        )
        for n in range(count)
    ]


async def publish_rounds(publisher: Publisher, fleet: Fleet, rounds: int) -> list[Message]:
    """`rounds` rounds of one batch per gateway, each acknowledged by the broker."""
    sent: list[Message] = []
    for _ in range(rounds):
        messages = fleet.seal_round(READINGS)
        await asyncio.to_thread(publisher.publish, messages)
        sent.extend(messages)
    return sent


async def test_three_workers_twenty_gateways_one_worker_killed_and_restarted(
    tmp_path: Path, broker: Mosquitto, postgres_dsn: str
) -> None:
    fleet = Fleet(tmp_path / "fleet", gateways=GATEWAYS, payload_format=0, points=20)
    prepare_database(postgres_dsn, fleet)
    write_keypair(tmp_path / "consumer")
    acks = AckCollector(broker, fleet.prefix, load_public_key(tmp_path / "consumer/signing.pub"))
    group = workers(broker, postgres_dsn, tmp_path / "w", 3, tmp_path / "consumer/signing.key",
                    fleet.prefix)  # fmt: skip
    try:
        for worker in group:
            worker.start()
        sent: list[Message] = []
        with Publisher(broker.url) as publisher:
            # Worker 1 is SIGKILLed in the middle of a group: while PostgreSQL shows its COPY
            # running (the transaction open), as the fleet publishes on.
            flowing = asyncio.create_task(publish_rounds(publisher, fleet, 24))
            await kill_mid_copy(postgres_dsn, group[1], "worker 1 in the middle of a COPY")
            sent += await flowing
            group[1].start()  # its session kept its share and its unacknowledged messages
            sent += await publish_rounds(publisher, fleet, 4)
            # One gateway's buffer evicted 300 readings and declares them, as an agent does.
            evicting = fleet.members[7]
            evicted = evicting.skip(300)
            await asyncio.to_thread(publisher.publish, [evicting.declare([evicted])])
            sent += await publish_rounds(publisher, fleet, 4)
        expected = taken(sent)
        case = "3 workers x 20 gateways, worker 1 SIGKILLed"
        await all_stored(case, postgres_dsn, expected, 60)
        account = ledger(case, postgres_dsn, expected)
        print(f"\n{account.line()}")
        assert account.taken == GATEWAYS * 32 * READINGS
        assert (account.lost, account.duplicates, account.verified) == (0, 0, account.taken)
        assert account.declared == 300
        outcome = report(postgres_dsn)
        assert outcome.returncode == 0, outcome.stdout + outcome.stderr
        assert all(w.alive() for w in group)
        # Every acknowledgement names only seqs the database holds: stored or declared evicted.
        stored = {(g, e): set(s) for (g, e), s in expected.items()}
        stored[(evicting.gateway_id, evicting.epoch)] |= covered([evicted])
        for ack in acks.acks:
            assert covered(ack.seqs) <= stored[(ack.gateway, ack.epoch)], ack
        assert acks.refused == 0
    finally:
        for worker in group:
            if worker.alive():
                worker.stop()
        acks.close()


OUTAGE_S = 10.0


async def test_database_stopped_for_10s_ingest_waits_acknowledges_only_what_it_committed(
    tmp_path: Path, broker: Mosquitto, agents: list[AgentProcess]
) -> None:
    fleet = Fleet(tmp_path / "fleet", gateways=GATEWAYS, payload_format=0, points=20)
    write_keypair(tmp_path / "consumer")
    consumer_key = load_public_key(tmp_path / "consumer/signing.pub")
    acks = AckCollector(broker, fleet.prefix, consumer_key)
    # Two real agents beside the simulated fleet, in end_to_end mode: they delete a batch only
    # once ingest's signed acknowledgement covers it.
    agents += agent_fleet(
        tmp_path / "agents", broker, 2, prefix=fleet.prefix,
        mqtt={"ack": "end_to_end", "ack_keys": [str(tmp_path / "consumer/signing.pub")]},
    )  # fmt: skip
    agent_keys = [
        (a.config["gateway"]["id"], Path(a.config["signing"]["key_file"]).with_name("signing.pub"))
        for a in agents
    ]
    with PostgresServer() as server:
        dsn = server.create_database("ingest")
        prepare_database(dsn, fleet, agent_keys)
        names = [g.gateway_id for g in fleet.members]
        group = workers(broker, dsn, tmp_path / "w", 2, tmp_path / "consumer/signing.key",
                        fleet.prefix)  # fmt: skip
        try:
            for worker in group:
                worker.start()
            for agent in agents:
                agent.start()
            await wait_for(
                lambda: all(a.status()["mqtt"]["ack"]["accepted"] > 0 for a in agents),
                20,
                "the agents' first acknowledgements from ingest",
            )
            with Publisher(broker.url) as publisher:
                before = taken(await publish_rounds(publisher, fleet, 5))
                total_before = sum(len(s) for s in before.values())
                await wait_for(
                    lambda: stored_readings(dsn, names) == total_before,
                    30,
                    "the first rounds stored",
                )
                await wait_for(
                    lambda: acknowledged(acks, fleet) == before, 10, "the first rounds acknowledged"
                )

                stopped = time.monotonic()
                server.stop(mode="immediate")  # as a crash: no shutdown checkpoint
                # Whatever ingest committed, the agents had sealed before now.
                at_stop = [a.status()["buffer"] for a in agents]
                held = dict(before)
                for (gateway, _), buffer in zip(agent_keys, at_stop, strict=True):
                    held[(gateway, buffer["epoch"])] = set(range(1, buffer["next_seq"]))
                during = taken(await publish_rounds(publisher, fleet, 5))
                # A worker killed during the outage: had it PUBACKed what it held but could not
                # commit, those batches would be gone; the broker must send them again.
                group[0].kill()
                group[0].start(wait=False)
                await asyncio.sleep(OUTAGE_S - (time.monotonic() - stopped))  # the outage
                assert all(w.alive() for w in group), "a worker exited while PostgreSQL was down"
                # The agents kept every batch sealed during the outage: none acknowledged.
                kept = [a.status()["buffer"] for a in agents]
                for buffer, then in zip(kept, at_stop, strict=True):
                    assert buffer["next_seq"] > then["next_seq"], "the agent sealed nothing"
                    assert buffer["readings"] >= buffer["next_seq"] - then["next_seq"], buffer
                late = acks.since(stopped)
                for ack in late:  # nothing acknowledged end to end that was not committed
                    assert covered(ack.seqs) <= held[(ack.gateway, ack.epoch)], ack
                server.start()
                restarted = time.monotonic()

            expected = {k: before[k] | during[k] for k in before}
            case = f"PostgreSQL stopped {OUTAGE_S:g} s"
            await all_stored(case, dsn, expected, 60)
            resumed = time.monotonic() - restarted
            await wait_for(
                lambda: acknowledged(acks, fleet) == expected, 20, "everything acknowledged"
            )
            # The agents' backlog of the outage is stored and acknowledged, then deleted.
            await wait_for(
                lambda: all(
                    a.status()["buffer"]["readings"] < b["next_seq"] - then["next_seq"]
                    for a, b, then in zip(agents, kept, at_stop, strict=True)
                ),
                30,
                "the agents' outage backlog acknowledged",
            )
            agent_streams = {
                (gateway, b["epoch"]): set(range(1, b["next_seq"]))
                for (gateway, _), b in zip(agent_keys, kept, strict=True)
            }
            agent_account = ledger("2 real agents, end_to_end", dsn, agent_streams)
            print(f"\n{agent_account.line()}")
            assert (agent_account.lost, agent_account.duplicates) == (0, 0)
            account = ledger(case, dsn, expected)
            print(
                f"\n{account.line()}; {len(late)} acknowledgements during the outage, none "
                f"beyond what was committed; all stored {resumed:.1f} s after the restart"
            )
            assert (account.lost, account.duplicates, account.verified) == (0, 0, account.taken)
            outcome = report(dsn)
            assert outcome.returncode == 0, outcome.stdout + outcome.stderr
            assert acks.refused == 0
            assert "waits for PostgreSQL" in group[1].log()
        finally:
            for agent in agents:
                if agent.process is not None:
                    agent.stop()
            for worker in group:
                if worker.alive():
                    worker.stop()
            acks.close()


async def all_stored(
    case: str, dsn: str, expected: dict[tuple[str, str], set[int]], timeout: float
) -> None:
    """Wait until every reading of `expected` is stored; on timeout fail with the ledger."""
    total = sum(len(s) for s in expected.values())
    names = {gateway for gateway, _ in expected}
    try:
        await wait_for(
            lambda: stored_readings(dsn, names) >= total, timeout, f"{total} readings stored"
        )
    except TimeoutError as exc:
        raise AssertionError(f"{exc}: {ledger(case, dsn, expected).line()}") from None


def acknowledged(acks: AckCollector, fleet: Fleet) -> dict[tuple[str, str], set[int]]:
    """The seqs acknowledged per (gateway, epoch) of the simulated `fleet`, by any of the
    acknowledgements. (Not only the newest: two workers acknowledge one gateway, each with the
    ledger as its own last COMMIT left it, so the newest may be the older view.)"""
    names = {g.gateway_id for g in fleet.members}
    union: dict[tuple[str, str], set[int]] = {}
    for ack in list(acks.acks):
        if ack.gateway in names:
            union.setdefault((ack.gateway, ack.epoch), set()).update(covered(ack.seqs))
    return union
