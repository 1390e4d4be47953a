"""Configuration: every problem reported with its key path and line; nothing starts on error."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.config import load_config, parse_config
from edge_agent.errors import ConfigError

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


def test_five_mistakes_are_all_reported_with_lines(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "gateway:\n"
        "  id: pit3 gw\n"  # 2: space not allowed
        "store:\n"
        "  max_bytes: lots\n"  # 4: not a size
        "mqtt:\n"
        "  url: http://broker:1883\n"  # 6: wrong scheme
        "  colour: blue\n"  # 7: unknown key
        "sources:\n"
        "  - type: modbus\n"
        "    name: plc\n"
        "    host: 10.0.0.5\n"
        "    points:\n"
        "      - {name: a, register: holding, address: 1, type: float33}\n"  # 13: bad type
    )
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    expected = [
        (2, "gateway.id"),
        (4, "store.max_bytes"),
        (6, "mqtt.url"),
        (7, "mqtt.colour"),
        (13, "sources[0].points[0].type"),
    ]
    for line_no, key in expected:
        assert any(
            line.startswith(f"{path}:{line_no}:") and f": {key}: " in line for line in lines
        ), (line_no, key, lines)
    assert "5 problems" in lines[-1]


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


def test_files_over_one_mebibyte_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text(MINIMAL + "#" * (1024 * 1024))
    with pytest.raises(ConfigError, match="larger than 1 MiB"):
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


def test_check_config_exit_codes(tmp_path: Path, keys: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(MINIMAL + f"signing: {{key_file: {keys / 'signing.key'}}}\n")

    def run(path: Path) -> int:
        return subprocess.run(
            [sys.executable, "-m", "edge_agent", "check-config", str(path)],
            capture_output=True,
            check=False,
        ).returncode

    assert run(good) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("gateway: {}\n")
    assert run(bad) == 1
    assert run(tmp_path / "absent.yaml") == 2


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"gateway: {id: g}\n\xff\xfe junk\n", "not UTF-8"),
        (b'gateway: {id: g}\nx: "\x01"\n', "unacceptable character"),
        (b"gateway: {id: !!int abc}\n", "gateway.id: invalid value"),
        (b"gateway: !!python/object:os.system x\n", "could not determine a constructor"),
        (b"gateway: {id: " + b"9" * 5000 + b"}\n", "gateway.id: invalid value"),
        (b"a: " + b"[" * 5000 + b"\n", "nested too deeply"),
        (b"store: {max_age: .inf}\n", "store.max_age: Input should be a finite number"),
        (b"mqtt: {keepalive: 70000}\n", "mqtt.keepalive"),
        (b'health: {listen: "127.0.0.1:99999"}\n', "health.listen: port must be 1-65535"),
    ],
)
def test_hostile_files_get_problems_not_tracebacks(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert expected in result.stderr


def test_a_fifo_is_refused_without_hanging(tmp_path: Path) -> None:
    fifo = tmp_path / "agent.yaml"
    os.mkfifo(fifo)
    result = subprocess.run(
        [sys.executable, "-m", "edge_agent", "check-config", str(fifo)],
        capture_output=True, text=True, check=False, timeout=20,
    )  # fmt: skip
    assert result.returncode == 2
    assert "not a regular file" in result.stderr


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
