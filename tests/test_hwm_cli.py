"""`edge-agent verify` through a real Mosquitto against high-water marks and conflicting seqs
(docs/contract.md §1, §4.11): a forged mark refused (exit 3), a replayed old mark harmless, the
sealed tail PENDING (exit 0), and a seq sealed twice with other readings a CONFLICT (exit 3) while
a byte-identical re-send is a duplicate only; the judgement survives a restart with `--state`.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.reading import Quality, Reading
from edge_agent.seal.envelope import Sealer
from edge_agent.seal.hwm import HighWaterMark
from edge_agent.seal.keys import load_private_key

pytestmark = pytest.mark.integration

T0 = 1_780_000_000_000_000_000
S = 1_000_000_000
BATCH, HWM = "site/t/gw/batch", "site/t/gw/hwm"


class Verify:
    """One run of the real `edge-agent verify` with a persistent session and a state file."""

    def __init__(self, tmp_path: Path, broker: Mosquitto, keys: Path, run: int) -> None:
        self.out = tmp_path / f"verify-{run}.out"
        self.err = tmp_path / f"verify-{run}.err"
        self.broker = broker
        self.run = run
        command = [sys.executable, "-m", "edge_agent", "verify", "--url", broker.url, "--key",
                   str(keys / "signing.pub"), "--topic", "site/t/+/batch", "--client-id",
                   "hwm-test", "--state", str(tmp_path / "state.json")]  # fmt: skip
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.process = subprocess.Popen(command, stdout=stdout, stderr=stderr)  # noqa: S603

    async def subscribed(self) -> None:
        def both() -> bool:  # Mosquitto logs "<client id> <qos> <filter>" per subscription
            log = self.broker.log_path.read_text()
            return all(log.count(f"hwm-test 1 site/t/+/{name}") >= self.run
                       for name in ("batch", "hwm"))  # fmt: skip

        await wait_for(both, 20, "verify's subscriptions")

    async def printed(self, seq: int) -> None:
        await wait_for(lambda: re.search(rf"^gw +{seq} ", self.out.read_text(), re.M), 20,
                       f"reading {seq} printed")  # fmt: skip

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=30)
        return code, self.err.read_text()


def batch(
    sealer: Sealer, number: int, *, epoch: str = "e1", value: float = 1.0, at: int = T0
) -> bytes:  # noqa: E501
    readings = [Reading("plc", f"p{i}", T0 + i, value, Quality.GOOD) for i in range(3)]
    return sealer.seal(gateway="gw", epoch=epoch, batch=number, first_seq=3 * number - 2,
                       readings=readings, sealed_ns=at)  # fmt: skip


def mark(key: Ed25519PrivateKey, seq: int, *, epoch: str = "e1", at: int = T0) -> bytes:
    return HighWaterMark("gw", epoch, seq, (seq + 2) // 3, at).seal(Sealer(key).signer)


async def test_marks_are_verified_forged_ones_refused_and_old_ones_harmless(
    tmp_path: Path, broker: Mosquitto, keys: Path
) -> None:
    key = load_private_key(keys / "signing.key")
    sealer = Sealer(key)
    verify = Verify(tmp_path, broker, keys, 1)
    await verify.subscribed()
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        # epoch e0, complete up to its last mark; then e1, alive, with 4 readings not received
        await client.publish(HWM, mark(key, 6, epoch="e0", at=T0 + 5 * S), qos=1, retain=True)
        for number in (1, 2):
            await client.publish(BATCH, batch(sealer, number, epoch="e0"), qos=1)
        await client.publish(BATCH, batch(sealer, 1, at=T0 + 100 * S), qos=1)
        await client.publish(BATCH, batch(sealer, 2, at=T0 + 101 * S), qos=1)
        await client.publish(HWM, mark(key, 10, at=T0 + 102 * S), qos=1, retain=True)
        # replayed: e1's older mark and e0's last one, both genuine; they change nothing
        await client.publish(HWM, mark(key, 3, at=T0 + 100 * S), qos=1, retain=True)
        await client.publish(HWM, mark(key, 6, epoch="e0", at=T0 + 5 * S), qos=1, retain=True)
        await client.publish(BATCH, batch(sealer, 3, epoch="e0", at=T0 + 6 * S), qos=1)
        await verify.printed(9)
    code, err = verify.stop()
    assert code == 0, err
    assert "PENDING: gateway=gw epoch=e1 readings=4 seq=7..10 (sealed, not yet received" in err
    assert "epoch=e0" in err and "ENDED" not in err, err  # e0 has no tail: nothing ended open

    verify = Verify(tmp_path, broker, keys, 2)  # the same session and state, restarted
    await verify.subscribed()
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        forged = mark(Ed25519PrivateKey.generate(), 1000, at=T0 + 200 * S)
        await client.publish(HWM, forged, qos=1, retain=True)
        await client.publish(BATCH, batch(sealer, 3, at=T0 + 103 * S), qos=1)
        await verify.printed(9)
    code, err = verify.stop()
    assert code == 3, err
    assert "REJECTED 0 batches and 1 high-water marks: high-water mark: unknown key id" in err
    assert "PENDING: gateway=gw epoch=e1 readings=1 seq=10..10" in err, "the forged mark: no"


async def test_a_seq_sealed_twice_with_other_readings_is_a_conflict_a_resend_a_duplicate(
    tmp_path: Path, broker: Mosquitto, keys: Path
) -> None:
    key = load_private_key(keys / "signing.key")
    first = batch(Sealer(key), 1)
    verify = Verify(tmp_path, broker, keys, 1)
    await verify.subscribed()
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(BATCH, first, qos=1)
        await client.publish(BATCH, first, qos=1)  # byte-identical: at-least-once delivery
        await client.publish(BATCH, batch(Sealer(key), 2), qos=1)
        await verify.printed(6)
    code, err = verify.stop()
    assert code == 0, err
    assert "duplicates=3 evicted=0 hwm=0 conflicts=0 holes=0" in err, err
    assert "CONFLICT" not in err

    verify = Verify(tmp_path, broker, keys, 2)  # restarted: the digests come from --state
    await verify.subscribed()
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        # validly signed by the gateway's key, seq 1..3 again with other values
        await client.publish(BATCH, batch(Sealer(key), 1, value=99.0), qos=1)
        await client.publish(BATCH, batch(Sealer(key), 3), qos=1)
        await verify.printed(9)
    code, err = verify.stop()
    assert code == 3, err
    assert "duplicates=3 evicted=0 hwm=0 conflicts=3 holes=0" in err, err
    assert "CONFLICT 3 readings" in err and "seq 1..3: other content than batch 1 had" in err
    assert " 1 plc.p0 = 99.0" not in verify.out.read_text(), "a conflicting reading is not output"
