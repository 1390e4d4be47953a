"""The health endpoint of docs/contract.md §3: /healthz, /readyz, /status and /metrics, one server.

prometheus-client's own server binds 0.0.0.0 by default; this one listens where `health.listen`
says, 127.0.0.1 unless configured otherwise. Every JSON answer is strict JSON (RFC 8259): a NaN
or infinity is never written as `NaN`/`Infinity`, which strict parsers reject.

Least functionality (docs/security.md, IEC 62443-4-2 CR 7.7): the only listening socket of the
agent. It answers GET and HEAD only (405 otherwise) and changes nothing; a request line or a
header over MAX_LINE_BYTES, or more than MAX_HEADERS headers, is refused with 400; at most
MAX_CONNECTIONS connections are served at once, and one over the limit is closed at once, so a
flood from loopback costs the agent little and never stops forwarding. A malformed request is
the client's fault, not the agent's: it is counted and logged once at DEBUG, never as an ERROR
with a traceback.

The server is a small one of our own on asyncio streams, with h11 (the HTTP/1.1 parser and state
machine of httpx and uvicorn) reading the requests: aiohttp's web framework, used before, cost
the agent 12-16 MB of memory for four paths (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import h11
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_agent.clock import ClockWatch
from edge_agent.forward.mqtt import ForwarderState
from edge_agent.metrics import Metrics
from edge_agent.sources.base import SourceState
from edge_agent.store.sqlite import Store

strict_dumps = functools.partial(json.dumps, allow_nan=False)
"""json.dumps that raises ValueError on NaN or infinity instead of writing invalid JSON."""
HELD_BACK_PROBLEM_S = 2.0
"""Sources held back longer than this make the agent degraded (shorter: a burst)."""


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
        held_back_since: Callable[[], float | None] = lambda: None,
        clock: ClockWatch | None = None,
    ) -> None:
        self._gateway = gateway
        self._store = store
        self._mqtt = mqtt
        self._sources = sources
        self._metrics = metrics
        self._alive = alive
        self._held_back_since = held_back_since
        self._clock = clock
        self.ready = False

    async def answer(self, path: str) -> tuple[int, str, bytes]:
        """The answer to GET `path` (without query): (HTTP status, Content-Type, body)."""
        if path == "/healthz":
            alive = self._alive()
            return _json(200 if alive else 503, {"alive": alive})
        if path == "/readyz":
            return _json(200 if self.ready else 503, {"ready": self.ready})
        if path == "/status":
            return _json(200, await self.snapshot())
        if path == "/metrics":
            await self.snapshot()
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._metrics.registry)
        return 404, "text/plain; charset=utf-8", b"404: Not Found"

    async def snapshot(self) -> dict[str, Any]:
        oldest = await self._store.oldest_sealed_ns()
        age = max(0.0, (self._store.now_ns() - oldest) / 1e9) if oldest is not None else 0.0
        stats = self._store.stats
        since = self._held_back_since()
        held_back = max(0.0, time.monotonic() - since) if since is not None else 0.0
        problems = self._store.problems()
        if held_back >= HELD_BACK_PROBLEM_S:
            problems.append(
                f"sources held back for {held_back:.1f}s: the buffer is not taking readings"
            )
        self._metrics.buffer_readings.set(stats.readings)
        self._metrics.buffer_bytes.set(stats.bytes)
        self._metrics.buffer_oldest_age.set(age)
        self._metrics.store_disk_full.set(1 if self._store.disk_full else 0)
        self._metrics.sources_held_back.set(held_back)
        ack = self._mqtt.ack
        ack_json: dict[str, Any] = {
            "mode": ack.mode,
            "accepted": ack.accepted,
            "refused": dict(ack.refused),
            "deleted_batches": ack.deleted_batches,
            "last_accepted_age_s": (
                None if ack.last_accepted is None else round(time.time() - ack.last_accepted, 3)
            ),
            "consumer": ack.consumer,
        }
        if ack.mode == "end_to_end":
            unacked = await self._store.unacked()
            oldest_unacked = (
                0.0
                if unacked.oldest_sent_ns is None
                else max(0.0, (self._store.now_ns() - unacked.oldest_sent_ns) / 1e9)
            )
            ack_json["unacked_batches"] = unacked.batches
            ack_json["unacked_readings"] = unacked.readings
            ack_json["unacked_oldest_age_s"] = round(oldest_unacked, 3)
            self._metrics.unacked_batches.set(unacked.batches)
            self._metrics.unacked_oldest_age.set(oldest_unacked)
        drain = self._mqtt.drain.estimate(stats.readings, time.monotonic())
        self._metrics.drain_rate.set(drain.acked_readings_s)
        self._metrics.drain_net_rate.set(drain.net_readings_s)
        self._metrics.drain_eta.set(math.nan if drain.eta_s is None else drain.eta_s)
        return {
            "gateway": self._gateway,
            "ready": self.ready,
            "mqtt": {
                "connected": self._mqtt.connected,
                "last_error": self._mqtt.last_error,
                "degraded": self._mqtt.degraded,
                "stalled": self._mqtt.stalled,
                "broker_limits": vars(self._mqtt.limits),
                "ack": ack_json,
            },
            "buffer": {
                "readings": stats.readings,
                "bytes": stats.bytes,
                "batches": stats.batches,
                "oldest_age_s": round(age, 3),
                "epoch": self._store.epoch,
                "next_seq": self._store.next_seq,
                "evicted_readings": stats.evicted_readings,
                "disk_full": self._store.disk_full,
                "held_back_s": round(held_back, 3),
                "problems": problems,
                "quarantined": [q.to_json() for q in self._store.quarantined],
                "drain": drain.to_json(),
            },
            **({} if self._clock is None else {"clock": self._clock.status()}),
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


MAX_CONNECTIONS = 32
"""Connections served at once; monitoring needs one or two."""
MAX_LINE_BYTES = 4096
"""Longest request line or header line; the endpoint's URLs are a few bytes."""
MAX_HEADERS = 32
IDLE_TIMEOUT_S = 15.0
"""A connection that sends no request (or no rest of one) for this long is closed."""
MAX_HEAD_BYTES = (MAX_HEADERS + 1) * (MAX_LINE_BYTES + 2) + 2
"""The most a request head can hold within the line and header limits; h11 refuses more."""
READ_BYTES = 8192

