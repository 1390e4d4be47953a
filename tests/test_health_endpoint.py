"""The health endpoint as a client on the network sees it (in this process, on a real socket):
GET and HEAD only, bounded requests and connections, malformed requests answered without an
ERROR or a traceback in the log, and its request handling fuzzed with Hypothesis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from helpers.wait import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge_agent.forward.mqtt import ForwarderState
from edge_agent.health import MAX_CONNECTIONS, MAX_LINE_BYTES, Health, HealthServer
from edge_agent.health import start_health_server as start
from edge_agent.metrics import Metrics
from edge_agent.sources.base import SourceState
from edge_agent.store.sqlite import Store

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def health_server(tmp_path: Path) -> AsyncIterator[HealthServer]:
    store = Store(tmp_path / "b.db", max_bytes=64 * 1024**2, max_age_s=86400)
    await store.open()
    health = Health(gateway="gw", store=store, mqtt=ForwarderState(), metrics=Metrics(),
                    sources={"plc": SourceState()}, alive=lambda: True)  # fmt: skip
    server = await start(health, "127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.cleanup()
        await store.close()


WAITING = b"(the server waits for the rest of the request)"


async def exchange(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send `request` and return what the server sends until it closes, or until `timeout`.

    No half-close: the server, like most, drops a connection at the client's EOF. An
    answered request on a kept-alive connection returns the answer at `timeout`; a request the
    server is still waiting to complete gives WAITING.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = b""
    try:
        writer.write(request)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        return received or WAITING
    except ConnectionError:
        pass
    finally:
        writer.close()
    return received


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


async def test_get_and_head_only(tmp_path: Path) -> None:
    async with health_server(tmp_path) as server:
        for path in ("/healthz", "/readyz", "/status", "/metrics"):
            ok = (200, 503) if path == "/readyz" else (200,)
            assert status_of(await exchange(server.port, get(path))) in ok
            head = await exchange(server.port, get(path, "HEAD"))
            assert status_of(head) in ok
            assert head.endswith(b"\r\n\r\n"), "HEAD has no body"
            for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"):
                answer = await exchange(server.port, get(path, method))
                assert status_of(answer) == 405, (method, path, answer[:80])
        assert status_of(await exchange(server.port, get("/admin"))) == 404


MALFORMED = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"GET /status HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * (MAX_LINE_BYTES + 10) + b" HTTP/1.1\r\n\r\n",
    b"GET /status HTTP/1.1\r\nX: " + b"b" * (MAX_LINE_BYTES + 10) + b"\r\n\r\n",
    b"GET /status HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
    b"GET /st\x00tus HTTP/1.1\r\n\r\n",
    b"\r\n\r\n\r\n",
    b"GET /status HTTP/1.1\r\nHost: x\r\nX\x00Y: z\r\n\r\n",
    b"POST /status HTTP/1.1\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 10_000,
]


async def test_malformed_requests_are_refused_without_an_error_or_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with health_server(tmp_path) as server:
        with caplog.at_level(logging.DEBUG):
            for request in MALFORMED:
                answer = await exchange(server.port, request, timeout=1.0)
                assert status_of(answer) in (None, 400, 404, 405, 413, 414, 431), answer[:100]
            assert status_of(await exchange(server.port, get("/healthz"))) == 200
        assert server.counts.get("bad_requests", 0) >= 8
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    assert not any(r.exc_info for r in caplog.records), "no traceback for a client's mistake"


async def test_connections_over_the_limit_are_closed_and_service_resumes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with health_server(tmp_path) as server:
        idle = [await asyncio.open_connection("127.0.0.1", server.port)
                for _ in range(MAX_CONNECTIONS)]  # fmt: skip
        await wait_for(lambda: server.gate.open == MAX_CONNECTIONS, 5, "connections accepted")
        answer = await exchange(server.port, get("/healthz"))
        assert status_of(answer) == 503
        assert server.gate.refused >= 1
        for _, writer in idle:
            writer.close()
        await wait_for(lambda: server.gate.open == 0, 5, "idle connections to close")
        assert status_of(await exchange(server.port, get("/healthz"))) == 200
    assert any("connection limit" in r.getMessage() for r in caplog.records)


FUZZ_REQUESTS = st.one_of(
    st.binary(max_size=600),
    st.builds(
        lambda method, path, version, headers, body: (
            method
            + b" "
            + path
            + b" "
            + version
            + b"\r\n"
            + b"".join(k + b": " + v + b"\r\n" for k, v in headers)
            + b"\r\n"
            + body
        ),
        st.sampled_from([b"GET", b"HEAD", b"POST", b"get", b"G\x00T", b"", b"PRI"]),
        st.sampled_from([b"/status", b"/metrics", b"/healthz", b"*", b"", b"/%00", b"//x"])
        | st.binary(max_size=40),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"", b"HTTP/1.1x"]),
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        b"Host",
                        b"Content-Length",
                        b"Transfer-Encoding",
                        b"Connection",
                        b"Expect",
                        b"Upgrade",
                    ]
                )
                | st.binary(max_size=12),
                st.binary(max_size=30),
            ),
            max_size=6,
        ),  # fmt: skip
        st.binary(max_size=60),
    ),
)


async def test_fuzz_health_request_handling(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Arbitrary bytes: always an HTTP answer or a closed connection, promptly; never an ERROR."""
    async with health_server(tmp_path) as server:
        answers: list[int | None] = []

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(FUZZ_REQUESTS)
        def one(request: bytes) -> None:
            # The blank line ends the head, so the server must decide now rather than wait.
            answer = asyncio.run_coroutine_threadsafe(
                exchange(server.port, request + b"\r\n\r\n", timeout=2.0), loop
            ).result(10)
            code = status_of(answer)
            assert code is None or 200 <= code < 600
            answers.append(code)

        loop = asyncio.get_running_loop()
        with caplog.at_level(logging.DEBUG):
            await asyncio.to_thread(one)
            assert status_of(await exchange(server.port, get("/status"))) == 200
        assert len(answers) >= 100
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
