"""`edge-agent verify` through a real Mosquitto with point catalogues (docs/contract.md §4.12):
batches sealed by the real `Sealer(payload_format=2, catalogue=True)`, catalogues published
retained on their own topic by a real client, in every order a consumer can meet them.

Batches before their catalogue are parked and verified when it comes; a retained catalogue
published before verify subscribed reaches it; malformed catalogues are refused with a reason
while the stream goes on; a batch whose catalogue never comes is pending (exit 4, incomplete);
self-contained and catalogue batches mixed in one epoch prove complete.
"""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiomqtt
import cbor2
import pytest
import zstandard
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from helpers.wait import wait_for

from edge_agent.demo.broker import Mosquitto
from edge_agent.reading import Quality, Reading
from edge_agent.seal.catalogue import Catalogue, catalogue_topic
from edge_agent.seal.envelope import Sealer
from edge_agent.seal.keys import load_private_key

pytestmark = pytest.mark.integration

T0 = 1_780_000_000_000_000_000
S = 1_000_000_000
PREFIX, GATEWAY = "site/t", "gw"
BATCH = f"{PREFIX}/{GATEWAY}/batch"
POINTS = 3
"""Readings per batch (one per point), so batch n holds seq 3n-2..3n."""


class Verify:
    """One run of the real `edge-agent verify` on `topic`, printing every reading."""

    def __init__(
        self, tmp_path: Path, broker: Mosquitto, keys: Path, *, topic: str = f"{PREFIX}/+/batch"
    ) -> None:
        self.out = tmp_path / "verify.out"
        self.err = tmp_path / "verify.err"
        self.broker = broker
        self.topic = topic
        command = [sys.executable, "-m", "edge_agent", "verify", "--url", broker.url,
                   "--key", str(keys / "signing.pub"), "--topic", topic,
                   "--client-id", "cat-test"]  # fmt: skip
        with self.out.open("w") as stdout, self.err.open("w") as stderr:
            self.process = subprocess.Popen(command, stdout=stdout, stderr=stderr)  # noqa: S603

    async def subscribed(self) -> None:
        """Every filter verify subscribes to is in place (Mosquitto logs each one)."""
        wanted = [self.topic]
        if self.topic.endswith("/batch"):
            base = self.topic.removesuffix("batch")
            wanted += [base + "hwm", base + "catalogue/+"]

        def all_in() -> bool:
            log = self.broker.log_path.read_text()
            return all(f"cat-test 1 {name}" in log for name in wanted)

        await wait_for(all_in, 20, f"verify's subscriptions {wanted}")

    async def printed(self, seq: int) -> None:
        await wait_for(lambda: re.search(rf"^{GATEWAY} +{seq} ", self.out.read_text(), re.M),
                       20, f"reading {seq} printed")  # fmt: skip

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGINT)
        code = self.process.wait(timeout=30)
        return code, self.err.read_text()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def readings(number: int, source: str) -> list[Reading]:
    return [Reading(source, f"p{i}", T0 + number * S + i, float(number), Quality.GOOD)
            for i in range(POINTS)]  # fmt: skip


def batch(sealer: Sealer, number: int, source: str = "plc") -> bytes:
    return sealer.seal(gateway=GATEWAY, epoch="e1", batch=number,
                       first_seq=POINTS * number - POINTS + 1, readings=readings(number, source),
                       sealed_ns=T0 + number * S)  # fmt: skip


def with_catalogue(
    key: Ed25519PrivateKey, numbers: range, source: str = "plc"
) -> tuple[list[bytes], Catalogue]:
    """Batches `numbers` of a catalogue Sealer, all referencing the same catalogue."""
    sealer = Sealer(key, payload_format=2, catalogue=True)
    batches = [batch(sealer, n, source) for n in numbers]
    assert sealer.catalogue is not None, "the Sealer made no catalogue"
    return batches, sealer.catalogue


def topic_of(catalogue: Catalogue) -> str:
    return catalogue_topic(PREFIX, GATEWAY, catalogue.digest)


