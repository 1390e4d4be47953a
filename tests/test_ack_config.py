"""Configuration of the consumer acknowledgement (docs/contract.md §2, §4.10): `mqtt.ack`,
`mqtt.ack_keys`, `mqtt.ack_timeout`; every mistake named with its place."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import load_config, parse_config
from edge_agent.errors import ConfigError
from edge_agent.seal.keys import write_keypair

pytestmark = pytest.mark.unit

BASE = """
gateway: {id: gw1}
signing: {key_file: %s}
sources:
  - {type: simulated, name: sim}
"""


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [p.render(path.name) for p in caught.value.problems]


def config_file(tmp_path: Path, mqtt: str) -> Path:
    write_keypair(tmp_path / "gw")
    path = tmp_path / "agent.yaml"
    path.write_text(BASE % (tmp_path / "gw" / "signing.key") + mqtt)
    return path


def test_defaults_are_broker_mode_and_30s() -> None:
    config = parse_config(BASE % "/k")
    assert (config.mqtt.ack, config.mqtt.ack_keys, config.mqtt.ack_timeout) == ("broker", [], 30.0)


def test_end_to_end_with_a_consumer_public_key(tmp_path: Path) -> None:
    write_keypair(tmp_path / "consumer")
    pub = tmp_path / "consumer" / "signing.pub"
    path = config_file(tmp_path, f"mqtt: {{ack: end_to_end, ack_keys: [{pub}], ack_timeout: 2s}}\n")
    config = load_config(path)
    assert (config.mqtt.ack, config.mqtt.ack_keys, config.mqtt.ack_timeout) == (
        "end_to_end", [pub], 2.0,
    )  # fmt: skip


def test_end_to_end_needs_keys(tmp_path: Path) -> None:
    found = problems(config_file(tmp_path, "mqtt: {ack: end_to_end}\n"))
    assert len(found) == 1 and "mqtt.ack_keys" in found[0] and "end_to_end" in found[0]


@pytest.mark.parametrize(
    ("mqtt", "expected"),
    [
        ("mqtt: {ack: both}\n", "mqtt.ack"),
        ("mqtt: {ack_timeout: -1s}\n", "mqtt.ack_timeout"),
        ("mqtt: {ack_keys: /nonexistent.pub}\n", "mqtt.ack_keys"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, mqtt: str, expected: str) -> None:
    found = problems(config_file(tmp_path, mqtt))
    assert any(expected in line for line in found), found


def test_key_files_are_checked_and_a_private_key_is_refused(tmp_path: Path) -> None:
    write_keypair(tmp_path / "consumer")
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("not a key")
    private = tmp_path / "consumer" / "signing.key"
    missing = tmp_path / "missing.pub"
    keys = f"[{garbage}, {private}, {missing}]"
    found = problems(config_file(tmp_path, f"mqtt: {{ack: end_to_end, ack_keys: {keys}}}\n"))
    assert any("mqtt.ack_keys[0]" in p and "not a PEM public key" in p for p in found), found
    assert any("mqtt.ack_keys[1]" in p and "is a private key" in p for p in found), found
    assert any("mqtt.ack_keys[2]" in p and "not found" in p for p in found), found
    assert not any("BEGIN" in p for p in found), "a key file's content is never quoted"
