"""The health endpoint's HTTP server on a real socket: its four paths, and requests it refuses."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers.ports import free_port

from edge_agent.forward.mqtt import ForwarderState
from edge_agent.health import MAX_LINE_BYTES, Health, start_health_server
from edge_agent.metrics import Metrics
from edge_agent.sources.base import SourceState
from edge_agent.store.sqlite import Store

pytestmark = [pytest.mark.integration, pytest.mark.timeout(30)]


class Endpoint:
    def __init__(self, health: Health, port: int) -> None:
        self.health = health
        self.port = port
        self.alive = True

    def get(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    async def fetch(self, path: str, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
        return await asyncio.to_thread(self.get, path, method)

    async def raw(self, data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(data)
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer


def refused(answer: bytes) -> bool:
    """Whether `answer` is a 400 (in HTTP/1.1 or, from some servers, HTTP/1.0)."""
    return answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 "))


@pytest.fixture
async def endpoint(tmp_path: Path) -> AsyncIterator[Endpoint]:
    store = Store(tmp_path / "buffer.db", max_bytes=2**20, max_age_s=3600)
    await store.open()
    port = free_port()
    holder: list[Endpoint] = []
    health = Health(
        gateway="gw", store=store, mqtt=ForwarderState(), sources={"plc": SourceState()},
        metrics=Metrics(), alive=lambda: holder[0].alive,
    )  # fmt: skip
    holder.append(Endpoint(health, port))
    server = await start_health_server(health, "127.0.0.1", port)
    try:
        yield holder[0]
    finally:
        await server.cleanup()
        await store.close()


async def test_the_four_paths_answer_as_the_contract_says(endpoint: Endpoint) -> None:
    status, headers, body = await endpoint.fetch("/healthz")
    assert (status, body) == (200, b'{"alive": true}')
    assert headers["Connection"] == "close"
    endpoint.alive = False
    status, _, body = await endpoint.fetch("/healthz")
    assert (status, json.loads(body)) == (503, {"alive": False})
    status, _, body = await endpoint.fetch("/readyz")
    assert (status, json.loads(body)) == (503, {"ready": False})
    endpoint.health.ready = True
    status, headers, body = await endpoint.fetch("/status?pretty=1")  # a query is ignored
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(body)["sources"]["plc"]["up"] is False
    status, headers, body = await endpoint.fetch("/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    assert b"edge_agent_buffer_readings" in body


async def test_head_gives_the_headers_of_get_without_a_body(endpoint: Endpoint) -> None:
    _, got, body = await endpoint.fetch("/status")
    status, headed, empty = await endpoint.fetch("/status", "HEAD")
    assert status == 200 and empty == b""
    assert headed["Content-Length"] == got["Content-Length"] == str(len(body))


async def test_unknown_paths_and_other_methods_are_refused(endpoint: Endpoint) -> None:
    assert (await endpoint.fetch("/admin"))[0] == 404
    status, headers, _ = await endpoint.fetch("/status", "POST")
    assert status == 405 and {m.strip() for m in headers["Allow"].split(",")} == {"GET", "HEAD"}
    assert refused(await endpoint.raw(b"nonsense\r\n\r\n"))


async def test_an_oversized_or_unfinished_request_does_not_hold_the_server(
    endpoint: Endpoint,
) -> None:
    huge = b"GET /status HTTP/1.1\r\nX: " + b"a" * MAX_LINE_BYTES + b"\r\n\r\n"
    assert refused(await endpoint.raw(huge)), "a header line over MAX_LINE_BYTES is a 400"
    # a client that connects, sends half a request and leaves: the next one is answered
    _, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
    writer.write(b"GET /healthz HTTP/1.1\r\n")
    await writer.drain()
    writer.close()
    assert (await endpoint.fetch("/healthz"))[0] == 200
