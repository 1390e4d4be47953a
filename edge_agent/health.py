"""The health endpoint of docs/contract.md §3: /healthz, /readyz, /status and /metrics, one server.

prometheus-client's own server binds 0.0.0.0 by default; this one listens where `health.listen`
says, 127.0.0.1 unless configured otherwise. Every JSON answer is strict JSON (RFC 8259): a NaN
or infinity is never written as `NaN`/`Infinity`, which strict parsers reject.

The server is a small HTTP/1.1 responder on asyncio streams (GET and HEAD of four paths, one
request per connection, `Connection: close`), not aiohttp's web framework: that framework and
its dependencies were a sixth of the agent's resident memory (10 MB of about 62) for four
read-only paths. A request head is read within READ_TIMEOUT_S and at most MAX_HEAD_BYTES long.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_agent.forward.mqtt import ForwarderState
from edge_agent.metrics import Metrics
from edge_agent.sources.base import SourceState
from edge_agent.store.sqlite import Store

log = logging.getLogger(__name__)

strict_dumps = functools.partial(json.dumps, allow_nan=False)
"""json.dumps that raises ValueError on NaN or infinity instead of writing invalid JSON."""

JSON_TYPE = "application/json; charset=utf-8"
MAX_HEAD_BYTES = 8192
"""Longest request line and headers accepted (431 beyond)."""
READ_TIMEOUT_S = 10.0
"""How long a client may take to send its request head before the connection is closed."""
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           431: "Request Header Fields Too Large", 500: "Internal Server Error",
           503: "Service Unavailable"}  # fmt: skip

Answer = tuple[int, str, bytes]
"""An HTTP answer: status, content type, body."""


class Health:
    """Answers from the components' own states; never blocks on a device or the broker."""

    def __init__(
        self,
        *,
        gateway: str,
        store: Store,
        mqtt: ForwarderState,
        sources: Mapping[str, SourceState],
        metrics: Metrics,
        alive: Callable[[], bool],
    ) -> None:
        self._gateway = gateway
        self._store = store
        self._mqtt = mqtt
        self._sources = sources
        self._metrics = metrics
        self._alive = alive
        self.ready = False

    def routes(self) -> dict[str, Callable[[], Awaitable[Answer]]]:
        """Path -> the coroutine that answers it."""
        return {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/status": self._status,
            "/metrics": self._metrics_text,
        }

    async def _healthz(self) -> Answer:
        alive = self._alive()
        return 200 if alive else 503, JSON_TYPE, strict_dumps({"alive": alive}).encode()

    async def _readyz(self) -> Answer:
        ready = self.ready
        return 200 if ready else 503, JSON_TYPE, strict_dumps({"ready": ready}).encode()

    async def snapshot(self) -> dict[str, Any]:
        oldest = await self._store.oldest_sealed_ns()
        age = max(0.0, time.time() - oldest / 1e9) if oldest is not None else 0.0
        stats = self._store.stats
        self._metrics.buffer_readings.set(stats.readings)
        self._metrics.buffer_bytes.set(stats.bytes)
        self._metrics.buffer_oldest_age.set(age)
        return {
            "gateway": self._gateway,
            "ready": self.ready,
            "mqtt": {"connected": self._mqtt.connected, "last_error": self._mqtt.last_error},
            "buffer": {
                "readings": stats.readings,
                "bytes": stats.bytes,
                "batches": stats.batches,
                "oldest_age_s": round(age, 3),
                "epoch": self._store.epoch,
                "next_seq": self._store.next_seq,
                "evicted_readings": stats.evicted_readings,
            },
            "sources": {
                name: {
                    "up": s.up,
                    "last_error": s.last_error,
                    "readings": s.readings,
                    "errors": s.errors,
                    "counts": dict(s.counts),
                }
                for name, s in self._sources.items()
            },
        }

    async def _status(self) -> Answer:
        return 200, JSON_TYPE, strict_dumps(await self.snapshot()).encode()

    async def _metrics_text(self) -> Answer:
        await self.snapshot()
        return 200, CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry)


class HealthServer:
    """Serves a Health's routes over HTTP/1.1 on asyncio streams (see the module docstring)."""

    def __init__(self, health: Health) -> None:
        self._routes = health.routes()
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port; OSError when the address cannot be bound."""
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD_BYTES)

    async def cleanup(self) -> None:
        """Stop listening and close open connections."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._clients):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        try:
            head_only, answer = await self._answer(reader)
            if answer is not None:
                status, content_type, body = answer
                allow = "Allow: GET, HEAD\r\n" if status == 405 else ""
                head = (
                    f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\n{allow}Connection: close\r\n\r\n"
                )
                writer.write(head.encode("latin-1") + (b"" if head_only else body))
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the client left or stalled; nothing to answer
        finally:
            self._clients.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError, TimeoutError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[bool, Answer | None]:
        """(HEAD?, the answer) to the request on `reader`; None when there is none to answer."""
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return False, _text(431)
        except asyncio.IncompleteReadError:
            return False, None  # closed before a whole request head
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return False, _text(400)
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return False, _text(405)
        route = self._routes.get(target.split("?", 1)[0])
        if route is None:
            return method == "HEAD", _text(404)
        try:
            return method == "HEAD", await route()
        except Exception as exc:  # noqa: BLE001 - an answer failed (the buffer unreadable?): 500
            log.warning("Health request failed path=%s error=%r", target, exc)
            return method == "HEAD", _text(500)


def _text(status: int) -> Answer:
    return status, "text/plain; charset=utf-8", f"{status}: {REASONS[status]}".encode()


async def start_health_server(health: Health, host: str, port: int) -> HealthServer:
    """The running server for `health` on host:port; `await server.cleanup()` stops it."""
    server = HealthServer(health)
    await server.start(host, port)
    return server
