"""Configuration: every problem reported with its key path and line; nothing starts on error.

(`edge-agent check-config` run as a process, with its exit codes: test_config_cli.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edge_agent.config import load_config, parse_config
from edge_agent.config import loader as config_loader
from edge_agent.errors import ConfigError

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent

MINIMAL = """
gateway: {id: gw1}
sources:
  - {type: simulated, name: sim}
"""


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "cfg.yaml")
    return [p.render("cfg.yaml") for p in caught.value.problems]


def test_minimal_config_gets_safe_defaults() -> None:
    config = parse_config(MINIMAL)
    assert config.health.host == "127.0.0.1"
    assert config.mqtt.protocol == "5"
    assert config.store.max_bytes == 2 * 1024**3
    assert config.store.max_age == 7 * 86400


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("1s", 1.0), ("5m", 300.0), ("2h", 7200.0), ("7d", 604800.0), ("3", 3.0)],
)
def test_durations_are_parsed(text: str, seconds: float) -> None:
    config = parse_config(MINIMAL + f"batch: {{max_delay: {text}}}\n")
    assert config.batch.max_delay == seconds


def test_sizes_are_parsed() -> None:
    config = parse_config(MINIMAL + "store: {max_bytes: 512MiB}\n")
    assert config.store.max_bytes == 512 * 1024**2


def test_the_packet_limit_is_a_size_of_at_least_512_bytes() -> None:
    assert parse_config(MINIMAL).mqtt.max_packet_size is None
    assert parse_config(MINIMAL + "mqtt: {max_packet_size: 128KiB}\n").mqtt.max_packet_size == (
        128 * 1024
    )
    assert parse_config(MINIMAL + "mqtt: {max_packet_size: 550}\n").mqtt.max_packet_size == 550
    [problem] = problems_of(MINIMAL + "mqtt: {max_packet_size: 100}\n")
    assert "mqtt.max_packet_size" in problem and "512" in problem


def test_unknown_key_is_an_error_not_ignored() -> None:
    [problem] = problems_of(MINIMAL + "batch: {max_readingz: 10}\n")
    assert "batch.max_readingz: unknown key" in problem
    assert problem.startswith("cfg.yaml:5:")


def test_duplicate_source_names_are_refused_with_path() -> None:
    [problem] = problems_of(MINIMAL + "  - {type: simulated, name: sim}\n")
    assert "sources[1].name: duplicate name 'sim' (also sources[0])" in problem


def test_yaml_aliases_are_refused() -> None:
    bomb = 'a: &a ["x","x"]\nb: &b [*a,*a]\ngateway: {id: g}\n'
    [problem] = problems_of(bomb)
    assert "aliases" in problem
    assert problem.startswith("cfg.yaml:2:")


def test_files_over_four_mebibytes_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(MINIMAL + "#" * (4 * 1024 * 1024))
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        load_config(path)


def test_environment_variables_are_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_ID", "pit9")
    config = parse_config(MINIMAL.replace("gw1", '"${GW_ID}"'))
    assert config.gateway.id == "pit9"


def test_missing_environment_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE_NOT_SET", raising=False)
    [problem] = problems_of(MINIMAL.replace("gw1", '"${NOPE_NOT_SET}"'))
    assert "environment variable NOPE_NOT_SET is not set" in problem


def test_secret_comes_from_file_and_missing_files_are_reported(tmp_path: Path) -> None:
    secret = tmp_path / "mqtt-password"
    secret.write_text("s3cret\n")
    config = parse_config(MINIMAL + f"mqtt: {{password_file: {secret}}}\n")
    assert config.mqtt.password_value() == "s3cret"
    path = tmp_path / "cfg.yaml"
    path.write_text(MINIMAL + f"mqtt: {{password_file: {tmp_path / 'missing'}}}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    rendered = [p.render(str(path)) for p in caught.value.problems]
    assert any("mqtt.password_file: file not found" in r for r in rendered)
    assert any("signing.key_file: file not found" in r for r in rendered)


def test_secret_is_never_shown() -> None:
    config = parse_config(MINIMAL + "mqtt: {password: hunter2}\n")
    assert "hunter2" not in repr(config)
    assert "hunter2" not in str(config.model_dump())


def test_example_config_documents_a_valid_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/edge-agent.service")
    config = parse_config((ROOT / "config" / "example.yaml").read_text(), "example.yaml")
    assert {s.type for s in config.sources} == {"modbus", "opcua", "simulated"}


def test_opcua_client_keys_default_to_the_state_directory(tmp_path: Path) -> None:
    node = '{name: a, node_id: "ns=2;s=A"}'
    config = parse_config(
        f"gateway: {{id: g}}\nstore: {{path: {tmp_path}/state/buffer.db}}\nsources:\n"
        f"  - {{type: opcua, name: u, endpoint: 'opc.tcp://h:4840', security: {{policy: None}},"
        f" nodes: [{node}]}}\n"
        f"  - {{type: opcua, name: v, endpoint: 'opc.tcp://h:4840',"
        f" security: {{policy: None, pki_dir: {tmp_path}/pki}}, nodes: [{node}]}}\n"
    )
    assert [s.security.pki_dir for s in config.sources] == [tmp_path / "state" / "opcua",
                                                            tmp_path / "pki"]  # fmt: skip


def test_scales_and_offsets_that_make_every_value_nan_are_refused() -> None:
    """A NaN or infinite scale, offset or amplitude would turn every reading into one."""
    text = """
