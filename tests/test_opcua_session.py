"""Issue 8, case 6: a server with few sessions, and a network path that fails.

When the path between agent and server is cut, the server keeps the session it knew, for as long
as its session timeout. A server that allows one session (small embedded servers do) then answers
the agent's new CreateSession with BadTooManySessions until it expires the orphan: 61 s in the
field, against 1.2 s on a 10-session server. The agent must be back within seconds either way, and
its log must name what happened (a reset, a silent path), not asyncua's BadShutdown that follows.

The path is cut by the tests' own fault proxy (tests/helpers/fault_proxy.py) between the source
and a real asyncua server limited to `max_sessions` (tests/helpers/opcua_servers.py). The
session timeout is left at the field's 60 s, so only taking over the old session can bring the
agent back fast.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from helpers.fault_proxy import FaultProxy
from helpers.opcua_servers import (
    Collector,
    PasswordUsers,
    UaTestServer,
    running,
    source_config,
)
from helpers.wait import wait_for

from edge_agent.sources.opcua.source import OpcuaSource
from edge_agent.sources.opcua.values import BAD_NOT_CONNECTED

pytestmark = pytest.mark.integration

RECOVERY_S = 5.0
"""Data must flow again within this many seconds of the path (re)turning."""


def make_source(server: UaTestServer, proxy: FaultProxy, mode: str) -> OpcuaSource:
    endpoint = f"opc.tcp://127.0.0.1:{proxy.port}/test/"
    nodes = [{"name": "speed", "node_id": server.node_id("Speed")}]
    return OpcuaSource(source_config(endpoint, nodes, mode=mode, session_timeout="60s"))


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("edge_agent")]


@pytest.mark.parametrize(
    ("mode", "max_sessions"), [("subscribe", 1), ("poll", 1), ("subscribe", 10)]
)
async def test_after_a_reset_the_agent_is_back_within_seconds(
    tmp_path: Path,
    mode: str,
    max_sessions: int,
    caplog: pytest.LogCaptureFixture,
    record_property: Any,
) -> None:
    """The field case: the path is reset once; the server keeps its end and the session."""
    async with (
        UaTestServer(tmp_path, max_sessions=max_sessions) as server,
        FaultProxy(server.port) as proxy,
    ):
        source, got = make_source(server, proxy, mode), Collector()
        with caplog.at_level(logging.INFO, logger="edge_agent"):
            async with running(source, got):
                await got.wait_for(lambda rs: any(r.value == 1.5 for r in rs))
                assert server.sessions == 1
                cut = time.monotonic()
                proxy.reset()  # the client side gets a RST; the server hears nothing
                await got.wait_for(lambda rs: any(r.code == BAD_NOT_CONNECTED for r in rs))
                await server.write("Speed", 3.0)
                await got.wait_for(lambda rs: any(r.value == 3.0 for r in rs), RECOVERY_S)
                recovery = time.monotonic() - cut
                assert server.sessions == 1  # the orphan was closed, not left to expire
        record_property("recovery_s", round(recovery, 2))
    log = messages(caplog)
    (down,) = [m for m in log if "source is down" in m]
    assert "error=connection reset" in down
    assert not [m for m in log if "BadShutdown" in m or "BadTooManySessions" in m]
    assert any("closed the session its lost connection left" in m for m in log)


@pytest.mark.parametrize("mode", ["subscribe", "poll"])
async def test_a_silent_path_is_named_and_left_within_seconds_of_its_return(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture, record_property: Any
) -> None:
    """Another instance: the path goes silent (half-open: nothing passes, nothing closes), long
    enough for the agent to notice and retry, then returns. One session allowed, as above."""
    async with UaTestServer(tmp_path, max_sessions=1) as server, FaultProxy(server.port) as proxy:
        source, got = make_source(server, proxy, mode), Collector()
        with caplog.at_level(logging.INFO, logger="edge_agent"):
            async with running(source, got):
                await got.wait_for(lambda rs: any(r.value == 1.5 for r in rs))
                proxy.silence()
                await got.wait_for(lambda rs: any(r.code == BAD_NOT_CONNECTED for r in rs))
                errors = source.state.errors
                # a reconnect attempt fails into the silence as well (no event announces it)
                await wait_for(
                    lambda: source.state.errors > errors, 10, "a failed reconnect attempt"
                )
                back = time.monotonic()
                proxy.restore()
                await server.write("Speed", 4.0)
                await got.wait_for(lambda rs: any(r.value == 4.0 for r in rs), RECOVERY_S)
                recovery = time.monotonic() - back
                assert server.sessions == 1
        record_property("recovery_s", round(recovery, 2))
    log = messages(caplog)
    down = next(m for m in log if "source is down" in m)
    assert "error=no answer for" in down
    assert not [m for m in log if "BadShutdown" in m or "BadTooManySessions" in m]


async def test_a_signed_and_encrypted_session_with_a_user_is_taken_over_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The takeover signs the server's last nonce with the client key and sends the password
    encrypted again: it must work over Basic256Sha256 with a username as well as without."""
    (tmp_path / "server").mkdir()
    users = PasswordUsers("operator", "s3cret")
    async with (
        UaTestServer(tmp_path / "server", secure=True, users=users, max_sessions=1) as server,
        FaultProxy(server.port) as proxy,
    ):
        nodes = [{"name": "speed", "node_id": server.node_id("Speed")}]
        config = source_config(
            f"opc.tcp://127.0.0.1:{proxy.port}/test/",
            nodes,
            session_timeout="60s",
            security={
                "policy": "Basic256Sha256",
                "server_certificate": str(server.certificate_path),
                "pki_dir": str(tmp_path / "pki"),
            },
            auth={"username": "operator", "password": "s3cret"},
        )
        source, got = OpcuaSource(config), Collector()
        with caplog.at_level(logging.INFO, logger="edge_agent"):
            async with running(source, got):
                await got.wait_for(lambda rs: any(r.value == 1.5 for r in rs))
                proxy.reset()
                await got.wait_for(lambda rs: any(r.code == BAD_NOT_CONNECTED for r in rs))
                await server.write("Speed", 5.0)
                await got.wait_for(lambda rs: any(r.value == 5.0 for r in rs), RECOVERY_S)
    assert any("closed the session its lost connection left" in m for m in messages(caplog))