@pytest.fixture
def verifies() -> object:
    started: list[Verify] = []
    yield started
    for verify in started:
        verify.kill()


async def test_a_catalogue_first_then_its_batches_verifies_all(
    tmp_path: Path, broker: Mosquitto, keys: Path, verifies: list[Verify]
) -> None:
    batches, catalogue = with_catalogue(load_private_key(keys / "signing.key"), range(1, 5))
    verify = Verify(tmp_path, broker, keys)
    verifies.append(verify)
    await verify.subscribed()
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(topic_of(catalogue), catalogue.payload, qos=1, retain=True)
        for payload in batches:
            await client.publish(BATCH, payload, qos=1)
        await verify.printed(12)
    code, err = verify.stop()
    assert code == 0, err
    assert "readings=12 max_seq=12 duplicates=0" in err and "holes=0" in err, err
    assert "OK: 4 batches verified, complete" in err, err
    assert "PENDING CATALOGUE" not in err and "REJECTED" not in err, err


async def test_batches_before_their_catalogue_are_parked_then_verified_complete(
    tmp_path: Path, broker: Mosquitto, keys: Path, verifies: list[Verify]
) -> None:
    batches, catalogue = with_catalogue(load_private_key(keys / "signing.key"), range(1, 5))
    verify = Verify(tmp_path, broker, keys, topic=f"{PREFIX}/#")
    verifies.append(verify)
    await verify.subscribed()
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        for payload in reversed(batches):  # out of order too: completeness is by seq
            await client.publish(BATCH, payload, qos=1)
        await client.publish(topic_of(catalogue), catalogue.payload, qos=1, retain=True)
        await verify.printed(12)
    code, err = verify.stop()
    assert code == 0, err
    assert "readings=12 max_seq=12 duplicates=0" in err and "holes=0" in err, err
    assert "OK: 4 batches verified, complete" in err, err
    assert "PENDING CATALOGUE" not in err and "REJECTED" not in err, err


async def test_a_retained_catalogue_published_before_verify_subscribed_reaches_it(
    tmp_path: Path, broker: Mosquitto, keys: Path, verifies: list[Verify]
) -> None:
    """verify subscribes to `site/t/+/batch`: the catalogues' filter is added beside it."""
    batches, catalogue = with_catalogue(load_private_key(keys / "signing.key"), range(1, 4))
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(topic_of(catalogue), catalogue.payload, qos=1, retain=True)
    verify = Verify(tmp_path, broker, keys)
    verifies.append(verify)
    await verify.subscribed()
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        for payload in batches:
            await client.publish(BATCH, payload, qos=1)
        await verify.printed(9)
    code, err = verify.stop()
    assert code == 0, err
    assert "OK: 3 batches verified, complete" in err, err


