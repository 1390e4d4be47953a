"""A hostile retained message on the acknowledgement topic, against the real agent (§4.10, §5.5).

Anyone who may publish on `{prefix}/{gateway}/ack` (consumers publish there, retained) can send
anything. A 12-byte CBOR bigfloat of exponent 10^18 made the reference COSE parser raise
decimal.Overflow, which no layer of the forwarder caught: found by the review of §4.12 (the
same parser reads batches and catalogues' batches), fixed in seal/cbor_in.py.
"""

from __future__ import annotations

from pathlib import Path

import aiomqtt
import pytest
from helpers.agent import AgentProcess, agent_config
from helpers.verifier import VerifyProcess, verify_processes
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.seal.keys import write_keypair

pytestmark = pytest.mark.faults

BIGFLOAT = b"\xc5\x82\x1b" + (10**18).to_bytes(8, "big") + b"\x01"


async def test_a_retained_bigfloat_on_the_ack_topic_is_refused_and_forwarding_goes_on(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    consumer = tmp_path / "consumer"
    write_keypair(consumer)
    source = [{"type": "simulated", "name": "sim", "interval": "100ms", "points": 5}]
    mqtt = {"ack": "end_to_end", "ack_keys": [str(consumer / "signing.pub")], "ack_timeout": "2s"}
    agent = AgentProcess(agent_config(tmp_path, broker, keys, source, mqtt=mqtt), tmp_path)
    agents.append(agent)
    async with aiomqtt.Client("127.0.0.1", broker.port, identifier="hostile") as hostile:
        await hostile.publish("site/test/test-gw/ack", BIGFLOAT, qos=1, retain=True)
    agent.start()
    await wait_for(
        lambda: agent.status()["mqtt"]["ack"]["refused"].get("malformed", 0) >= 1, 20,
        "the bigfloat refused as malformed",
    )  # fmt: skip
    sent = agent.status()["mqtt"]["ack"]["unacked_batches"]
    await wait_for(lambda: agent.status()["mqtt"]["ack"]["unacked_batches"] >= sent + 5, 20,
                   "batches still forwarded after it")  # fmt: skip
    assert "Overflow" not in agent.log()
    assert agent.stop() == 0


async def test_a_bigfloat_on_the_batch_topic_is_rejected_by_verify_which_goes_on(
    tmp_path: Path, broker: Mosquitto, keys: Path
) -> None:
    """The reference consumer: `edge-agent verify` caught EnvelopeError only, so the 12-byte
    message's decimal.Overflow ended it; now rejected with a reason (§5.5), and it goes on."""
    with verify_processes() as register:
        verify = register(VerifyProcess(broker, keys, tmp_path))
        verify.start()
        async with aiomqtt.Client("127.0.0.1", broker.port, identifier="hostile") as hostile:
            await hostile.publish("site/test/test-gw/batch", BIGFLOAT, qos=1)
            await hostile.publish("site/test/test-gw/batch", b"\x00", qos=1)  # a second one
        await wait_for(lambda: "CBOR tag 5" in verify.log() or verify.process.poll() is not None,
                       20, "verify to judge it")  # fmt: skip
        assert verify.process is not None and verify.process.poll() is None, verify.log()
        assert verify.stop() in (0, 3), verify.log()  # 3: it saw rejected messages
