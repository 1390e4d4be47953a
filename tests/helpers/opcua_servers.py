"""Real OPC UA servers for the OPC UA tests: an asyncua `Server` on a free port that records the
service requests it receives (through its permission-ruleset hook, a real extension point), can be
secured with its own certificate, restarted on the same port (with its namespaces registered in
another order, as a reconfigured server does), limited to a number of sessions, and told to change
a value with any status and timestamps, including none; and the `Collector` a source emits into,
with bounded waits on what it collected."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto import cert_gen
from asyncua.crypto.permission_rules import User, UserRole
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import DNSName, UniformResourceIdentifier
from cryptography.x509.oid import ExtendedKeyUsageOID

from edge_agent.config.opcua import OpcuaSourceConfig
from edge_agent.reading import Reading
from helpers.ports import free_port
from helpers.wait import describe

NAMESPACE = "urn:edge-agent:test"
OTHER_NAMESPACE = "urn:edge-agent:other"
SERVER_URI = "urn:edge-agent:test-server"

VARIABLES: dict[str, tuple[Any, ua.VariantType]] = {
    "Speed": (1.5, ua.VariantType.Double),
    "Count": (7, ua.VariantType.Int32),
    "Running": (True, ua.VariantType.Boolean),
    "Label": ("mill", ua.VariantType.String),
    "Stamp": (dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC), ua.VariantType.DateTime),
    "Raw": (b"\x01\x02", ua.VariantType.ByteString),
    "Series": ([1.0, 2.0], ua.VariantType.Double),
}

WRITE_LIKE = {
    ua.ObjectIds.WriteRequest_Encoding_DefaultBinary: "Write",
    ua.ObjectIds.CallRequest_Encoding_DefaultBinary: "Call",
    ua.ObjectIds.AddNodesRequest_Encoding_DefaultBinary: "AddNodes",
    ua.ObjectIds.DeleteNodesRequest_Encoding_DefaultBinary: "DeleteNodes",
    ua.ObjectIds.AddReferencesRequest_Encoding_DefaultBinary: "AddReferences",
    ua.ObjectIds.DeleteReferencesRequest_Encoding_DefaultBinary: "DeleteReferences",
    ua.ObjectIds.HistoryUpdateRequest_Encoding_DefaultBinary: "HistoryUpdate",
}


@functools.cache
def server_identity(name: str = "server") -> tuple[bytes, bytes]:
    """A (certificate DER, key PEM) pair for a test server; made once per test process."""
    key = cert_gen.generate_private_key()
    cert = cert_gen.generate_self_signed_app_certificate(
        key,
        f"edge-agent test {name}",
        {},
        [
            UniformResourceIdentifier(SERVER_URI),
            DNSName("localhost"),
            DNSName(socket.gethostname()),
        ],
        extended=[ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH],
    )
    return cert.public_bytes(serialization.Encoding.DER), cert_gen.dump_private_key_as_pem(key)


class RecordingRules:
    """A permission ruleset that allows everything and records each request's type id."""

    def __init__(self) -> None:
        self.requests: list[int] = []

    def check_validity(self, user: Any, action_type_id: Any, body: Any) -> bool:
        ident = getattr(action_type_id, "Identifier", action_type_id)
        self.requests.append(int(ident))
        return True

    def write_like(self) -> list[str]:
        return [WRITE_LIKE[r] for r in self.requests if r in WRITE_LIKE]


class PasswordUsers:
    """Accepts exactly one username and password."""

    def __init__(self, username: str, password: str) -> None:
        self._credentials = (username, password)

    def get_user(
        self,
        iserver: Any,
        username: str | None = None,
        password: str | None = None,
        certificate: Any = None,
    ) -> User | None:
        if (username, password) == self._credentials:
            return User(role=UserRole.User, name=username)
        return None


NOW: Any = object()
"""`UaTestServer.write` timestamps: stamp with the current time (the default); None omits it."""


