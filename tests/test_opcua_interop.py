"""Interoperability: the source and browse against an independent server built with node-opcua.

The server's package is installed with `npm ci` (or `npm install`) on first use; without npm
the test fails (scripts/setup --test installs it), it is never skipped. node-opcua writes its
PKI under $HOME, so it gets a temporary one. Besides the basics, the peer checks issue 8's
cases on another implementation: a value under a frozen source timestamp, a node id by
namespace URI, and a one-session server taking the agent back after the path is reset
(node-opcua's own session transfer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers.fault_proxy import FaultProxy
from helpers.opcua_servers import Collector, running, source_config
from helpers.ports import free_port
from helpers.wait import deadline

from edge_agent.config.opcua import OpcuaSecurity, OpcuaSourceConfig
from edge_agent.reading import Quality
from edge_agent.sources.opcua.browse import browse
from edge_agent.sources.opcua.source import OpcuaSource
from edge_agent.sources.opcua.values import BAD_NOT_CONNECTED

pytestmark = pytest.mark.integration

INTEROP = Path(__file__).parent / "interop" / "opcua"


def _ensure_installed() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail(
            "node/npm not on PATH: the node-opcua interop server cannot run "
            "(scripts/setup --test installs them); this test is never skipped"
        )
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
    def __init__(self, port: int, certificate: Path, namespace: str) -> None:
        self.port, self.certificate, self.namespace = port, certificate, namespace
        self.endpoint = f"opc.tcp://127.0.0.1:{port}/interop"


NodeServerFactory = Callable[..., Any]


@pytest.fixture
async def node_servers(tmp_path: Path) -> AsyncIterator[NodeServerFactory]:
    """`async with node_servers(max_sessions=10) as server:` runs one node-opcua server."""
    await asyncio.to_thread(_ensure_installed)

    @asynccontextmanager
    async def start(max_sessions: int = 10) -> AsyncIterator[NodeServer]:
        port = free_port()
        home = tmp_path / f"home-{port}"
        home.mkdir()
        proc = await asyncio.create_subprocess_exec(
            "node", str(INTEROP / "server.js"), str(port), str(max_sessions),
            cwd=INTEROP, env=os.environ | {"HOME": str(home)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            async with deadline(60, "the node-opcua server to print READY"):
                while not (line := (await proc.stdout.readline()).decode()).startswith("READY"):
                    assert line, "the node-opcua server exited before it was ready"
            ready = json.loads(line.split(" ", 1)[1])
            yield NodeServer(port, Path(ready["certificate"]), ready["namespace"])
        finally:
            if proc.returncode is None:
                proc.terminate()
                try:
                    async with asyncio.timeout(10):
                        await proc.wait()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()

    yield start


@pytest.fixture
async def node_server(node_servers: NodeServerFactory) -> AsyncIterator[NodeServer]:
    async with node_servers() as server:
        yield server


async def test_subscribe_poll_secured_and_browse_against_node_opcua(
    node_server: NodeServer, tmp_path: Path
) -> None:
    nodes = [
        {"name": "speed", "node_id": "ns=1;s=Speed"},
        {"name": "count", "node_id": f"nsu={node_server.namespace};s=Count"},
        {"name": "label", "node_id": "ns=1;s=Label"},
        {"name": "ghost", "node_id": "ns=1;s=Nope"},
        {"name": "frozen", "node_id": f"nsu={node_server.namespace};s=Frozen"},
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
            await got.wait_for(lambda rs: len({r.value for r in rs if r.pt == "frozen"}) >= 5, 30)
            await got.wait_for(lambda rs: any(r.pt == "ghost" for r in rs))
        counts = [r.value for r in got.of("count")]
        assert all(isinstance(v, int) for v in counts) and counts == sorted(counts)
        # every change of the node whose source timestamp never moves is forwarded, each at a
        # later time than the one before (the server's timestamp stands in for the frozen one)
        frozen = got.of("frozen")
        assert [r.value for r in frozen] == sorted({r.value for r in frozen})
        assert all(a.ts_ns < b.ts_ns for a, b in zip(frozen, frozen[1:], strict=False))
        assert source.state.counts["timestamp_frozen"] == len(frozen) - 1
        assert got.of("label")[0].value == "interop"
        (ghost,) = got.of("ghost")
        assert ghost.quality is Quality.BAD and ghost.value is None
        assert ghost.code == 0x80340000  # BadNodeIdUnknown
    text = await browse(node_server.endpoint, OpcuaSecurity.model_validate(security))
    assert (
        f'{{name: Plant.Speed, node_id: "nsu={node_server.namespace};s=Speed"}}  # Double' in text
    )


async def test_a_one_session_node_opcua_server_takes_the_agent_back_after_a_reset(
    node_servers: NodeServerFactory, caplog: pytest.LogCaptureFixture, record_property: Any
) -> None:
    """Issue 8 case 6 on the independent peer: node-opcua with maxSessions 1 and the path reset
    once; the agent takes its session over on a new channel (node-opcua's session transfer)."""
    async with node_servers(max_sessions=1) as server, FaultProxy(server.port) as proxy:
        endpoint = f"opc.tcp://127.0.0.1:{proxy.port}/interop"
        nodes = [{"name": "count", "node_id": f"nsu={server.namespace};s=Count"}]
        config = source_config(endpoint, nodes, interval="200ms", session_timeout="60s")
        source, got = OpcuaSource(config), Collector()
        with caplog.at_level(logging.INFO, logger="edge_agent"):
            async with running(source, got):
                await got.wait_for(lambda rs: len(rs) >= 2, 30)
                cut = time.monotonic()
                proxy.reset()
                await got.wait_for(lambda rs: any(r.code == BAD_NOT_CONNECTED for r in rs))
                await got.wait_for(lambda rs: rs[-1].code != BAD_NOT_CONNECTED, 5.0)
                record_property("recovery_s", round(time.monotonic() - cut, 2))
    log = [r.getMessage() for r in caplog.records if r.name.startswith("edge_agent")]
    (down,) = [m for m in log if "source is down" in m]
    assert "error=connection reset" in down
    assert not [m for m in log if "BadShutdown" in m or "BadTooManySessions" in m]
    assert any("closed the session its lost connection left" in m for m in log)
