"""The field case of issue 9: a gateway that burns with its disk, seen through the signed
high-water mark (docs/contract.md §4.11), with the real agent, Mosquitto and the verifier.

The readings the consumer never receives are made the way they are lost on site: the test's
own Mosquitto gets an ACL that denies the batch topic, and under MQTT 3.1.1 a broker drops a
denied publish while acknowledging it (the broker-mode loss issue 9 measured), so the agent
believes them delivered. The marks, allowed, still reach the consumer. Then the buffer is
deleted (the disk burned) and the gateway starts again on a new disk.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.verifier import running_verifier
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto

pytestmark = pytest.mark.e2e

OPEN = "topic readwrite site/test/#\n"
BATCHES_DENIED = (
    "topic read site/test/#\n"
    "topic write site/test/test-gw/hwm\n"
    "topic write site/test/test-gw/status\n"
)


def sealed_count(db_path: Path) -> int:
    """How many readings the agent sealed: its persisted next seq, minus one."""
    with sqlite3.connect(db_path) as db:
        (next_seq,) = db.execute("SELECT value FROM meta WHERE key = 'next_seq'").fetchone()
    return int(next_seq) - 1


def lines_starting(lines: list[str], prefix: str) -> list[str]:
    return [line for line in lines if line.startswith(prefix)]


@pytest.mark.parametrize("witness_survives", [False, True], ids=["disk-burned", "db-deleted"])
async def test_a_gateway_that_burns_with_its_disk_leaves_a_pending_tail_then_a_hole(
    tmp_path: Path, keys: Path, agents: list[AgentProcess], witness_survives: bool
) -> None:
    """The tail the consumer never received is PENDING with its exact count while the epoch
    lives. Then the buffer is deleted: with everything beside it (the disk burned), the new
    epoch cannot say anything of the old one and the tail becomes a hole (ENDED, exit 4); with
    the witness `buffer.db-committed` left, the new epoch declares the old one missing and the
    tail is LOST, explained (exit 0)."""
    acl = tmp_path / "acl"
    acl.write_text(OPEN)
    (tmp_path / "broker").mkdir()
    with Mosquitto(extra_config=f"acl_file {acl}\n", directory=tmp_path / "broker") as broker:
        sources = [{"type": "simulated", "name": "sim", "interval": "100ms", "points": 10}]
        config = agent_config(tmp_path, broker, keys, sources,
                              mqtt={"protocol": "3.1.1", "heartbeat": "1s"})  # fmt: skip
        db = Path(config["store"]["path"])
        agent = AgentProcess(config, tmp_path)
        agents.append(agent)
        async with running_verifier(broker, keys) as verifier:
            agent.start()
            await wait_for(lambda: verifier.result.readings >= 200, 30, "first readings")
            await wait_for(lambda: verifier.result.marks >= 1, 10, "a first high-water mark")

            acl.write_text(BATCHES_DENIED)  # batches now vanish at the broker, acknowledged
            broker.reload()
            received = verifier.result.readings
            await wait_for(lambda: verifier.result.marks >= 3, 10, "marks while batches vanish")
            await wait_for(
                lambda: sealed_count(db) >= received + 300, 30, "readings sealed, not received"
            )
            assert agent.stop() == 0
            sealed = sealed_count(db)
            [(_, epoch)] = list(verifier.tracker.streams)
            stream = verifier.tracker.streams[("test-gw", epoch)]
            # The agent's last mark goes out after its last seal: it names every sealed seq.
            await wait_for(lambda: stream.hwm_seq == sealed, 10, "the last, exact mark")
            got = stream.max_seq
            assert stream.readings == got and stream.holes() == [], "a tail, not a hole"
            assert 0 < got < sealed
            print(f"sealed={sealed} received={got} pending={sealed - got}")

            code, lines = verifier.summary()
            assert code == 0, lines
            [pending] = lines_starting(lines, "PENDING:")
            assert pending.startswith(
                f"PENDING: gateway=test-gw epoch={epoch} readings={sealed - got} "
                f"seq={got + 1}..{sealed} (sealed, not yet received"
            ), pending
            assert lines[-1].endswith(f"complete but for the {sealed - got} readings pending "
                                      "above (sealed, not yet received)")  # fmt: skip

            # The disk burns: the buffer and its witness are gone; a new disk, a new epoch,
            # and no declaration of the old one can be made.
            for path in tmp_path.glob("buffer.db*"):
                if not (witness_survives and path.name == "buffer.db-committed"):
                    path.unlink()
            acl.write_text(OPEN)
            broker.reload()
            agent.start()
            await wait_for(lambda: len(verifier.tracker.streams) == 2, 30, "the new epoch")
            new_epoch = next(e for _, e in verifier.tracker.streams if e != epoch)
            await wait_for(
                lambda: verifier.tracker.streams[("test-gw", new_epoch)].readings > 0, 30,
                "the new epoch's readings",
            )  # fmt: skip
            assert agent.stop() == 0

        code, lines = verifier.summary()
        assert not lines_starting(lines, "PENDING:")
        if witness_survives:
            assert code == 0, lines
            [lost] = lines_starting(lines, "LOST:")
            assert lost.startswith(
                f"LOST: gateway=test-gw epoch={epoch} readings={sealed - got} "
                f"ranges=[({got + 1}, {sealed})] reason=the gateway declared the epoch ended "
                "(missing:"
            ), lost
            assert not lines_starting(lines, "ENDED:")
            return
        assert code == 4, lines
        [ended] = lines_starting(lines, "ENDED:")
        assert ended.startswith(
            f"ENDED: gateway=test-gw epoch={epoch} readings={sealed - got} "
            f"seq={got + 1}..{sealed} sealed and never received: epoch {new_epoch} began"
        ), ended
        assert verifier.tracker.holes() == {("test-gw", epoch): [(got + 1, sealed)]}