def limit_sessions(server: Server, limit: int) -> None:
    """Make CreateSession fail with BadTooManySessions while `limit` sessions exist.

    Small embedded servers allow one or a few sessions and refuse more this way. asyncua's own
    limit (`InternalSession.max_connections`) is a class attribute counted across every server in
    the process and answers BadMaxConnectionsReached at ActivateSession, so this wraps the one
    server's session factory instead: a session counts from CreateSession until it is closed or
    expires (asyncua keeps a session that has subscriptions after its connection is lost, for the
    client to take over, as the standard intends).
    """
    iserver = server.iserver
    create = iserver.create_session

    def limited(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("external") and len(iserver._external_sessions) >= limit:
            raise ServiceError(ua.StatusCodes.BadTooManySessions)
        return create(*args, **kwargs)

    iserver.create_session = limited  # type: ignore[method-assign]


class UaTestServer:
    """An asyncua server with the VARIABLES under each of its namespaces, on a fixed port.

    `namespaces` are registered in this order at every start (index 2 onwards), each with the
    same variables (VARIABLES and any `extra` ones); `Label` holds "mill" in NAMESPACE and the
    namespace's URI elsewhere, so a node read in the wrong namespace shows. Change `namespaces`
    between restarts to renumber them.
    """

    def __init__(
        self,
        directory: Path,
        *,
        secure: bool = False,
        identity: str = "server",
        users: PasswordUsers | None = None,
        extra: dict[str, tuple[Any, ua.VariantType]] | None = None,
        namespaces: Sequence[str] = (NAMESPACE,),
        max_sessions: int | None = None,
    ) -> None:
        self.port = free_port()
        self.variables = {**VARIABLES, **(extra or {})}
        """VARIABLES plus the `extra` ones a test needs: {name: (initial value, type)}."""
        self.directory = directory
        self.secure = secure
        self.users = users
        self.namespaces = tuple(namespaces)
        self.max_sessions = max_sessions
        self.rules = RecordingRules()
        self.certificate_path = directory / f"{identity}-cert.der"
        self._identity = identity
        self._server: Server | None = None
        self.indexes: dict[str, int] = {}
        self.ns = 2

    @property
    def endpoint(self) -> str:
        return f"opc.tcp://127.0.0.1:{self.port}/test/"

    def node_id(self, name: str) -> str:
        return f"ns={self.ns};s={name}"

    async def start(self) -> None:
        server = Server(user_manager=self.users) if self.users else Server()
        await server.init()
        server.set_endpoint(self.endpoint)
        await server.set_application_uri(SERVER_URI)
        policies = [ua.SecurityPolicyType.NoSecurity]
        if self.secure:
            cert, key = server_identity(self._identity)
            self.certificate_path.write_bytes(cert)
            await server.load_certificate(cert)
            await server.load_private_key(key, format="pem")
            policies += [
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Aes128Sha256RsaOaep_SignAndEncrypt,
                ua.SecurityPolicyType.Aes256Sha256RsaPss_Sign,
                ua.SecurityPolicyType.Aes256Sha256RsaPss_SignAndEncrypt,
            ]
        if self.users:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        server.set_security_policy(policies, permission_ruleset=self.rules)  # type: ignore[arg-type]
        if self.max_sessions is not None:
            limit_sessions(server, self.max_sessions)
        self.indexes = {}
        for uri in self.namespaces:
            ns = self.indexes[uri] = await server.register_namespace(uri)
            plant = await server.nodes.objects.add_object(ua.NodeId("Plant", ns), "Plant")
            for name, (value, vtype) in self.variables.items():
                own = uri if name == "Label" and uri != NAMESPACE else value
                await plant.add_variable(ua.NodeId(name, ns), name, ua.Variant(own, vtype))
        self.ns = self.indexes.get(NAMESPACE, 2)
        await server.start()
        self._server = server

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await server.stop()

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    @property
    def sessions(self) -> int:
        """Sessions the server holds now, including ones whose connection is gone."""
        assert self._server is not None
        return len(self._server.iserver._external_sessions)

    async def write(
        self,
        name: str,
        value: Any,
        *,
        status: int = 0,
        source_ts: Any = NOW,
        server_ts: Any = NOW,
        namespace: str = NAMESPACE,
    ) -> Any:
        """Change a value as the device would: with a status and timestamps, each NOW, a
        datetime or None (absent). Returns the source timestamp written."""
        assert self._server is not None
        vtype = self.variables[name][1]
        source = dt.datetime.now(dt.UTC) if source_ts is NOW else source_ts
        data = ua.DataValue(
            ua.Variant(value, vtype),
            ua.StatusCode(status),
            SourceTimestamp=source,
            ServerTimestamp=dt.datetime.now(dt.UTC) if server_ts is NOW else server_ts,
        )
        await self._server.write_attribute_value(ua.NodeId(name, self.indexes[namespace]), data)
        return source

    async def __aenter__(self) -> UaTestServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class Collector:
    """The `emit` a source is given: keeps every reading and wakes waiters on each batch."""

    def __init__(self) -> None:
        self.readings: list[Reading] = []
        self._changed = asyncio.Condition()

    async def __call__(self, readings: Any) -> None:
        self.readings.extend(readings)
        async with self._changed:
            self._changed.notify_all()

    def of(self, point: str) -> list[Reading]:
        return [r for r in self.readings if r.pt == point]

    async def wait_for(self, predicate: Any, timeout: float = 10.0) -> None:
        """Wait until `predicate(readings)` holds, re-checked on each emit.

        Raises TimeoutError after `timeout` s, naming the predicate and the last readings.
        """
        try:
            async with asyncio.timeout(timeout), self._changed:
                await self._changed.wait_for(lambda: predicate(self.readings))
        except TimeoutError:
            raise TimeoutError(
                f"timed out after {timeout:g}s waiting for {describe(predicate)}; "
                f"{len(self.readings)} readings so far, the last: {self.readings[-3:]}"
            ) from None


@contextlib.asynccontextmanager
async def running(source: Any, emit: Collector) -> Any:
    """Run a source's `run` in a task for the block; on exit it must end only by cancellation."""
    task = asyncio.create_task(source.run(emit), name=f"source-{source.name}")
    try:
        yield task
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # run ends only by cancellation, never by returning or raising


def source_config(
    endpoint: str, nodes: list[dict[str, Any]], **overrides: Any
) -> OpcuaSourceConfig:
    """An OPC UA source for tests: no security, 100 ms interval, quick timeouts and retries."""
    data = {
        "type": "opcua",
        "name": "plc",
        "endpoint": endpoint,
        "security": {"policy": "None"},
        "interval": "100ms",
        "timeout": "2s",
        "reconnect_min": "200ms",
        "reconnect_max": "500ms",
        "nodes": nodes,
    } | overrides
    return OpcuaSourceConfig.model_validate(data)
