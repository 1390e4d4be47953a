"""mqtts:// against a real Mosquitto TLS listener: verification, hostname check, client certs."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.store import filled_store
from helpers.tls_certs import Pki, make_pki
from helpers.wait import wait_for

from edge_agent.config.schema import MqttConfig, TlsConfig
from edge_agent.demo.broker import Mosquitto
from edge_agent.forward.mqtt import Forwarder
from edge_agent.metrics import Metrics

pytestmark = pytest.mark.integration


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", ["localhost", "127.0.0.1"])


def tls_broker(tmp_path: Path, pki: Pki) -> Mosquitto:
    directory = tmp_path / "broker"
    directory.mkdir()
    return Mosquitto(
        directory=directory,
        extra_config=f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        "require_certificate true\n",
    )


@pytest.fixture
def broker_tls(tmp_path: Path, pki: Pki) -> Iterator[Mosquitto]:
    with tls_broker(tmp_path, pki) as broker:
        yield broker


async def run_forwarder(config: MqttConfig, tmp_path: Path) -> tuple[Forwarder, int]:
    """Run a forwarder over a store of 5 batches until they are acknowledged or it gives up."""
    store, sealed = await filled_store(tmp_path / "b.db", batches=5)
    forwarder = Forwarder(config, "gw", store, sealed, Metrics())
    task = asyncio.create_task(forwarder.run())
    # Either outcome ends the wait: no event is set when a connection attempt fails.
    await wait_for(
        lambda: not store.stats.batches or forwarder.state.last_error is not None,
        5,
        "every batch acknowledged or a connection error",
    )
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    left = store.stats.batches
    await store.close()
    return forwarder, left


async def test_verified_tls_with_client_certificate_delivers(
    tmp_path: Path, pki: Pki, broker_tls: Mosquitto
) -> None:
    config = MqttConfig(
        url=f"mqtts://localhost:{broker_tls.port}", topic_prefix="t",
        tls=TlsConfig(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key),
    )  # fmt: skip
    forwarder, left = await run_forwarder(config, tmp_path)
    assert left == 0, forwarder.state.last_error


async def test_unknown_ca_is_refused(tmp_path: Path, pki: Pki, broker_tls: Mosquitto) -> None:
    other = make_pki(tmp_path / "other", ["localhost"])
    config = MqttConfig(
        url=f"mqtts://localhost:{broker_tls.port}", topic_prefix="t",
        tls=TlsConfig(ca_file=other.ca, cert_file=pki.client_cert, key_file=pki.client_key),
    )  # fmt: skip
    forwarder, left = await run_forwarder(config, tmp_path)
    assert left == 5
    assert "CERTIFICATE_VERIFY_FAILED" in (forwarder.state.last_error or "")


async def test_hostname_is_verified(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki", ["broker.example.com"])
    with tls_broker(tmp_path, pki) as broker:
        config = MqttConfig(
            url=f"mqtts://localhost:{broker.port}", topic_prefix="t",
            tls=TlsConfig(ca_file=pki.ca, cert_file=pki.client_cert, key_file=pki.client_key),
        )  # fmt: skip
        forwarder, left = await run_forwarder(config, tmp_path)
    assert left == 5
    assert "Hostname mismatch" in (forwarder.state.last_error or "")
