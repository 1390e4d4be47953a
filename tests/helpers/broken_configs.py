# ruff: noqa: E501 - one case per line reads as a table
"""A corpus of broken configuration files: each is refused, fast, with a message naming the place.

Each case is (id, how to make the file, what the message must say). The expected text holds the
key path (and where the file has one, the line and column): a refusal that does not say where
is not clear. Used by tests/test_config_corpus.py in-process (timed) and through `check-config`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BASE = """\
gateway: {{id: gw}}
store: {{path: {store}}}
signing: {{key_file: {key}}}
sources:
  - type: modbus
    name: plc
    host: 127.0.0.1
    points:
      - {{name: a, register: holding, address: 0}}
"""
"""A valid file; `{store}` and `{key}` are filled in per test."""

MODBUS = "  - type: modbus\n    name: {name}\n    host: 127.0.0.1\n    points:\n"
OPCUA = (
    "  - type: opcua\n    name: ua\n    endpoint: opc.tcp://127.0.0.1:4840\n"
    "    security: {policy: None}\n    nodes:\n"
)


@dataclass(frozen=True)
class Broken:
    id: str
    make: Callable[[Path, str], None]
    """Writes the broken file at the path, given the valid BASE text for this test."""
    expected: str
    """Text the refusal must contain (the place, and what is wrong)."""


def text(content: str) -> Callable[[Path, str], None]:
    """A file whose content is `content`, with `{base}` standing for the valid file."""

    def make(path: Path, base: str) -> None:
        path.write_text(content.replace("{base}", base))

    return make


def raw(content: bytes) -> Callable[[Path, str], None]:
    def make(path: Path, base: str) -> None:
        path.write_bytes(content)

    return make


def points(*lines: str) -> Callable[[Path, str], None]:
    """The valid file with more points on its Modbus device (from line 10)."""
    return text("{base}" + "".join(f"      - {line}\n" for line in lines))


def replace(old: str, new: str) -> Callable[[Path, str], None]:
    def make(path: Path, base: str) -> None:
        assert old in base, old
        path.write_text(base.replace(old, new, 1))

    return make


def big(path: Path, base: str) -> None:
    with path.open("w") as out:
        out.write(base)
        line = "# " + "x" * 1022 + "\n"
        for _ in range(10 * 1024):
            out.write(line)


def directory(path: Path, base: str) -> None:
    path.mkdir()


def fifo(path: Path, base: str) -> None:
    os.mkfifo(path)


def key_mode(path: Path, base: str) -> None:
    key = Path(base.split("key_file: ")[1].split("}", maxsplit=1)[0])
    key.chmod(0o644)
    path.write_text(base)


BILLION_LAUGHS = (
    "a: &a [x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )  # fmt: skip
    + "gateway: {id: *i}\n"
)

CORPUS: list[Broken] = [
    # types
    Broken("id-not-text", replace("{id: gw}", "{id: [gw]}"), ":1:15: gateway.id: Input should be a valid string"),
    Broken("size-not-size", replace("store: {", "store: {max_bytes: lots, "), "store.max_bytes"),
    Broken("int-not-int", text("{base}batch: {max_readings: ten}\n"), ":10:23: batch.max_readings"),
    Broken("sources-a-map", replace("sources:\n", "sources: {}\nx:\n"), "sources"),
    Broken("negative-address", replace("address: 0", "address: -1"), ":9:47: sources[0].points[0].address"),
    Broken("address-too-big", replace("address: 0", "address: 70000"), "sources[0].points[0].address: Input should be less than or equal to 65535"),
    Broken("duration-not-duration", text("{base}mqtt: {keepalive: fast}\n"), ":10:19: mqtt.keepalive: invalid duration"),
    Broken("zero-interval", replace("host: 127.0.0.1", "host: 127.0.0.1\n    poll_interval: 0"), ":8:20: sources[0].poll_interval: Input should be greater than 0"),
    Broken("negative-duration", text("{base}batch: {max_delay: -1s}\n"), "batch.max_delay: invalid duration"),
    Broken("nan-age", replace("store: {", "store: {max_age: .nan, "), ":2:18: store.max_age: Input should be"),
    Broken("infinite-scale", replace("address: 0}", "address: 0, scale: .inf}"), "sources[0].points[0].scale: Input should be a finite number"),
    Broken("bool-for-text", replace("name: plc", "name: yes"), ":6:11: sources[0].name: Input should be a valid string"),
    # unknown and duplicate keys
    Broken("unknown-top-key", text("{base}colour: red\n"), ":10:9: colour: unknown key"),
    Broken("misspelt-secret-key", text("{base}mqtt: {passwd: x}\n"), ":10:16: mqtt.passwd: unknown key"),
    Broken("misspelt-point-key", replace("address: 0}", "adress: 0}"), "sources[0].points[0].adress: unknown key"),
    Broken("duplicate-section", text("{base}gateway: {id: other}\n"), ":10:1: gateway: duplicate key"),
    Broken("duplicate-point-key", replace("address: 0}", "address: 0, address: 1}"), ":9:50: sources[0].points[0].address: duplicate key"),
    # code execution and expansion
    Broken("python-apply", text("gateway: !!python/object/apply:os.system [echo pwned]\n"), ":1:10: gateway: invalid value: tag !!python/object/apply:os.system is not allowed"),
    Broken("python-name", text("gateway: {id: !!python/name:os.system ''}\n"), "gateway.id: invalid value"),
    Broken("python-new", text("gateway: !!python/object/new:subprocess.Popen [[id]]\n"), ":1:10: gateway: invalid value: tag !!python/object/new:subprocess.Popen is not allowed"),
    Broken("custom-tag", replace("{id: gw}", "{id: !env HOME}"), ":1:15: gateway.id: invalid value"),
    Broken("alias-bomb", text(BILLION_LAUGHS), ":2:8: (top): YAML aliases (*name) are not allowed"),
    Broken("merge-key", text("x: &x {id: gw}\ngateway:\n  <<: *x\n"), ":3:7: (top): YAML aliases"),
    Broken("ten-megabytes", big, "(top): file is larger than 4 MiB"),
    Broken("deep-nesting", text("a: " + "[" * 5000 + "\n"), ":1:1: (top): nested too deeply"),
    Broken("unset-variable", replace("{id: gw}", "{id: '${EDGE_AGENT_TEST_UNSET_VAR}'}"), ":1:15: gateway.id: environment variable EDGE_AGENT_TEST_UNSET_VAR is not set"),
    # not a configuration file at all
    Broken("directory", directory, "not a regular file"),
    Broken("fifo", fifo, "not a regular file"),
    Broken("empty", text(""), "the file is empty"),
    Broken("a-list", text("- gateway\n- sources\n"), ":1:1: (top): the top level must be a mapping"),
    Broken("not-utf8", raw(b"gateway: {id: gw\xff}\n"), "(top): not UTF-8 text (byte 16 is 0xff)"),
    Broken("utf16", raw("gateway: {id: gw}\n".encode("utf-16")), "(top): not UTF-8 text"),
    Broken("control-character", raw(b'gateway: {id: "g\x01w"}\n'), "unacceptable character"),
    Broken("tab-indent", text("gateway:\n\tid: gw\n"), ":2:1: (top): while scanning"),
    # names
    Broken("duplicate-source", text("{base}" + MODBUS.format(name="plc") + "      - {name: b, register: input, address: 0}\n"), ":11:11: sources[1].name: duplicate name 'plc' (also sources[0])"),
    Broken("duplicate-point", points("{name: a, register: holding, address: 5}"), ":10:16: sources[0].points[1].name: duplicate name 'a' (also points[0])"),
    Broken("duplicate-node-name", text("{base}" + OPCUA + "      - {name: n, node_id: 'ns=2;i=1'}\n      - {name: n, node_id: 'ns=2;i=2'}\n"), ":16:16: sources[1].nodes[1].name: duplicate name 'n'"),
    Broken("duplicate-node-id", text("{base}" + OPCUA + "      - {name: n, node_id: 'ns=2;i=1'}\n      - {name: m, node_id: 'ns=2;i=1'}\n"), ":16:28: sources[1].nodes[1].node_id: duplicate node_id"),
    Broken("bad-name", replace("name: plc", "name: 'plc one'"), ":6:11: sources[0].name: String should match pattern"),
    # overlapping points
    Broken("overlap-int32", points("{name: b, register: holding, address: 0, type: int32}"), ":10:47: sources[0].points[1].address: overlaps points[0] ('a', holding 0)"),
    Broken("overlap-coil", points("{name: b, register: coil, address: 3, type: bool}", "{name: c, register: coil, address: 3, type: bool}"), ":11:44: sources[0].points[2].address: overlaps points[1] ('b', coil 3)"),
    Broken("overlap-same-bit", points("{name: b, register: input, address: 7, type: bool, bit: 2}", "{name: c, register: input, address: 7, type: bool, bit: 2}"), "sources[0].points[2].bit: overlaps points[1] ('b', input 7 bit 2)"),
    Broken("overlap-string", points("{name: b, register: holding, address: 10, type: string, length: 8}", "{name: c, register: holding, address: 17, type: float32}"), "sources[0].points[2].address: overlaps points[1] ('b', holding 10..17)"),
    # writes
    Broken("write-register-kind", replace("register: holding", "register: holding_write"), ":9:29: sources[0].points[0].register: Input should be 'coil', 'discrete', 'input' or 'holding'"),
    Broken("write-function-code", replace("address: 0}", "address: 0, function: 6}"), "sources[0].points[0].function: unknown key"),
    Broken("write-section", text("{base}writes: [{point: a, value: 1}]\n"), ":10:9: writes: unknown key"),
    # odd ports
    Broken("port-zero", replace("host: 127.0.0.1", "host: 127.0.0.1\n    port: 0"), ":8:11: sources[0].port: Input should be greater than or equal to 1"),
    Broken("port-too-big", replace("host: 127.0.0.1", "host: 127.0.0.1\n    port: 65536"), "sources[0].port: Input should be less than or equal to 65535"),
    Broken("port-text", replace("host: 127.0.0.1", "host: 127.0.0.1\n    port: 502a"), "sources[0].port: Input should be a valid integer"),
    Broken("broker-port-zero", text("{base}mqtt: {url: 'mqtt://127.0.0.1:0'}\n"), ":10:13: mqtt.url: port 0 is not a broker port"),
    Broken("broker-port-too-big", text("{base}mqtt: {url: 'mqtt://127.0.0.1:99999'}\n"), "mqtt.url: invalid port"),
    Broken("health-port-zero", text("{base}health: {listen: '127.0.0.1:0'}\n"), ":10:18: health.listen: port must be 1-65535"),
    Broken("opcua-port-letters", text("{base}" + OPCUA.replace(":4840", ":48x0") + "      - {name: n, node_id: 'ns=2;i=1'}\n"), ":12:15: sources[1].endpoint: String should match pattern"),
    # secrets, keys and security
    Broken("credentials-in-url", text("{base}mqtt: {url: 'mqtts://agent:s3cret@broker:8883'}\n"), ":10:13: mqtt.url: credentials in the url are refused"),
    Broken("two-passwords", text("{base}mqtt: {username: u, password: a, password_file: /dev/null}\n"), ":10:7: mqtt: give password or password_file, not both"),
    Broken("missing-password-file", text("{base}mqtt: {username: u, password_file: /nonexistent/pw}\n"), ":10:36: mqtt.password_file: file not found"),
    Broken("key-readable-by-others", key_mode, ":3:21: signing.key_file: "),
    Broken("deprecated-policy", text("{base}" + OPCUA.replace("policy: None", "policy: Basic128Rsa15") + "      - {name: n, node_id: 'ns=2;i=1'}\n"), ":13:24: sources[1].security.policy: security policy Basic128Rsa15 is refused"),
    Broken("tls-without-mqtts", text("{base}mqtt: {tls: {ca_file: /dev/null}}\n"), ":10:7: mqtt: tls needs an mqtts:// url"),
    Broken("bad-node-id", text("{base}" + OPCUA + "      - {name: n, node_id: 'ns=2;x=1'}\n"), ":15:28: sources[1].nodes[0].node_id: invalid node id"),
]  # fmt: skip
