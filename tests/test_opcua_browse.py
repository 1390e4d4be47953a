"""`edge-agent browse`: a pasteable `nodes:` list, over a secured channel, without writing.

(How browse names points, without a server: test_opcua_browse_names.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers.opcua_servers import NAMESPACE, OTHER_NAMESPACE, UaTestServer

from edge_agent.cli import main
from edge_agent.config.opcua import OpcuaNode, OpcuaSecurity
from edge_agent.sources.opcua.browse import browse

pytestmark = pytest.mark.integration


async def test_browse_lists_variables_as_config_nodes(tmp_path: Path) -> None:
    async with UaTestServer(tmp_path, secure=True) as server:
        security = OpcuaSecurity(
            policy="Basic256Sha256",
            server_certificate=server.certificate_path,
            pki_dir=tmp_path / "pki",
        )
        text = await browse(server.endpoint, security)
    assert text.startswith("# 7 variables under i=85")
    nodes = yaml.safe_load(text)["nodes"]
    by_name = {n["name"]: n for n in nodes}
    # the namespace URI, not its index: indexes may change when the server restarts
    assert by_name["Plant.Speed"]["node_id"] == f"nsu={NAMESPACE};s=Speed"
    for node in nodes:  # pastes into the config as it is: raises ValidationError otherwise
        OpcuaNode.model_validate(node)
    assert f'"nsu={NAMESPACE};s=Speed"}}  # Double = 1.5' in text
    assert "# ByteString = '0102' (sent as text)" in text
    assert server.rules.write_like() == []


async def test_browse_starts_at_a_node_given_by_namespace_uri(tmp_path: Path) -> None:
    async with UaTestServer(tmp_path, namespaces=(OTHER_NAMESPACE, NAMESPACE)) as server:
        text = await browse(
            server.endpoint,
            OpcuaSecurity(policy="None", pki_dir=tmp_path / "pki"),
            node=f"nsu={OTHER_NAMESPACE};s=Plant",
        )
    nodes = {n["name"]: n["node_id"] for n in yaml.safe_load(text)["nodes"]}
    assert nodes["Label"] == f"nsu={OTHER_NAMESPACE};s=Label"
    assert len(nodes) == 7  # only the other namespace's Plant


def test_browse_command_refuses_a_malformed_start_node(capsys: object) -> None:
    code = main(["browse", "opc.tcp://127.0.0.1:9", "--node", "nsu=urn:x"])
    assert code == 2
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.startswith("browse: --node: invalid node id 'nsu=urn:x':")


def test_browse_command_reports_an_unreachable_server(capsys: object, tmp_path: Path) -> None:
    code = main(["browse", "opc.tcp://127.0.0.1:9", "--timeout", "1", "--pki-dir", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err  # type: ignore[attr-defined]
    assert err.startswith("browse: opc.tcp://127.0.0.1:9:")
