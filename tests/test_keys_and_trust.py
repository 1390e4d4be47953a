"""Signing keys and the keys consumers trust: file checks, rotation, validity, audit events.

The key file checks are the same in check-config and in run (issue 11): a key owned by another
user, readable by group or others, or in a directory anyone may write is refused by both, and
both say why at `signing.key_file`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import audit as audit_module
from edge_agent.agent import Agent
from edge_agent.audit import audit
from edge_agent.config import load_config, parse_config
from edge_agent.consumer.verify import Verifier, trusted_keys
from edge_agent.errors import ConfigError
from edge_agent.metrics import Metrics
from edge_agent.reading import Quality, Reading
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Opener, Sealer
from edge_agent.seal.keys import (
    key_file_problems,
    key_id,
    load_private_key,
    load_public_key,
    write_keypair,
    write_next_keypair,
)
from edge_agent.seal.trust import KeyNotValidError, TrustSet
from edge_agent.store.sqlite import Store

pytestmark = pytest.mark.unit

NOBODY = 65534
NOW_NS = time.time_ns()
DAY_NS = 86_400 * 10**9


def config_text(key_file: Path, tmp_path: Path) -> str:
    return (
        "gateway: {id: gw}\n"
        f"store: {{path: {tmp_path / 'buffer.db'}}}\n"
        f"signing: {{key_file: {key_file}}}\n"
        "sources: [{type: simulated, name: sim, points: 1}]\n"
    )


def check_config(key_file: Path, tmp_path: Path) -> list[str]:
    """The problems `check-config` prints for a configuration naming `key_file`."""
    path = tmp_path / "agent.yaml"
    path.write_text(config_text(key_file, tmp_path))
    try:
        load_config(path)
    except ConfigError as exc:
        return [p.render(str(path)) for p in exc.problems]
    return []


def bad_key(tmp_path: Path, fault: str) -> Path:
    """A key pair in `tmp_path/keys` with one fault: its owner, its mode or its directory."""
    directory = tmp_path / "keys"
    write_keypair(directory)
    key = directory / "signing.key"
    if fault == "other owner":
        os.chown(key, NOBODY, NOBODY)  # the tests run as root, as CI does
    elif fault.startswith("mode"):
        key.chmod(int(fault.split()[1], 8))
    elif fault == "world-writable directory":
        directory.chmod(0o777)
    elif fault == "sticky world-writable directory":
        directory.chmod(0o1777)
    elif fault == "symlink into a world-writable directory":
        shared = tmp_path / "shared"
        shared.mkdir()
        (directory / "signing.key").rename(shared / "signing.key")
        shared.chmod(0o777)
        key.symlink_to(shared / "signing.key")
    return key


FAULTS = {
    "other owner": "owned by nobody (uid 65534)",
    "mode 0644": "readable by others (mode 644)",
    "mode 0640": "readable by others (mode 640)",
    "mode 0604": "readable by others (mode 604)",
    "mode 0660": "readable by others (mode 660)",
    "world-writable directory": "in a directory anyone may write",
    "sticky world-writable directory": "in a directory anyone may write",
    "symlink into a world-writable directory": "in a directory anyone may write",
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_check_config_and_run_refuse_the_same_key_files(tmp_path: Path, fault: str) -> None:
    key = bad_key(tmp_path, fault)
    problems = check_config(key, tmp_path)
    assert len(problems) == 1, problems
    assert ":3:" in problems[0] and "signing.key_file:" in problems[0], "located at the key"
    assert FAULTS[fault] in problems[0]
    with pytest.raises(
        PermissionError, match=FAULTS[fault].replace("(", r"\(").replace(")", r"\)")
    ):
        load_private_key(key)
    # the same words in both: check-config says exactly what run will refuse
    assert str(key_file_problems(key)[0]) in problems[0]


def test_a_key_file_of_the_agent_user_with_mode_0600_is_accepted(tmp_path: Path) -> None:
    write_keypair(tmp_path / "keys")
    key = tmp_path / "keys" / "signing.key"
    assert check_config(key, tmp_path) == []
    assert key_file_problems(key) == []
    (tmp_path / "keys" / "signing.key").chmod(0o400)  # systemd's credentials are 0400
    assert key_file_problems(key) == []


def test_a_directory_or_a_non_key_file_is_refused_without_quoting_it(tmp_path: Path) -> None:
    assert "not a regular file" in key_file_problems(tmp_path)[0]
    secret = tmp_path / "notakey"
    secret.write_text("hunter2-not-a-key\n")
    secret.chmod(0o600)
    with pytest.raises(ValueError, match="not an unencrypted PEM private key") as caught:
        load_private_key(secret)
    assert "hunter2" not in str(caught.value)


def test_keygen_next_makes_a_new_pair_beside_the_current_one(tmp_path: Path) -> None:
    current = write_keypair(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    kid, private = write_next_keypair(tmp_path)
    assert kid != current
    assert private.name == f"signing-{kid.hex()}.key"
    assert private.stat().st_mode & 0o777 == 0o600
    assert key_id(load_private_key(private).public_key()) == kid
    assert key_id(load_public_key(private.with_suffix(".pub"))) == kid
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before


def readings(count: int, start: int = 0) -> list[Reading]:
    return [
        Reading("sim", "p", NOW_NS + i, float(i), Quality.GOOD) for i in range(start, start + count)
    ]


async def test_a_rotated_batcher_signs_what_it_seals_next_with_the_new_key(tmp_path: Path) -> None:
    old, new = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    store = Store(tmp_path / "b.db", max_bytes=64 * 1024**2, max_age_s=86400)
    await store.open()
    batcher = Batcher(store, Sealer(old), Metrics(), gateway="gw", max_readings=10,
                      max_delay=0.05, capacity=1000)  # fmt: skip
    await batcher.emit(readings(20))
    await batcher.seal_pending()
    batcher.use_sealer(Sealer(new))
    await batcher.emit(readings(20, 20))
    await batcher.seal_pending()
    opener = Opener([old.public_key(), new.public_key()])
    kids = [opener.open(b.data).kid for b in await store.take(10)]
    assert kids == [key_id(old.public_key())] * 2 + [key_id(new.public_key())] * 2
    await store.close()


async def test_agent_rotation_keeps_the_running_key_when_the_new_file_is_refused(
    tmp_path: Path,
) -> None:
    write_keypair(tmp_path / "keys")
    config = parse_config(config_text(tmp_path / "keys" / "signing.key", tmp_path))
    agent = Agent(config)
    sealer = agent.load_sealer(config.signing.key_file)
    agent.batcher = Batcher(agent.store, sealer, agent.metrics, gateway="gw", max_readings=10,
                            max_delay=0.05, capacity=1000)  # fmt: skip
    kid, path = write_next_keypair(tmp_path / "keys")
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="chmod 600"):
        await agent.rotate_signing_key(path)
    assert agent.batcher.sealer is sealer
    path.chmod(0o600)
    before = audit_module.COUNTS[("key", "success")]
    assert await agent.rotate_signing_key(path) == kid
    assert agent.batcher.sealer.kid == kid
    assert audit_module.COUNTS[("key", "success")] == before + 1
    assert await agent.rotate_signing_key(path) == kid  # the same key again changes nothing
    assert audit_module.COUNTS[("key", "success")] == before + 1


def sealed(key: Ed25519PrivateKey, sealed_ns: int, first_seq: int = 1) -> bytes:
    return Sealer(key).seal(gateway="gw", epoch="e", batch=first_seq, first_seq=first_seq,
                            readings=readings(2), sealed_ns=sealed_ns)  # fmt: skip


def pem_file(path: Path, key: Ed25519PrivateKey) -> str:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path.name


def test_a_trust_set_refuses_retired_keys_and_batches_outside_validity(tmp_path: Path) -> None:
    old, new, retired = (Ed25519PrivateKey.generate() for _ in range(3))
    (tmp_path / "trust.yaml").write_text(
        "keys:\n"
        f"  - public_key: {pem_file(tmp_path / 'old.pub', old)}\n"
        "    not_after: 2030-01-01T00:00:00Z\n"
        f"  - public_key: {pem_file(tmp_path / 'new.pub', new)}\n"
        f"    kid: {key_id(new.public_key()).hex()}\n"
        "    not_before: 2025-01-01T00:00:00+00:00\n"
        f"  - public_key: {pem_file(tmp_path / 'retired.pub', retired)}\n"
        "    retired: true\n"
    )
    trust = trusted_keys([], [str(tmp_path / "trust.yaml")])
    verifier = Verifier(Opener(trust.public_keys()), trust=trust)
    y2024, y2031 = 1_704_067_200 * 10**9, 1_924_992_000 * 10**9
    assert verifier.check(sealed(old, y2024))[0] is not None
    assert verifier.check(sealed(new, NOW_NS, 3))[0] is not None
    assert verifier.result.rejected == 0
    for message, reason in [
        (sealed(retired, NOW_NS, 5), "is retired"),
        (sealed(old, y2031, 7), "after key id"),
        (sealed(new, y2024, 9), "before key id"),
        (sealed(Ed25519PrivateKey.generate(), NOW_NS, 11), "unknown key id"),
    ]:
        batch, fresh = verifier.check(message)
        assert (batch, fresh) == (None, [])
        assert reason in (verifier.result.last_error or "")
    assert verifier.result.rejected == 4
    assert verifier.tracker.holes() == {}, "refused batches never enter completeness"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys: []\n", "the list is empty"),
        ("[]\n", "one key, `keys:`"),
        ("keys: [{public_key: absent.pub}]\n", r"keys\[0\].public_key: cannot load"),
        ("keys: [{public_key: k.pub, colour: red}]\n", "unknown key colour"),
        ("keys: [{public_key: k.pub, kid: 00}]\n", r"keys\[0\].kid: 0 is not the key's id"),
        ("keys: [{public_key: k.pub, retired: maybe}]\n", "retired: expected true or false"),
        ("keys: [{public_key: k.pub, not_before: soon}]\n", "not an ISO 8601 time"),
        ("keys: [{public_key: k.pub}, {public_key: k.pub}]\n", r"also keys\[0\]"),
        (
            "keys: [{public_key: k.pub, not_before: 2030-01-01T00:00:00Z, "
            "not_after: 2020-01-01T00:00:00Z}]\n",
            "not_before is after not_after",
        ),
        # Bounded before it is judged, the file named: an alias (nested ones expand a few
        # hundred bytes to hundreds of MB), nesting PyYAML cannot compose, a runaway size.
        ("keys: [{public_key: &k k.pub, kid: *k}]\n", r"trust\.yaml: not a YAML trust file: alias"),
        ("keys: " + "[" * 1000 + "]" * 1000, r"trust\.yaml: not a YAML trust file: nested deeper"),
        ("keys: []\n#" + "x" * 1024**2, r"trust\.yaml: larger than 1 MiB"),
    ],
)
def test_a_bad_trust_file_is_refused_naming_the_entry(
    tmp_path: Path, text: str, message: str
) -> None:
    pem_file(tmp_path / "k.pub", Ed25519PrivateKey.generate())
    (tmp_path / "trust.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        TrustSet.load(tmp_path / "trust.yaml")


def test_a_key_not_trusted_at_all_is_unknown(tmp_path: Path) -> None:
    trust = TrustSet.of([Ed25519PrivateKey.generate().public_key()])
    with pytest.raises(KeyNotValidError, match="unknown key id"):
        trust.check(b"\x00" * 8, NOW_NS)


def test_an_audit_event_is_one_structured_record_and_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    before = audit_module.COUNTS[("authentication", "failure")]
    with caplog.at_level(logging.INFO, logger="edge_agent.audit"):
        event = audit("authentication", "failure", broker="b:1883", user="agent",
                      error="refused at mqtt://agent:hunter2@b", kid=b"\x01\x02")  # fmt: skip
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.audit == event  # type: ignore[attr-defined]
    assert {"time", "category", "outcome", "broker", "user"} <= set(event)
    assert event["kid"] == "0102"
    assert "hunter2" not in record.getMessage(), "credentials in a URL are scrubbed"
    assert record.getMessage().startswith("Audit time=")
    assert "category=authentication outcome=failure" in record.getMessage()
    assert audit_module.COUNTS[("authentication", "failure")] == before + 1


def test_the_audit_counter_is_on_metrics() -> None:
    from prometheus_client import generate_latest

    from edge_agent.metrics import AuditCollector

    metrics = Metrics()
    metrics.registry.register(AuditCollector({("key", "success"): 2}))
    text = generate_latest(metrics.registry).decode()
    assert 'edge_agent_audit_events_total{category="key",outcome="success"} 2.0' in text


async def test_an_eviction_is_an_audit_event(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = Ed25519PrivateKey.generate()
    store = Store(tmp_path / "b.db", max_bytes=1024**2, max_age_s=86400)
    await store.open()
    batcher = Batcher(store, Sealer(key, compress=False), Metrics(), gateway="gw",
                      max_readings=1000, max_delay=0.05, capacity=10_000)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="edge_agent.audit"):
        for start in range(0, 30_000, 1000):
            await batcher.emit(readings(1000, start))
            await batcher.seal_pending()
    events = [r.audit for r in caplog.records if hasattr(r, "audit")]  # type: ignore[attr-defined]
    assert events, "retention evicted readings without an audit event"
    assert all(e["category"] == "eviction" and e["readings"] > 0 for e in events)
    assert sum(e["readings"] for e in events) == store.stats.evicted_readings
    await store.close()
