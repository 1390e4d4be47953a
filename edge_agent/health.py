"""The health endpoint of docs/contract.md §3: /healthz, /readyz, /status and /metrics, one server.

prometheus-client's own server binds 0.0.0.0 by default; this one listens where `health.listen`
says, 127.0.0.1 unless configured otherwise. Every JSON answer is strict JSON (RFC 8259): a NaN
or infinity is never written as `NaN`/`Infinity`, which strict parsers reject.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge_agent.forward.mqtt import ForwarderState
from edge_agent.metrics import Metrics
from edge_agent.sources.base import SourceState
from edge_agent.store.sqlite import Store

strict_dumps = functools.partial(json.dumps, allow_nan=False)
"""json.dumps that raises ValueError on NaN or infinity instead of writing invalid JSON."""


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

    def app(self) -> web.Application:
        app = web.Application()
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
        age = max(0.0, time.time() - oldest / 1e9) if oldest is not None else 0.0
        stats = self._store.stats
        self._metrics.buffer_readings.set(stats.readings)
        self._metrics.buffer_bytes.set(stats.bytes)
        self._metrics.buffer_oldest_age.set(age)
        return {
            "gateway": self._gateway,
            "ready": self.ready,
            "mqtt": {
                "connected": self._mqtt.connected,
                "last_error": self._mqtt.last_error,
                "degraded": self._mqtt.degraded,
                "broker_limits": vars(self._mqtt.limits),
            },
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

    async def _status(self, _: web.Request) -> web.Response:
        return web.json_response(await self.snapshot(), dumps=strict_dumps)

    async def _metrics_text(self, _: web.Request) -> web.Response:
        await self.snapshot()
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def start_health_server(health: Health, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(health.app(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
