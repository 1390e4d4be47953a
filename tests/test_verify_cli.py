"""`edge-agent verify` as an operator runs it: exit 0 when complete, 3 on an unknown key or on
readings the contract does not allow; `--json` is strict JSON."""

from __future__ import annotations

import asyncio
import math
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import cbor2
import pytest
import zstandard
from helpers.agent import AgentProcess, agent_config, strict_json
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.reading import Quality, Reading
from edge_agent.seal.envelope import Sealer
from edge_agent.seal.keys import load_private_key, write_keypair

pytestmark = pytest.mark.e2e


def start_verify(broker: Mosquitto, key: Path, client_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "verify", "--url", broker.url, "--topic",
         "site/test/#", "--key", str(key), "--client-id", client_id, "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


async def test_verify_passes_a_complete_stream_and_rejects_an_unknown_key(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    write_keypair(tmp_path / "other")
    good = start_verify(broker, keys / "signing.pub", "verify-good")
    wrong = start_verify(broker, tmp_path / "other" / "signing.pub", "verify-wrong")
    # Both subscribe with persistent sessions before the agent publishes anything.
    sources = [{"type": "simulated", "name": "sim", "interval": "50ms", "points": 10}]
    agent = AgentProcess(agent_config(tmp_path, broker, keys, sources), tmp_path)
    agents.append(agent)

    def both_subscribed() -> bool:  # Mosquitto logs "<client id> <qos> <filter>"
        log = broker.log_path.read_text()
        return "verify-good 1 site/test/#" in log and "verify-wrong 1 site/test/#" in log

    def all_shipped() -> bool:
        status = agent.status()
        return status["buffer"]["readings"] == 0 and status["sources"]["sim"]["readings"] > 100

    await wait_for(both_subscribed, 20, "verifiers' subscriptions")
    agent.start()
    await wait_for(all_shipped, 20, "readings shipped")
    assert agent.stop() == 0
    good.send_signal(signal.SIGINT)
    wrong.send_signal(signal.SIGINT)
    good_out, good_err = good.communicate(timeout=30)
    _, wrong_err = wrong.communicate(timeout=30)
    assert good.returncode == 0, good_err
    assert "OK:" in good_err and "holes=0" in good_err
    assert wrong.returncode == 3, wrong_err
    assert "unknown key id" in wrong_err


async def test_verify_json_is_strict_json_when_a_batch_carries_nan_or_infinity(
    broker: Mosquitto, keys: Path
) -> None:
    """Issue 8: `verify --json` printed `NaN` and `Infinity`, which strict JSON parsers reject.

    The batch is sealed here with the gateway's key, as an agent without the value rules did: a
    good NaN, a good +Inf (with an OPC UA status code), a good -Inf and a good 1.5.
    """
    verify = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "verify", "--url", broker.url, "--topic",
         "site/test/#", "--key", str(keys / "signing.pub"), "--client-id", "verify-json",
         "--json", "--count", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    await wait_for(
        lambda: "verify-json 1 site/test/#" in broker.log_path.read_text(), 20, "subscription"
    )
    readings = [
        Reading("opc", "speed", 1, math.nan, Quality.GOOD, 0),
        Reading("opc", "ratio", 2, math.inf, Quality.GOOD, 0),
        Reading("plc", "temp", 3, -math.inf, Quality.GOOD),
        Reading("plc", "level", 4, 1.5, Quality.GOOD),
    ]
    sealer = Sealer(load_private_key(keys / "signing.key"))
    payload = sealer.seal(gateway="test-gw", epoch="e1", batch=1, first_seq=1,
                          readings=readings, sealed_ns=5)  # fmt: skip
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish("site/test/test-gw/batch", payload, qos=1)
    out, err = verify.communicate(timeout=30)
    lines = [strict_json(line) for line in out.splitlines()]
    assert [(r["pt"], r["v"], r["q"], r.get("sc")) for r in lines] == [
        ("speed", None, "bad", 0),
        ("ratio", None, "bad", 0),
        ("temp", None, "bad", None),
        ("level", 1.5, "good", None),
    ]
    assert verify.returncode == 3, err  # readings not as the contract says
    assert "NONCONFORMING 3 readings broke the value rules (shown as bad, v null); " in err
    assert "first: gateway=test-gw seq=1 opc.speed: value is NaN" in err
    assert "holes=0" in err


async def run_agent_until(agent: AgentProcess, agents: list[AgentProcess], readings: int) -> None:
    """Start `agent`, wait until its source produced `readings`, stop it cleanly."""
    agents.append(agent)
    agent.start()
    await wait_for(
        lambda: agent.status()["sources"]["sim"]["readings"] > readings, 20, "readings produced"
    )
    assert agent.stop() == 0


async def test_verify_proves_completeness_across_a_change_of_payload_format(
    tmp_path: Path, broker: Mosquitto, keys: Path, agents: list[AgentProcess]
) -> None:
    """Issue 14: an operator changes `batch.format` from 1 to 2 and restarts the agent on the
    same buffer. One epoch then holds batches of both formats; verify reads both and finds
    the stream complete (a raw subscriber checks that both formats were on the wire)."""
    verify = start_verify(broker, keys / "signing.pub", "verify-switch")
    formats: list[int] = []

    async def watch(client: aiomqtt.Client) -> None:
        async for message in client.messages:
            assert isinstance(message.payload, bytes)
            payload = cbor2.loads(message.payload).value[2]
            formats.append(cbor2.loads(zstandard.ZstdDecompressor().decompress(payload))["v"])

    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.subscribe("site/test/test-gw/batch", qos=1)
        watcher = asyncio.create_task(watch(client))
        await wait_for(
            lambda: "verify-switch 1 site/test/#" in broker.log_path.read_text(), 20, "subscription"
        )
        sources = [{"type": "simulated", "name": "sim", "interval": "50ms", "points": 10}]
        config = agent_config(tmp_path, broker, keys, sources)
        for payload_format in (1, 2):
            config["batch"]["format"] = payload_format
            await run_agent_until(AgentProcess(config, tmp_path), agents, readings=200)
        await wait_for(lambda: 1 in formats and formats[-1] == 2, 20, "both formats received")
        watcher.cancel()
    verify.send_signal(signal.SIGINT)
    _, err = verify.communicate(timeout=30)
    assert verify.returncode == 0, err
    assert "OK:" in err and "holes=0" in err
    assert err.count("gateway=test-gw epoch=") == 1  # one epoch, both formats in it
    assert sorted(set(formats)) == [1, 2]
