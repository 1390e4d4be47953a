"""Faults against the end-to-end acknowledgement (docs/contract.md §4.10), with the real parts:
a private Mosquitto, the real `edge-agent run` process, the real `edge-agent verify --ack-key`.

Each case prints its ledger line, `taken / verified / duplicates / declared / lost`:
- the broker SIGKILLed right after PUBACKing, the consumer offline (Mosquitto saving on its
  default 30-minute autosave, so it loses what it held in memory): lost 0 in end_to_end mode;
  in broker mode the loss is shown by verify (exit 4), not hidden;
- the consumer SIGKILLed between receiving batches and saving its state: its ack never came,
  so the agent sends them again;
- 1,000 acknowledgements forged by a client without the consumer key: none accepted, 0 batches
  deleted, counted by reason, one log line (an audit event) per reason.
"""

from __future__ import annotations

import copy
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.agent import AgentProcess, agent_config
from helpers.verifier import VerifyProcess, ledger, settled, verify_processes
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.ack import seal_ack
from edge_agent.seal.envelope import protected_header_bytes, sign1
from edge_agent.seal.keys import key_id, load_private_key, write_keypair

pytestmark = pytest.mark.faults


@pytest.fixture
def started() -> Iterator[Callable[[VerifyProcess], VerifyProcess]]:
    """Wraps each VerifyProcess of a test: killed at the end if still running."""
    with verify_processes() as register:
        yield register


EXIT_GAP = 4


def source(interval: str = "100ms") -> list[dict[str, Any]]:
    return [{"type": "simulated", "name": "sim", "interval": interval, "points": 20}]


def config_for(
    mode: str, tmp_path: Path, broker: Mosquitto, keys: Path, consumer: Path
) -> dict[str, Any]:
    mqtt: dict[str, Any] = {"ack": mode}
    if mode == "end_to_end":
        mqtt |= {"ack_keys": [str(consumer / "signing.pub")], "ack_timeout": "2s"}
    return agent_config(tmp_path, broker, keys, source(), mqtt=mqtt)


def quiet(config: dict[str, Any]) -> dict[str, Any]:
    """The same config with the source polling once an hour: no new readings from now on."""
    changed = copy.deepcopy(config)
    changed["sources"] = source("1h")
    return changed


def sigkill(broker: Mosquitto) -> None:
    """SIGKILL the broker (Mosquitto.stop is a SIGTERM, which saves everything first)."""
    process = broker._process  # noqa: SLF001 - the helper has no kill; a test-only fault
    assert process is not None
    process.kill()
    process.wait()
    broker._process = None  # noqa: SLF001


def sent_readings(status: dict[str, Any]) -> int:
    """Readings that left the buffer or wait for a consumer: PUBACKed (or deleted)."""
    ack = status["mqtt"]["ack"]
    if ack["mode"] == "end_to_end":
        return int(ack["unacked_readings"])
    return int(status["buffer"]["next_seq"] - 1 - status["buffer"]["readings"])


@pytest.mark.parametrize("mode", ["end_to_end", "broker"])
async def test_broker_killed_after_puback_consumer_offline(
    mode: str,
    tmp_path: Path,
    keys: Path,
    agents: list[AgentProcess],
    started: Callable[[VerifyProcess], VerifyProcess],
) -> None:
    consumer = tmp_path / "consumer"
    write_keypair(consumer)
    (tmp_path / "mosquitto").mkdir()
    # Mosquitto's default autosave: what it acknowledged since its last save is in memory only.
    broker = Mosquitto(directory=tmp_path / "mosquitto", extra_config="autosave_interval 1800\n")
    broker.start()
    try:
        verify = started(VerifyProcess(broker, keys, tmp_path, ack_key=consumer / "signing.key"))
        verify.start()  # the consumer's session and subscription exist ...
        assert verify.stop() == 0  # ... and it goes offline: the broker queues for it
        config = config_for(mode, tmp_path, broker, keys, consumer)
        agent = AgentProcess(config, tmp_path)
        agents.append(agent)
        agent.start()
        await wait_for(lambda: sent_readings(agent.status()) >= 400, 20, "PUBACKed readings")
        epoch = agent.status()["buffer"]["epoch"]

        sigkill(broker)
        broker.start()
        verify.start()
        agent.write_config(quiet(config))
        assert "Reloaded" in agent.reload()
        taken = await settled(agent, verify, epoch)
        code = verify.stop()
        assert agent.stop() == 0
    finally:
        broker.stop()
    lost = ledger(f"{mode}, broker SIGKILLed after PUBACK", taken, verify.stream(epoch))
    if mode == "end_to_end":
        assert (lost, code) == (0, 0), verify.log()
    else:
        assert lost > 0, "broker mode trusts the PUBACK: this loss is what end_to_end prevents"
        assert code == EXIT_GAP, "and verify shows it"
        assert "INCOMPLETE" in verify.log()


