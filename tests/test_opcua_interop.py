"""Interoperability: the source and browse against an independent server built with node-opcua.

The server's package is installed with `npm ci` (or `npm install`) on first use; the test is
skipped only when npm itself is missing. node-opcua writes its PKI under $HOME, so it gets a
temporary one.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers.opcua_servers import Collector, running
from helpers.ports import free_port
from helpers.wait import deadline

from edge_agent.config.opcua import OpcuaSecurity, OpcuaSourceConfig
from edge_agent.reading import Quality
from edge_agent.sources.opcua.browse import browse
from edge_agent.sources.opcua.source import OpcuaSource

pytestmark = pytest.mark.integration

INTEROP = Path(__file__).parent / "interop" / "opcua"


def _ensure_installed() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not on PATH: the node-opcua interop server cannot run")
    if (INTEROP / "node_modules" / "node-opcua").is_dir():
        return
    command = "ci" if (INTEROP / "package-lock.json").exists() else "install"
    subprocess.run(
        ["npm", command, "--no-audit", "--no-fund", "--prefix", str(INTEROP)],
        check=True,
        capture_output=True,
        timeout=600,
    )


class NodeServer:
    def __init__(self, port: int, certificate: Path) -> None:
        self.port, self.certificate = port, certificate
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/interop"


@pytest.fixture
async def node_server(tmp_path: Path) -> AsyncIterator[NodeServer]:
    await asyncio.to_thread(_ensure_installed)
    port = free_port()
    env = os.environ | {"HOME": str(tmp_path / "home")}
    (tmp_path / "home").mkdir()
    proc = await asyncio.create_subprocess_exec(
        "node", str(INTEROP / "server.js"), str(port),
        cwd=INTEROP, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        async with deadline(60, "the node-opcua server to print READY"):
            while not (line := (await proc.stdout.readline()).decode()).startswith("READY"):
                assert line, "the node-opcua server exited before it was ready"
        yield NodeServer(port, Path(line.split(" ", 1)[1].strip()))
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_subscribe_poll_secured_and_browse_against_node_opcua(
    node_server: NodeServer, tmp_path: Path
) -> None:
    nodes = [
        {"name": "speed", "node_id": "ns=1;s=Speed"},
        {"name": "count", "node_id": "ns=1;s=Count"},
        {"name": "label", "node_id": "ns=1;s=Label"},
        {"name": "ghost", "node_id": "ns=1;s=Nope"},
    ]
    base = {"type": "opcua", "endpoint": node_server.endpoint, "nodes": nodes, "interval": "200ms"}
    plain = OpcuaSourceConfig.model_validate(
        base | {"name": "plain", "mode": "subscribe", "security": {"policy": "None"}}
    )
    security = {
        "policy": "Basic256Sha256",
        "mode": "SignAndEncrypt",
        "server_certificate": str(node_server.certificate),
        "pki_dir": str(tmp_path / "pki"),
    }
    secure = OpcuaSourceConfig.model_validate(
        base | {"name": "secure", "mode": "poll", "security": security}
    )
    for config in (plain, secure):
        source, got = OpcuaSource(config), Collector()
        async with running(source, got):
            await got.wait_for(lambda rs: len({r.value for r in rs if r.pt == "count"}) >= 3, 30)
            await got.wait_for(lambda rs: any(r.pt == "ghost" for r in rs))
        counts = [r.value for r in got.of("count")]
        assert all(isinstance(v, int) for v in counts) and counts == sorted(counts)
        assert got.of("label")[0].value == "interop"
        (ghost,) = got.of("ghost")
        assert ghost.quality is Quality.BAD and ghost.value is None
        assert ghost.code == 0x80340000  # BadNodeIdUnknown
    text = await browse(node_server.endpoint, OpcuaSecurity.model_validate(security))
    assert '{name: Plant.Speed, node_id: "ns=1;s=Speed"}  # Double' in text
