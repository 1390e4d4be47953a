"""A small simulated OPC UA server for `edge-agent demo`: a mill whose values change every 200 ms.

It is secured the way a real plant server should be: Basic256Sha256 with SignAndEncrypt only, and
a certificate the demo generates into its state directory once and then reuses. The source
config it hands to the agent pins that certificate, so the demo shows the same trust path as
production (no "accept any certificate" shortcut). The server accepts our client's self-signed
certificate, as a commissioning engineer would after checking its thumbprint.

    async with DemoOpcuaServer(state_dir, port=0) as server:
        config = server.source_config()   # type opcua, pinned certificate, nodes list
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import math
import socket
import time
from pathlib import Path
from types import TracebackType
from typing import Any, cast

from asyncua import ua
from asyncua.crypto import cert_gen
from asyncua.server.server import Server
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge_agent.logs import DEMO_OPCUA_SERVER_LEVELS, set_levels

APPLICATION_URI = "urn:edge-agent:demo:mill"
NAMESPACE = "urn:edge-agent:demo"
TICK = 0.2
"""Seconds between value changes."""

_VARIABLES: dict[str, tuple[Any, ua.VariantType, str | None]] = {
    "Speed": (0.0, ua.VariantType.Double, "rpm"),
    "Power": (0.0, ua.VariantType.Float, "kW"),
    "Throughput": (0, ua.VariantType.UInt32, "t"),
    "Running": (True, ua.VariantType.Boolean, None),
    "Recipe": ("ore-A", ua.VariantType.String, None),
    "LastStart": (dt.datetime(2024, 1, 1, tzinfo=dt.UTC), ua.VariantType.DateTime, None),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_server_identity(state_dir: Path) -> tuple[Path, Path]:
    """The demo server's certificate (DER) and key (PEM, 0600), generated once and reused."""
    state_dir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = state_dir / "demo-server-cert.der", state_dir / "demo-server-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        "edge-agent demo mill",
        {"organizationName": "edge-agent demo"},
        [x509.UniformResourceIdentifier(APPLICATION_URI), x509.DNSName("localhost")],
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
        days=3650,
    )
    key_path.unlink(missing_ok=True)
    key_path.touch(mode=0o600)
    key_path.write_bytes(cert_gen.dump_private_key_as_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    return cert_path, key_path


class DemoOpcuaServer:
    """The simulated mill; `endpoint`, `certificate_path` and `source_config()` once entered."""

    def __init__(self, state_dir: Path, port: int = 0, host: str = "127.0.0.1") -> None:
        self.state_dir = Path(state_dir)
        self.port = port or _free_port()
        self.endpoint = f"opc.tcp://{host}:{self.port}/edge-agent/demo/"
        self.certificate_path = self.state_dir / "demo-server-cert.der"
        self._server: Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._nodes: dict[str, ua.NodeId] = {}

    async def __aenter__(self) -> DemoOpcuaServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        set_levels(DEMO_OPCUA_SERVER_LEVELS)
        cert_path, key_path = await asyncio.to_thread(ensure_server_identity, self.state_dir)
        server = Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        server.set_server_name("edge-agent demo mill")
        await server.set_application_uri(APPLICATION_URI)
        await server.load_certificate(str(cert_path))
        await server.load_private_key(str(key_path))
        server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        ns = await server.register_namespace(NAMESPACE)
        mill_id = ua.NodeId.from_string(f"ns={ns};s=Mill")
        mill = await server.nodes.objects.add_object(mill_id, "Mill")
        for name, (value, vtype, _unit) in _VARIABLES.items():
            node_id = ua.NodeId.from_string(f"ns={ns};s=Mill.{name}")
            await mill.add_variable(node_id, name, ua.Variant(value, vtype))
            self._nodes[name] = node_id
        await server.start()
        self._server = server
        self._task = asyncio.create_task(self._simulate(), name="demo-opcua-simulate")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()

    def source_config(
        self, name: str = "mill-scada", pki_dir: Path | None = None
    ) -> dict[str, Any]:
        """The agent's source config for this server: secured, the certificate pinned."""
        return {
            "type": "opcua",
            "name": name,
            "endpoint": self.endpoint,
            "security": {
                "policy": "Basic256Sha256",
                "mode": "SignAndEncrypt",
                "server_certificate": str(self.certificate_path),
                "pki_dir": str(pki_dir or self.state_dir / "client-pki"),
            },
            "mode": "subscribe",
            "interval": "500ms",
            "sampling_interval": "200ms",
            "nodes": [
                {"name": f"mill_{name.lower()}", "node_id": f"nsu={NAMESPACE};s=Mill.{name}"}
                | ({"unit": unit} if unit else {})
                for name, (_value, _vtype, unit) in _VARIABLES.items()
            ],
        }

    async def _simulate(self) -> None:
        """Change the values on a drift-free schedule, with the source timestamp of each change."""
        assert self._server is not None
        loop = asyncio.get_running_loop()
        start, tick, throughput = loop.time(), 0, 0
        while True:
            t = time.time()
            running = (t % 60) < 50  # stops for 10 s every minute
            speed = 14.5 + 0.8 * math.sin(t / 7) if running else 0.0
            throughput += int(speed * 3)
            now = cast(ua.DateTime, dt.datetime.now(dt.UTC))
            values: dict[str, Any] = {
                "Speed": round(speed, 3),
                "Power": round(speed * 61.7 + 5 * math.sin(t), 1),
                "Throughput": throughput,
                "Running": running,
            }
            if tick % 50 == 0:
                values["Recipe"] = "ore-A" if (t // 120) % 2 == 0 else "ore-B"
            for name, value in values.items():
                data = ua.DataValue(
                    ua.Variant(value, _VARIABLES[name][1]),
                    SourceTimestamp=now,
                    ServerTimestamp=now,
                )
                await self._server.write_attribute_value(self._nodes[name], data)
            tick += 1
            await asyncio.sleep(max(0.0, start + tick * TICK - loop.time()))
