"""Secured OPC UA: client identity generation, a pinned or trusted server certificate, rejection
with thumbprints, user authentication, and endpoints the server does not offer."""

from __future__ import annotations

import logging
import shutil
import stat
from pathlib import Path
from typing import Any

import pytest
from helpers.opcua_servers import (
    Collector,
    PasswordUsers,
    UaTestServer,
    running,
    server_identity,
)
from helpers.wait import wait_for

from edge_agent.config.opcua import OpcuaSourceConfig
from edge_agent.sources.opcua.security import thumbprints
from edge_agent.sources.opcua.source import OpcuaSource

pytestmark = pytest.mark.integration


def secured(server: UaTestServer, pki: Path, security: dict[str, Any], **extra: Any) -> OpcuaSource:
    config = OpcuaSourceConfig.model_validate(
        {
            "type": "opcua",
            "name": "secure-plc",
            "endpoint": server.endpoint,
            "security": {"pki_dir": str(pki), **security},
            "interval": "100ms",
            "timeout": "3s",
            "reconnect_min": "100ms",
            "reconnect_max": "300ms",
            "nodes": [{"name": "speed", "node_id": server.node_id("Speed")}],
        }
        | extra
    )
    return OpcuaSource(config)


@pytest.fixture
async def server(tmp_path: Path) -> Any:
    async with UaTestServer(tmp_path / "server", secure=True) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _dirs(tmp_path: Path) -> None:
    (tmp_path / "server").mkdir(exist_ok=True)


async def test_pinned_certificate_sign_and_encrypt(server: UaTestServer, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    source = secured(
        server,
        pki,
        {
            "policy": "Basic256Sha256",
            "mode": "SignAndEncrypt",
            "server_certificate": str(server.certificate_path),
        },
    )
    got = Collector()
    async with running(source, got):
        await got.wait_for(lambda rs: any(r.pt == "speed" and r.value == 1.5 for r in rs))
        await server.write("Speed", 2.0)
        await got.wait_for(lambda rs: any(r.value == 2.0 for r in rs))
    key = pki / "client-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (pki / "client-cert.der").stat().st_size > 500
    # the identity is kept: a second run reuses it rather than making a new one
    before = (pki / "client-cert.der").read_bytes()
    async with running(source, got):
        await got.wait_for(lambda rs: source.state.up)
    assert (pki / "client-cert.der").read_bytes() == before
    assert server.rules.write_like() == []


@pytest.mark.parametrize(
    ("policy", "mode"),
    [("Aes256_Sha256_RsaPss", "Sign"), ("Aes128_Sha256_RsaOaep", "SignAndEncrypt")],
)
async def test_trust_directory(
    server: UaTestServer, tmp_path: Path, policy: str, mode: str
) -> None:
    trusted = tmp_path / "trusted"
    trusted.mkdir()
    shutil.copy(server.certificate_path, trusted / "plc.der")
    source = secured(
        server, tmp_path / "pki", {"policy": policy, "mode": mode, "trust_dir": str(trusted)}
    )
    got = Collector()
    async with running(source, got):
        await got.wait_for(lambda rs: any(r.pt == "speed" for r in rs))


async def test_an_untrusted_server_is_refused_once_with_its_thumbprints_until_trusted(
    server: UaTestServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = tmp_path / "pki"
    source = secured(server, pki, {"policy": "Basic256Sha256"})
    got = Collector()
    der = server.certificate_path.read_bytes()
    with caplog.at_level(logging.INFO, logger="edge_agent"):
        async with running(source, got):
            await wait_for(  # several attempts, one log line
                lambda: source.state.errors >= 3, 10, "three refused attempts"
            )
            assert not source.state.up and not got.readings
            error = source.state.last_error or ""
            assert "rejected" in error and thumbprints(der) in error
            rejected = pki / "rejected"
            (saved,) = rejected.iterdir()
            assert saved.read_bytes() == der
            (pki / "trusted").mkdir()
            shutil.copy(saved, pki / "trusted")  # what the message tells the operator to do
            await got.wait_for(lambda rs: any(r.pt == "speed" for r in rs))
    records = [r for r in caplog.records if "rejected" in r.getMessage()]
    lines = [r.getMessage() for r in records if r.name != "edge_agent.audit"]
    assert len(lines) == 1 and "sha256=" in lines[0]
    audits = [r.audit for r in records if r.name == "edge_agent.audit"]  # type: ignore[attr-defined]
    assert len(audits) == 1, "one audit event for the episode, not one per attempt"
    assert audits[0]["category"] == "certificate" and audits[0]["outcome"] == "refused"
    assert audits[0]["source"] == source.name


@pytest.mark.parametrize(("password", "up"), [("s3cret", True), ("wrong", False)])
async def test_username_and_password_from_a_file(tmp_path: Path, password: str, up: bool) -> None:
    secret = tmp_path / "password"
    secret.write_text(password + "\n")
    async with UaTestServer(
        tmp_path / "server", secure=True, users=PasswordUsers("operator", "s3cret")
    ) as server:
        source = secured(
            server,
            tmp_path / "pki",
            {"policy": "Basic256Sha256", "server_certificate": str(server.certificate_path)},
            auth={"username": "operator", "password_file": str(secret)},
        )
        got = Collector()
        async with running(source, got):
            if up:
                await got.wait_for(lambda rs: any(r.pt == "speed" for r in rs))
            else:
                await wait_for(lambda: source.state.errors > 0, 10, "a failed attempt")
                assert "BadUserAccessDenied" in (source.state.last_error or "")


async def test_an_endpoint_the_server_does_not_offer_is_named(
    server: UaTestServer, tmp_path: Path
) -> None:
    source = secured(
        server,
        tmp_path / "pki",
        {
            "policy": "Aes128_Sha256_RsaOaep",
            "mode": "Sign",
            "server_certificate": str(server.certificate_path),
        },
    )
    async with running(source, Collector()):
        await wait_for(lambda: source.state.errors > 0, 10, "a failed attempt")
    error = source.state.last_error or ""
    assert "no endpoint with policy Aes128_Sha256_RsaOaep and mode Sign" in error
    assert "Basic256Sha256/SignAndEncrypt" in error


async def test_a_certificate_other_than_the_pinned_one_is_refused(
    server: UaTestServer, tmp_path: Path
) -> None:
    other = tmp_path / "other.der"
    other.write_bytes(server_identity("impostor")[0])
    source = secured(
        server, tmp_path / "pki", {"policy": "Basic256Sha256", "server_certificate": str(other)}
    )
    got = Collector()
    async with running(source, got):
        await wait_for(lambda: source.state.errors > 0, 10, "a failed attempt")
    assert "not the pinned certificate" in (source.state.last_error or "")
    assert not got.readings