async def test_malformed_catalogues_are_refused_with_a_reason_and_the_stream_goes_on(
    tmp_path: Path, broker: Mosquitto, keys: Path, verifies: list[Verify]
) -> None:
    key = load_private_key(keys / "signing.key")
    batches, catalogue = with_catalogue(key, range(1, 3))
    _, other = with_catalogue(key, range(7, 8), "rtu")  # other points: another digest
    assert other.digest != catalogue.digest
    junk = zstandard.compress(b"\xff\x00 not CBOR")
    huge = zstandard.compress(cbor2.dumps({"v": 1, "np": 10**12, "src": [], "ps": [], "tok": [],
                                           "pn": [], "pi": [], "pk": b""}))  # fmt: skip
    bomb = zstandard.compress(bytes(17 * 1024 * 1024))  # 17 MiB of zeros in a few kB

    def named(payload: bytes) -> str:  # the topic of its own digest: only the payload is wrong
        return f"{PREFIX}/{GATEWAY}/catalogue/{hashlib.sha256(payload).digest()[:16].hex()}"

    bad = [
        (topic_of(catalogue), other.payload),  # the payload does not match the topic's digest
        (named(junk), junk),
        (named(huge), huge),
        (named(bomb), bomb),
        (f"{PREFIX}/{GATEWAY}/catalogue/not-a-digest", catalogue.payload),
    ]
    verify = Verify(tmp_path, broker, keys)
    verifies.append(verify)
    await verify.subscribed()
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        for topic, payload in bad:
            await client.publish(topic, payload, qos=1)
        await client.publish(topic_of(catalogue), catalogue.payload, qos=1, retain=True)
        for payload in batches:
            await client.publish(BATCH, payload, qos=1)
        await verify.printed(6)
    code, err = verify.stop()
    assert code == 3, err
    refused = [line for line in err.splitlines() if line.startswith("REJECTED: ")]
    assert len(refused) == len(bad), err
    for (topic, _), line in zip(bad, refused, strict=True):
        assert f"catalogue refused on {topic}: " in line, line
    assert f"digest is {other.digest.hex()}, not the {catalogue.digest.hex()}" in refused[0]
    assert "not CBOR" in refused[1] or "not a map" in refused[1], refused[1]
    assert "np 1000000000000 is not 1..100000" in refused[2], refused[2]
    assert "not a zstd frame of <= 16 MiB" in refused[3], refused[3]
    assert "the topic is not {prefix}/{gateway}/catalogue/{32 lowercase hex" in refused[4]
    assert "REJECTED 0 batches and 5 catalogues: " in err, err
    assert "readings=6 max_seq=6" in err and "holes=0" in err, err
    assert "Traceback" not in err, err


async def test_a_batch_whose_catalogue_never_comes_is_pending_and_the_stream_incomplete(
    tmp_path: Path, broker: Mosquitto, keys: Path, verifies: list[Verify]
) -> None:
    """Batch 1 references a catalogue that is never published; batch 2 is self-contained."""
    key = load_private_key(keys / "signing.key")
    [first], catalogue = with_catalogue(key, range(1, 2))
    second = batch(Sealer(key, payload_format=2, catalogue=False), 2)
    verify = Verify(tmp_path, broker, keys)
    verifies.append(verify)
    await verify.subscribed()
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(BATCH, first, qos=1)
        await client.publish(BATCH, second, qos=1)
        await verify.printed(6)
    code, err = verify.stop()
    assert code == 4, err  # as for a gap: incomplete, not tampered
    assert (
        f"PENDING CATALOGUE: digest={catalogue.digest.hex()} batches=1 gateways={GATEWAY} "
        f"(signature checked, not decoded: the catalogue never came on {topic_of(catalogue)}"
    ) in err, err
    assert "INCOMPLETE: 1 batches wait for a catalogue that did not come" in err, err
    assert "REJECTED" not in err and "OK:" not in err, err
    assert "readings=3 max_seq=6" in err and "first_holes=[(1, 3)]" in err, err


async def test_a_switch_to_catalogue_batches_and_back_in_one_epoch_proves_complete(
    tmp_path: Path, broker: Mosquitto, keys: Path, verifies: list[Verify]
) -> None:
    key = load_private_key(keys / "signing.key")
    plain = Sealer(key, payload_format=2, catalogue=False)
    middle, catalogue = with_catalogue(key, range(3, 5))
    stream = [batch(plain, 1), batch(plain, 2), *middle, batch(plain, 5), batch(plain, 6)]
    verify = Verify(tmp_path, broker, keys)
    verifies.append(verify)
    await verify.subscribed()
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        for number, payload in enumerate(stream, start=1):
            if number == 3:  # as the agent does: the catalogue before its first batch
                await client.publish(topic_of(catalogue), catalogue.payload, qos=1, retain=True)
            await client.publish(BATCH, payload, qos=1)
        await verify.printed(18)
    code, err = verify.stop()
    assert code == 0, err
    assert "readings=18 max_seq=18 duplicates=0" in err and "holes=0" in err, err
    assert "OK: 6 batches verified, complete" in err, err
    assert "REJECTED" not in err, err
