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
with a traceback (aiohttp's own choice).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
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

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[_read_only])
        app.on_response_prepare.append(_plain_server_header)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self._metrics_text)
        return app

    async def _healthz(self, _: web.Request) -> web.Response:
        alive = self._alive()
        return web.json_response({"alive": alive}, status=200 if alive else 503, dumps=strict_dumps)

    async def _readyz(self, _: web.Request) -> web.Response:
        return web.json_response(
            {"ready": self.ready}, status=200 if self.ready else 503, dumps=strict_dumps
        )

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

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(await self.snapshot(), dumps=strict_dumps)

    async def _metrics_text(self, _: web.Request) -> web.Response:
        await self.snapshot()
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


MAX_CONNECTIONS = 32
"""Connections served at once; monitoring needs one or two."""
MAX_LINE_BYTES = 4096
"""Longest request line or header line; the endpoint's URLs are a few bytes."""
MAX_HEADERS = 32
IDLE_TIMEOUT_S = 15.0
"""A connection that sends no request for this long is closed (aiohttp's keep-alive timeout)."""
MAX_BODY_BYTES = 1024
"""GET and HEAD carry no body; aiohttp refuses a larger one if a handler ever read it."""

log = logging.getLogger(__name__)
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


@web.middleware
async def _read_only(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """405 for every method but GET and HEAD, whatever the path (CONNECT and OPTIONS too)."""
    if request.method not in ("GET", "HEAD"):
        raise web.HTTPMethodNotAllowed(request.method, ["GET", "HEAD"])
    return await handler(request)


async def _plain_server_header(_: web.Request, response: web.StreamResponse) -> None:
    """`Server: edge-agent`, not the Python and aiohttp versions (nothing to fingerprint)."""
    response.headers["Server"] = "edge-agent"


class _QuietOnBadRequests(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, but a malformed request is counted, not logged with a traceback.

    aiohttp logs every request it cannot parse with `logger.exception`; those are a client's
    fault (a scanner, a health check speaking another protocol) and would flood the log. Other
    exceptions, the agent's own bugs in a handler, still log as errors with their traceback.
    """

    def __init__(self, logger: logging.Logger, counts: dict[str, int]) -> None:
        super().__init__(logger, {})
        self.counts = counts

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        if not self._bad_request(kwargs.get("exc_info")):
            self.logger.exception(msg, *args, **kwargs)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        if not self._bad_request(kwargs.get("exc_info")):  # aiohttp's own, for TLS on HTTP
            self.logger.debug(msg, *args, **kwargs)

    def _bad_request(self, error: object) -> bool:
        """Count and log (one line, DEBUG) a client's malformed request; False for others."""
        if error is True:
            error = sys.exc_info()[1]
        if not isinstance(error, HttpProcessingError):
            return False
        self.counts["bad_requests"] = self.counts.get("bad_requests", 0) + 1
        self.logger.debug("Refused a malformed request error=%s", _one_line(error))
        return True


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:200]


class _Counted(asyncio.Protocol):
    """Wraps aiohttp's protocol of one connection so that the gate knows when it ends."""

    def __init__(self, inner: asyncio.Protocol, gate: _ConnectionGate) -> None:
        self._inner = inner
        self._gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._gate.open -= 1
        self._inner.connection_lost(exc)


class _Refused(asyncio.Protocol):
    """A connection over the limit: answered 503 and closed without reading a byte."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(_BUSY)
        transport.close()


class _ConnectionGate:
    """The protocol factory of the listening socket: at most `limit` connections served."""

    def __init__(self, make: Callable[[], asyncio.Protocol], limit: int) -> None:
        self._make = make
        self._limit = limit
        self.open = 0
        self.refused = 0
        self._refusing = False

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self._limit:
            self.refused += 1
            if not self._refusing:  # one line per episode, not per connection
                self._refusing = True
                log.warning("Health endpoint at its connection limit, refusing limit=%d",
                            self._limit)  # fmt: skip
            return _Refused()
        if self._refusing and self.open < self._limit // 2:
            self._refusing = False
            log.info("Health endpoint below its connection limit again refused=%d", self.refused)
        self.open += 1
        return _Counted(self._make(), self)


class HealthServer:
    """The listening socket and the aiohttp runner behind it."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server, gate: _ConnectionGate,
                 counts: dict[str, int]) -> None:  # fmt: skip
        self._runner = runner
        self._server = server
        self.gate = gate
        self.counts = counts
        """`bad_requests`: malformed requests refused (400)."""

    @property
    def port(self) -> int:
        return int(self._server.sockets[0].getsockname()[1])

    async def cleanup(self) -> None:
        """Stop listening, then close every connection."""
        self._server.close()
        await self._runner.cleanup()


async def start_health_server(health: Health, host: str, port: int) -> HealthServer:
    """Listen on `host:port` (port 0: any free port); OSError when it cannot be bound."""
    counts: dict[str, int] = {}
    runner = web.AppRunner(
        health.app(),
        access_log=None,
        logger=cast(
            logging.Logger, _QuietOnBadRequests(logging.getLogger("aiohttp.server"), counts)
        ),
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_LINE_BYTES,
        max_headers=MAX_HEADERS,
        keepalive_timeout=IDLE_TIMEOUT_S,
    )
    await runner.setup()
    assert runner.server is not None
    gate = _ConnectionGate(runner.server, MAX_CONNECTIONS)
    try:
        server = await asyncio.get_running_loop().create_server(gate, host, port, backlog=128)
    except OSError:
        await runner.cleanup()
        raise
    return HealthServer(runner, server, gate, counts)