log = logging.getLogger(__name__)
_REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found", 405: b"Method Not Allowed",
            500: b"Internal Server Error", 503: b"Service Unavailable"}  # fmt: skip
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_BAD = (
    b"HTTP/1.1 400 Bad Request\r\nServer: edge-agent\r\nConnection: close\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Length: 16\r\n\r\n400: Bad Request"
)


def _json(status: int, body: Any) -> tuple[int, str, bytes]:
    return status, "application/json; charset=utf-8", strict_dumps(body).encode()


def _refusal(request: h11.Request) -> str | None:
    """Why `request` is refused with 400 (HTTP/1.x only, lines and header count), or None."""
    if not request.http_version.startswith(b"1."):
        return f"HTTP version {request.http_version!r}"
    line = len(request.method) + len(request.target) + len(request.http_version) + 7
    if line > MAX_LINE_BYTES:
        return f"request line of {line} bytes"
    if len(request.headers) > MAX_HEADERS:
        return f"{len(request.headers)} headers"
    for name, value in request.headers:
        if len(name) + len(value) + 2 > MAX_LINE_BYTES:
            return f"a header line of {len(name) + len(value) + 2} bytes"
    return None


class _ConnectionGate:
    """Counts the connections served; at most `limit` at once, the others are refused."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self.open = 0
        self.refused = 0
        self._refusing = False

    def enter(self) -> bool:
        """Whether a new connection may be served (then `leave` when it ends)."""
        if self.open >= self._limit:
            self.refused += 1
            if not self._refusing:  # one line per episode, not per connection
                self._refusing = True
                log.warning("Health endpoint at its connection limit, refusing limit=%d",
                            self._limit)  # fmt: skip
            return False
        if self._refusing and self.open < self._limit // 2:
            self._refusing = False
            log.info("Health endpoint below its connection limit again refused=%d", self.refused)
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1


class HealthServer:
    """The listening socket and its connections (HTTP/1.1 with keep-alive, parsed by h11)."""

    def __init__(self, health: Health) -> None:
        self._health = health
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.gate = _ConnectionGate(MAX_CONNECTIONS)
        self.counts: dict[str, int] = {}
        """`bad_requests`: malformed requests refused (400)."""

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def listen(self, host: str, port: int) -> None:
        """Start listening; OSError when `host:port` cannot be bound."""
        self._server = await asyncio.start_server(self._connected, host, port, backlog=128)

    async def cleanup(self) -> None:
        """Stop listening, then close every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.gate.enter():
            writer.write(_BUSY)
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, TimeoutError):
            pass  # the client left, or said nothing for IDLE_TIMEOUT_S
        except h11.RemoteProtocolError as exc:
            self._bad_request(str(exc), writer)
        finally:
            self._tasks.discard(task)
            self.gate.leave()
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Requests one after the other until the client or h11 closes the connection."""
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                async with asyncio.timeout(IDLE_TIMEOUT_S):
                    data = await reader.read(READ_BYTES)
                conn.receive_data(data)
                continue
            if not isinstance(event, h11.Request):
                return  # the client closed (ConnectionClosed), or a body we do not read
            refusal = _refusal(event)
            if refusal is not None:
                self._bad_request(refusal, writer)
                return
            has_body = any(name in (b"content-length", b"transfer-encoding")
                           for name, _ in event.headers)  # fmt: skip
            writer.write(await self._respond(conn, event, close=has_body))
            await writer.drain()
            if has_body or conn.our_state is not h11.DONE:
                return  # a body is never read: answer, then close
            while conn.their_state is h11.SEND_BODY:
                if conn.next_event() is h11.NEED_DATA:
                    return
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    async def _respond(self, conn: h11.Connection, request: h11.Request, *, close: bool) -> bytes:
        """The bytes of the answer to `request`: GET and HEAD only (405 otherwise)."""
        headers = [("Server", "edge-agent")]
        if close:
            headers.append(("Connection", "close"))
        if request.method not in (b"GET", b"HEAD"):
            status, kind, body = 405, "text/plain; charset=utf-8", b"405: Method Not Allowed"
            headers.append(("Allow", "GET, HEAD"))
        else:
            path = request.target.split(b"?", 1)[0].decode("ascii", "replace")
            try:
                status, kind, body = await self._health.answer(path)
            except Exception:  # the agent's bug, not the client's: logged, answered 500
                log.exception("Health endpoint failed to answer path=%s", path)
                status, kind, body = 500, "text/plain; charset=utf-8", b"500"
        headers += [("Content-Type", kind), ("Content-Length", str(len(body)))]
        out = conn.send(h11.Response(status_code=status, headers=headers,
                                     reason=_REASONS.get(status, b"")))  # fmt: skip
        if request.method != b"HEAD":
            out = (out or b"") + (conn.send(h11.Data(data=body)) or b"")
        return (out or b"") + (conn.send(h11.EndOfMessage()) or b"")

    def _bad_request(self, error: str, writer: asyncio.StreamWriter) -> None:
        """A client's malformed request: 400, counted, one line at DEBUG (never an ERROR)."""
        self.counts["bad_requests"] = self.counts.get("bad_requests", 0) + 1
        log.debug("Refused a malformed request error=%s", " ".join(error.split())[:200])
        with contextlib.suppress(ConnectionError, RuntimeError):
            writer.write(_BAD)


async def start_health_server(health: Health, host: str, port: int) -> HealthServer:
    """Listen on `host:port` (port 0: any free port); OSError when it cannot be bound."""
    server = HealthServer(health)
    await server.listen(host, port)
    return server