gateway: {id: gw1}
sources:
  - {type: simulated, name: sim, points: [{name: a, amplitude: .inf}]}
  - type: modbus
    name: plc
    host: 10.0.0.5
    points: [{name: b, register: holding, address: 0, scale: .nan, offset: -.inf}]
"""
    found = [p for p in problems_of(text) if "finite number" in p]
    assert len(found) == 3, found
    assert found[0].startswith("cfg.yaml:4:") and "amplitude: Input should be a finite" in found[0]
    assert found[1].startswith("cfg.yaml:8:") and "sources[1].points[0].scale: " in found[1]
    assert found[2].startswith("cfg.yaml:8:") and "sources[1].points[0].offset: " in found[2]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('a: &a ["x","x"]\nb: [*a]\n', "cfg.yaml:2:5: (top): YAML aliases (*name) are not allowed"),
        (MINIMAL + "? [a]\n: 1\n", "cfg.yaml:5:3: (top): keys must be plain text"),
        (MINIMAL + "gateway: {id: g2}\n", "cfg.yaml:5:1: gateway: duplicate key"),
        (MINIMAL + 'x: "\x01"\n', "cfg.yaml:5:5: (top): unacceptable character #x0001: "),
        ("a: 1\n---\nb: 2\n", "cfg.yaml:2:1: (top): expected a single document in the stream"),
        ("a:\n" + "".join(f"{'  ' * i}- \n" for i in range(1, 70)), "cfg.yaml:65:"),
        (MINIMAL + "batch: {max_readings: 0}\n", "cfg.yaml:5:23: batch.max_readings: Input"),
    ],
)
def test_libyaml_and_the_python_parser_report_the_same(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: str
) -> None:
    """The loader uses libyaml's parser when PyYAML has it, else PyYAML's own: same results."""
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/edge-agent.service")
    example = (ROOT / "config" / "example.yaml").read_text()
    found, config = problems_of(text), parse_config(example)
    assert found[0].startswith(expected), found
    monkeypatch.setattr(config_loader, "_PARSER", yaml.SafeLoader)
    python = problems_of(text)
    # the same place and key path; the parsers word some syntax errors differently
    assert [p.split(": ")[:2] for p in python] == [p.split(": ")[:2] for p in found]
    assert parse_config(example) == config
