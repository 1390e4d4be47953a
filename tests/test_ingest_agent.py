"""The real agent, in end_to_end mode, into `edge-agent ingest`: its batches leave its buffer only
once ingest has committed them and said so with its signed acknowledgement."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.ingest import IngestWorker, ingest
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.keys import write_keypair

pytestmark = pytest.mark.e2e


def one(dsn: str, sql: str) -> object:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(sql.encode()).fetchone()
    assert row is not None
    return row[0]


async def test_an_agent_drains_once_ingest_has_committed(
    tmp_path: Path, broker: Mosquitto, keys: Path, postgres_dsn: str, agents: list[AgentProcess]
) -> None:
    dsn = postgres_dsn
    assert ingest("migrate", "--dsn", dsn).returncode == 0
    added = ingest(
        "keys", "add", "--dsn", dsn, "--gateway", "test-gw", "--key", str(keys / "signing.pub")
    )
    assert added.returncode == 0, added.stderr
    write_keypair(tmp_path / "consumer")
    sources = [{"type": "simulated", "name": "sim", "interval": "50ms", "points": 20}]
    config = agent_config(
        tmp_path, broker, keys, sources,
        mqtt={"ack": "end_to_end", "ack_keys": [str(tmp_path / "consumer" / "signing.pub")],
              "ack_timeout": "3s"},
    )  # fmt: skip
    with IngestWorker(
        tmp_path,
        "--dsn", dsn, "--url", broker.url, "--topic-prefix", "site/test",
        "--ack-key", str(tmp_path / "consumer" / "signing.key"), "--client-id", "ingest-e2e",
    ) as worker:  # fmt: skip
        agent = AgentProcess(config, tmp_path)
        agents.append(agent)
        agent.start()
        await wait_for(
            lambda: int(str(one(dsn, "SELECT count(*) FROM readings"))) >= 2000, 60,
            "2000 readings committed",
        )  # fmt: skip

        def acknowledged() -> bool:
            ack = agent.status()["mqtt"]["ack"]
            return bool(ack["accepted"] > 0 and ack["deleted_batches"] > 0)

        await wait_for(acknowledged, 30, "the agent accepting ingest's acknowledgements")
        assert agent.stop() == 0  # a clean stop seals and sends what it holds
        agent.start()  # the same buffer: what is left is sent, or known to be held
        await wait_for(
            lambda: agent.status()["mqtt"]["ack"]["unacked_batches"] == 0
            and agent.status()["buffer"]["batches"] == 0,
            30, "the agent's buffer drained by ingest's acknowledgements",
        )  # fmt: skip
        assert not any(agent.status()["mqtt"]["ack"]["refused"].values())
        assert agent.stop() == 0
        sealed = int(str(one(dsn, "SELECT max(upper(received)) - 1 FROM coverage")))
        await wait_for(
            lambda: int(str(one(dsn, "SELECT count(*) FROM readings"))) >= sealed, 30,
            "every sealed reading stored",
        )  # fmt: skip
        assert worker.process is not None
    assert one(dsn, "SELECT count(*) FROM readings") == sealed
    assert one(dsn, "SELECT count(DISTINCT (epoch, seq)) FROM readings") == sealed
    assert one(dsn, "SELECT count(*) FROM rejected") == 0
    report = ingest("report", "--dsn", dsn)
    assert report.returncode == 0, report.stdout