async def test_consumer_killed_before_saving_gets_everything_again(
    tmp_path: Path,
    broker: Mosquitto,
    keys: Path,
    agents: list[AgentProcess],
    started: Callable[[VerifyProcess], VerifyProcess],
) -> None:
    """A consumer SIGKILLed mid-stream: the broker already handed it batches (gone from the
    broker's queue) that its state file does not hold. No ack said it held them, so the agent
    sends them again after the ack timeout."""
    consumer = tmp_path / "consumer"
    write_keypair(consumer)
    verify = started(VerifyProcess(broker, keys, tmp_path, ack_key=consumer / "signing.key"))
    verify.start()
    config = config_for("end_to_end", tmp_path, broker, keys, consumer)
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    agent.start()
    await wait_for(lambda: agent.status()["mqtt"]["ack"]["accepted"] >= 3, 20, "acks flowing")
    epoch = agent.status()["buffer"]["epoch"]
    assert verify.stop(signal.SIGKILL) == -signal.SIGKILL
    saved = verify.stream(epoch).max_seq
    sent = agent.status()["buffer"]["next_seq"] - 1
    verify.start()
    agent.write_config(quiet(config))
    assert "Reloaded" in agent.reload()
    taken = await settled(agent, verify, epoch)
    assert verify.stop() == 0, verify.log()
    assert agent.stop() == 0
    print(f"consumer killed with its state at seq {saved}, the agent at seq {sent}")
    assert ledger("end_to_end, consumer SIGKILLed", taken, verify.stream(epoch)) == 0


async def test_a_thousand_forged_acknowledgements_delete_nothing(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    consumer = tmp_path / "consumer"
    write_keypair(consumer)
    consumer_key = load_private_key(consumer / "signing.key")
    config = config_for("end_to_end", tmp_path, broker, keys, consumer)
    agent = AgentProcess(config, tmp_path)
    agents.append(agent)
    agent.start()
    await wait_for(lambda: agent.status()["mqtt"]["ack"]["unacked_batches"] >= 5, 20, "a backlog")
    agent.write_config(quiet(config))
    assert "Reloaded" in agent.reload()
    status = agent.status()
    epoch, top = status["buffer"]["epoch"], status["buffer"]["next_seq"] + 1000
    everything = {"seqs": [[0, top]], "batches": [[0, top]], "issued_ns": 2**62}

    def forged(index: int) -> tuple[str, bytes]:
        kind = ("unknown_key", "bad_signature", "malformed", "wrong_gateway", "stale")[index % 5]
        stranger = Ed25519PrivateKey.generate()
        if kind == "unknown_key":  # a key of its own
            return kind, seal_ack(stranger, gateway="test-gw", epoch=epoch, **everything)
        if kind == "bad_signature":  # the consumer's key id, signed by another key
            body = cbor2.dumps({
                "v": 1, "kind": "ack", "gateway": "test-gw", "epoch": epoch,
                "seqs": [[0, top]], "batches": [[0, top]], "issued": 2**62,
            })  # fmt: skip
            kid = key_id(consumer_key.public_key())
            return kind, sign1(stranger, protected_header_bytes(kid, compress=False), body)
        if kind == "malformed":  # unsigned, or junk
            choices = [b'{"kind": "ack", "seqs": [[0, 1000000]]}', os.urandom(64), b""]
            return kind, choices[index % 3]
        if kind == "wrong_gateway":  # a genuine ack of another gateway, replayed here
            return kind, seal_ack(consumer_key, gateway="other-gw", epoch=epoch, **everything)
        # a genuine ack of an epoch that has ended, replayed
        return kind, seal_ack(consumer_key, gateway="test-gw", epoch="old-epoch", **everything)

    messages = [forged(i) for i in range(1000)]
    before = agent.status()
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="forger") as forger:
        for _, payload in messages:
            await forger.publish("site/test/test-gw/ack", payload, qos=1)

    await wait_for(lambda: sum(agent.status()["mqtt"]["ack"]["refused"].values()) == 1000, 20,
                   "every forgery judged")  # fmt: skip
    after = agent.status()
    ack = after["mqtt"]["ack"]
    assert ack["accepted"] == 0 and ack["deleted_batches"] == 0
    assert ack["refused"] == dict.fromkeys(
        ("malformed", "unknown_key", "bad_signature", "wrong_gateway", "stale"), 200
    )
    assert after["buffer"]["batches"] >= before["buffer"]["batches"], "0 batches deleted"
    log = agent.log()
    for reason in ack["refused"]:
        lines = [line for line in log.splitlines() if "category=acknowledgement" in line
                 and f"reason={reason}" in line]  # fmt: skip
        assert len(lines) == 1, (reason, lines)
    metrics = agent_metrics(agent)
    assert 'edge_agent_consumer_acks_refused_total{reason="stale"} 200.0' in metrics
    assert agent.stop() == 0
    print(f"forged acknowledgements: 1000 sent, 0 accepted, 0 deleted, refused {ack['refused']}")


def agent_metrics(agent: AgentProcess) -> str:
    import urllib.request  # noqa: PLC0415

    with urllib.request.urlopen(f"{agent.health_url}/metrics", timeout=5) as response:
        return str(response.read().decode())
