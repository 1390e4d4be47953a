"""OPC UA configuration: explicit security, refused policies, mode-specific keys, node ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import parse_config
from edge_agent.config.opcua import OpcuaSourceConfig
from edge_agent.errors import ConfigError

pytestmark = pytest.mark.unit

BASE = """\
gateway: {id: gw}
sources:
  - type: opcua
    name: mill
    endpoint: opc.tcp://10.0.0.6:4840
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + text)
    return [f"{p.path}: {p.message}" for p in info.value.problems]


@pytest.mark.parametrize("policy", ["Basic256", "Basic128Rsa15"])
def test_deprecated_policies_are_refused_with_the_reason(policy: str) -> None:
    (message,) = problems(
        f"    security: {{policy: {policy}}}\n    nodes: [{{name: a, node_id: i=2258}}]\n"
    )
    assert message.startswith("sources[0].security.policy: security policy")
    assert "deprecated" in message and "Basic256Sha256" in message


def test_security_must_be_written_even_to_have_none() -> None:
    (message,) = problems("    nodes: [{name: a, node_id: i=2258}]\n")
    assert message == "sources[0].security: required key is missing"
    config = parse_config(
        BASE + "    security: {policy: None}\n    nodes: [{name: a, node_id: i=2258}]\n"
    )
    assert config.sources[0].security.message_mode == "None"  # type: ignore[union-attr]


def test_mode_must_fit_the_policy() -> None:
    (message,) = problems(
        "    security: {policy: None, mode: Sign}\n    nodes: [{name: a, node_id: i=1}]\n"
    )
    assert "needs a security policy" in message
    (message,) = problems(
        "    security: {policy: Basic256Sha256, mode: None}\n    nodes: [{name: a, node_id: i=1}]\n"
    )
    assert "needs mode Sign or SignAndEncrypt" in message


def test_node_problems_have_key_paths() -> None:
    found = problems(
        "    security: {policy: None}\n"
        "    nodes:\n"
        "      - {name: a, node_id: 'ns=2;s=A'}\n"
        "      - {name: a, node_id: 'ns=2;s=A'}\n"
        "      - {name: c, node_id: 'garbage'}\n"
    )
    assert any(m.startswith("sources[0].nodes[1].name: duplicate name") for m in found)
    assert any(m.startswith("sources[0].nodes[1].node_id: duplicate node_id") for m in found)
    assert any(
        m.startswith("sources[0].nodes[2].node_id: invalid node id 'garbage'") for m in found
    )


def test_subscription_keys_are_refused_in_poll_mode() -> None:
    (message,) = problems(
        "    security: {policy: None}\n    mode: poll\n"
        "    nodes: [{name: a, node_id: i=1, deadband: {type: absolute, value: 1}}]\n"
    )
    assert "apply to mode subscribe only" in message


def test_defaults_and_files_to_check(tmp_path: Path) -> None:
    config = OpcuaSourceConfig.model_validate(
        {
            "type": "opcua",
            "name": "m",
            "endpoint": "opc.tcp://plc:4840",
            "security": {"policy": "Basic256Sha256", "server_certificate": "/x/server.der"},
            "auth": {"username": "u", "password_file": "/x/pw"},
            "nodes": [{"name": "a", "node_id": "i=1"}],
        }
    )
    assert config.security.message_mode == "SignAndEncrypt"
    assert config.security.certificate_path == Path("/var/lib/edge-agent/opcua/client-cert.der")
    assert config.security.trust_path == Path("/var/lib/edge-agent/opcua/trusted")
    files = dict(config.files_to_check())
    assert files == {
        ("security", "server_certificate"): Path("/x/server.der"),
        ("auth", "password_file"): Path("/x/pw"),
    }


def test_a_password_needs_a_username() -> None:
    (message,) = problems(
        "    security: {policy: None}\n"
        "    auth: {password: x}\n"
        "    nodes: [{name: a, node_id: i=1}]\n"
    )
    assert "a password needs a username" in message


def test_node_ids_are_checked_in_both_forms() -> None:
    """check-config parses `ns=` and `nsu=` node ids itself (issue 8, case 5): a malformed one
    is refused with what is wrong, at its key path; the URI form is accepted as written."""
    good = [
        "nsu=urn:example:plant;s=Tank.Level",
        "nsu=http://example.com/UA/;i=1001",
        "nsu=urn:a%3Bb;s=x",
        "ns=3;s=Tank.Level;with;semicolons",
        "ns=1;g=09087e75-8e5e-499b-954f-f2a9603db28a",
        "ns=1;b=M/RbKBsRVkePCePcx24oRA==",
        "i=2258",
    ]
    bad = {
        "nsu=;s=A": "the namespace URI after nsu= is empty",
        "nsu=urn:x": "the namespace must be followed by ';' and an identifier",
        "nsu=urn:x;Tank.Level": "the identifier must start with i=, s=, g= or b=",
        "ns=three;s=A": "namespace index 'three' is not a number from 0 to 65535",
        "ns=70000;i=1": "namespace index '70000' is not a number",
        "ns=2;i=12x": "numeric identifier '12x' is not a number",
        "ns=2;s=": "the string identifier after s= is empty",
        "ns=2;g=not-a-guid": "GUID identifier 'not-a-guid' is not of the form",
        "ns=2;b=***": "opaque identifier '***' is not base64",
        "srv=1;ns=2;i=1": "a server index (srv=) is not supported",
    }
    nodes = [{"name": f"n{i}", "node_id": node_id} for i, node_id in enumerate([*good, *bad])]
    config = OpcuaSourceConfig.model_validate(
        {
            "type": "opcua",
            "name": "m",
            "endpoint": "opc.tcp://plc:4840",
            "security": {"policy": "None"},
            "nodes": nodes,
        }
    )
    found = dict(config.problems())
    assert set(found) == {("nodes", len(good) + i, "node_id") for i in range(len(bad))}
    for i, (node_id, reason) in enumerate(bad.items()):
        message = found[("nodes", len(good) + i, "node_id")]
        assert message.startswith(f"invalid node id {node_id!r}: {reason}"), message
        assert "nsu=urn:example:plant;s=Tank.Level" in message  # the example shows the URI form


def test_session_timeout_has_a_floor() -> None:
    (message,) = problems(
        "    security: {policy: None}\n"
        "    session_timeout: 2s\n"
        "    nodes: [{name: a, node_id: i=1}]\n"
    )
    assert message.startswith("sources[0].session_timeout:")
    config = parse_config(
        BASE + "    security: {policy: None}\n    nodes: [{name: a, node_id: i=1}]\n"
    )
    assert config.sources[0].session_timeout == 30.0  # type: ignore[union-attr]
