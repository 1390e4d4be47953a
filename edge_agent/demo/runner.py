"""`edge-agent demo`: the whole pipeline on one machine, from nothing, until Ctrl-C.

It starts simulated devices, a private broker, the real agent (the same `Agent` as `edge-agent
run`, with a configuration validated by the same models) and the reference verifier, all in this
process and all in a temporary directory that is removed at exit. The view reads the agent's own
health endpoint, so what it shows is what `edge-agent status` would show.

Stopping keeps the no-loss promise visible: the agent drains its buffer, the verifier gets a
moment to catch up, and the summary says whether every sequence number arrived.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import yaml

from edge_agent.agent import Agent
from edge_agent.config import Config, parse_config
from edge_agent.consumer.verify import Verifier, consume, consumer_client
from edge_agent.demo.broker import free_port
from edge_agent.demo.devices import start_devices
from edge_agent.demo.embedded_broker import (
    BrokerChoice,
    BrokerUnavailableError,
    LocalBroker,
    choose_broker,
)
from edge_agent.demo.view import Screen, Snapshot, SourceRow, render, status_line
from edge_agent.logs import LIBRARY_LEVELS, configure_logging, set_levels
from edge_agent.seal.envelope import Batch, Opener
from edge_agent.seal.keys import PRIVATE_NAME, PUBLIC_NAME, load_public_key, write_keypair

log = logging.getLogger("edge_agent.demo")

GATEWAY = "demo-gw"
TOPIC_PREFIX = "demo/site"
VERIFIER_ID = "edge-agent-demo-verify"
REFRESH_S = 0.5
STATUS_LINE_EVERY_S = 3.0
OUTAGE_S = 10.0
OUTAGE_AFTER_S = 8.0
CATCH_UP_S = 5.0
RATE_WINDOW_S = 5.0

SIMULATED_SOURCE: dict[str, Any] = {
    "type": "simulated",
    "name": "sim",
    "interval": "200ms",
    "points": [
        {"name": "temperature", "signal": "sine", "period": "30s", "amplitude": 5, "offset": 21},
        {"name": "pressure", "signal": "ramp", "period": "20s", "amplitude": 2, "offset": 1},
        {"name": "pump_on", "signal": "square", "period": "10s"},
        {"name": "cycles", "signal": "counter"},
    ],
}


@dataclass(frozen=True)
class DemoOptions:
    duration: float | None
    tui: bool
    outage: bool
    broker: BrokerChoice

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DemoOptions:
        """The live view needs a terminal; piped or redirected output gets status lines."""
        return cls(
            duration=getattr(args, "duration", None),
            tui=not getattr(args, "no_tui", False) and sys.stdout.isatty(),
            outage=bool(getattr(args, "outage", False)),
            broker=getattr(args, "broker", None) or "auto",
        )


def run_demo(args: argparse.Namespace) -> int:
    """0 after Ctrl-C; with --duration, 0 only when every source's readings arrived complete."""
    options = DemoOptions.from_args(args)
    try:
        return asyncio.run(Demo(options).run())
    except BrokerUnavailableError as exc:
        print(f"edge-agent demo: {exc}", file=sys.stderr)
        return 1


def demo_config(
    state_dir: Path, broker: LocalBroker, health_port: int, sources: list[dict[str, Any]]
) -> Config:
    """The embedded default, as YAML text through `parse_config`: no shortcut past validation."""
    data = {
        "gateway": {"id": GATEWAY},
        "store": {"path": str(state_dir / "buffer.db"), "max_bytes": "64MiB", "max_age": "1h"},
        "mqtt": {
            "url": broker.url,
            "topic_prefix": TOPIC_PREFIX,
            "protocol": broker.protocol,
            "client_id": f"edge-agent-{GATEWAY}",
            "reconnect_min": "500ms",
            "reconnect_max": "2s",
            "keepalive": "10s",
        },
        "batch": {"max_readings": 500, "max_delay": "500ms", "compression": "zstd"},
        "signing": {"key_file": str(state_dir / "keys" / PRIVATE_NAME)},
        "health": {"listen": f"127.0.0.1:{health_port}"},
        "sources": sources,
    }
    return parse_config(yaml.safe_dump(data, sort_keys=False), "<demo config>", check_files=True)


class _EventLog(logging.Handler):
    """Log records as short lines for the view's EVENTS panel (stderr would tear the screen)."""

    def __init__(self, lines: deque[str]) -> None:
        super().__init__(logging.INFO)
        self._lines = lines
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self._lines.append(self.format(record).splitlines()[0])


class Demo:
    """One run: owns what the view shows, fed by the verifier's callback and the agent's /status."""

    def __init__(self, options: DemoOptions) -> None:
        self.options = options
        self.stop = asyncio.Event()
        self.events: deque[str] = deque(maxlen=50)
        self.rows: dict[str, SourceRow] = {}
        self.history: deque[int] = deque(maxlen=120)
        self._rate: deque[tuple[float, int]] = deque()
        self._status: dict[str, Any] | None = None
        self._outage_until: float | None = None
        self._outage_task: asyncio.Task[None] | None = None
        self._started = time.monotonic()
        self._stopping = False

    async def run(self) -> int:
        state_dir = Path(tempfile.mkdtemp(prefix="edge-agent-demo-"))
        try:
            return await self._run(state_dir)
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)

    async def _run(self, state_dir: Path) -> int:
        self._setup_logging()
        self._take_signals()
        async with contextlib.AsyncExitStack() as stack:
            broker = choose_broker(self.options.broker, state_dir / "broker")
            await broker.start()
            stack.push_async_callback(broker.stop)
            write_keypair(state_dir / "keys")
            sources = [SIMULATED_SOURCE, *await start_devices(stack, state_dir)]
            health_port = free_port()
            config = demo_config(state_dir, broker, health_port, sources)
            self.rows = {s.name: SourceRow(s.name, s.type) for s in config.sources}
            health_url = f"http://127.0.0.1:{health_port}"
            verifier = Verifier(Opener([load_public_key(state_dir / "keys" / PUBLIC_NAME)]))
            topic = f"{TOPIC_PREFIX}/#"
            broker.remember_subscription(VERIFIER_ID, topic)
            agent = Agent(config)
            verifier_stop = asyncio.Event()
            async with asyncio.TaskGroup() as group:
                verifier_task = group.create_task(
                    consume(
                        verifier, lambda: _consumer(broker), topic, self._on_batch, verifier_stop
                    ),
                    name="demo-verifier",
                )
                agent_task = group.create_task(agent.run(), name="demo-agent")
                await _first(agent.started.wait(), agent_task)
                self._take_signals()  # the agent took SIGINT for itself; the demo stops it
                self._started = time.monotonic()
                if self.options.duration is not None:
                    asyncio.get_running_loop().call_later(self.options.duration, self.stop.set)
                if self.options.outage:
                    self._start_outage(broker, OUTAGE_AFTER_S)
                view_task = group.create_task(
                    self._show(broker, health_url, verifier), name="demo-view"
                )
                await _first(self.stop.wait(), agent_task)
                self._stopping = True
                self.stop.set()
                if self._outage_task is not None:
                    await self._outage_task  # brings the broker back, so the buffer can drain
                log.info("Stopping: the agent drains its buffer, the verifier catches up")
                await _stop_agent(agent, agent_task)
                await self._catch_up(agent, verifier)
                verifier_stop.set()
                await verifier_task
                view_task.cancel()
            return self._summary(verifier, broker)

    def _setup_logging(self) -> None:
        if self.options.tui:
            root = logging.getLogger()
            root.handlers[:] = [_EventLog(self.events)]
            root.setLevel(logging.INFO)
            set_levels(LIBRARY_LEVELS)
        else:
            configure_logging()

    def _take_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)

    def _on_batch(self, batch: Batch | None, fresh: list[dict[str, Any]]) -> None:
        if batch is None:
            log.warning("Verifier rejected a batch; the summary says why")
            return
        for reading in fresh:
            row = self.rows.get(reading["src"])
            if row is not None:
                row.verified += 1
                row.latest[reading["pt"]] = reading["v"]

    def _start_outage(self, broker: LocalBroker, delay: float) -> None:
        if self._outage_task is None or self._outage_task.done():
            self._outage_task = asyncio.create_task(self._outage(broker, delay), name="outage")

    async def _outage(self, broker: LocalBroker, delay: float) -> None:
        """Stop the broker for OUTAGE_S: the buffer grows, then drains, and nothing is lost."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), delay)
        if self.stop.is_set():
            return
        log.info(
            "Outage: broker stopped for %.0fs; the agent keeps sealing into its buffer", OUTAGE_S
        )
        await broker.stop()
        self._outage_until = time.monotonic() + OUTAGE_S
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), OUTAGE_S)
        finally:
            await broker.start()
            self._outage_until = None
            log.info("Outage over: broker restarted; the buffer drains")

    async def _catch_up(self, agent: Agent, verifier: Verifier) -> None:
        """Everything the broker acknowledged reaches the verifier within a moment."""
        sent_up_to = agent.store.next_seq - 1 - agent.store.stats.readings
        deadline = time.monotonic() + CATCH_UP_S
        while time.monotonic() < deadline:
            streams = verifier.tracker.streams.values()
            if max((s.max_seq for s in streams), default=0) >= sent_up_to and not (
                verifier.tracker.holes()
            ):
                return
            await asyncio.sleep(0.1)

    async def _show(self, broker: LocalBroker, health_url: str, verifier: Verifier) -> None:
        screen = Screen(sys.stdout, sys.stdin) if self.options.tui else None
        last_line = 0.0
        async with aiohttp.ClientSession() as http:
            try:
                if screen is not None:
                    screen.open(lambda key: self._on_key(key, broker))
                while True:
                    snap = await self._snapshot(http, broker, health_url, verifier)
                    if screen is not None:
                        width = shutil.get_terminal_size().columns
                        screen.draw(render(snap, width, color=True))
                    elif time.monotonic() - last_line >= STATUS_LINE_EVERY_S:
                        last_line = time.monotonic()
                        print(status_line(snap), flush=True)
                    await asyncio.sleep(REFRESH_S)
            finally:
                if screen is not None:
                    screen.close()

    def _on_key(self, key: str, broker: LocalBroker) -> None:
        if "q" in key.lower():
            self.stop.set()
        elif "o" in key.lower() and not self.stop.is_set():
            self._start_outage(broker, 0)

    async def _snapshot(
        self, http: aiohttp.ClientSession, broker: LocalBroker, health_url: str, verifier: Verifier
    ) -> Snapshot:
        status = await _fetch_status(http, health_url) if not self._stopping else self._status
        self._status = status
        now = time.monotonic()
        result = verifier.result
        self._rate.append((now, result.readings))
        while now - self._rate[0][0] > RATE_WINDOW_S:
            self._rate.popleft()
        (t0, r0), (t1, r1) = self._rate[0], self._rate[-1]
        streams = list(verifier.tracker.streams.values())
        missing = sum(b - a + 1 for s in streams for a, b in s.holes())
        snap = Snapshot(
            gateway=GATEWAY,
            elapsed_s=now - self._started,
            broker=broker.name,
            broker_url=broker.url,
            mqtt_protocol=broker.protocol,
            health_url=health_url,
            sources=list(self.rows.values()),
            batches_verified=result.batches,
            readings_verified=result.readings,
            duplicates=result.duplicates,
            rejected=result.rejected,
            last_rejection=result.last_error,
            max_seq=max((s.max_seq for s in streams), default=0),
            missing=missing,
            catalogues=len(verifier.book.catalogues),
            waiting=verifier.book.parked,
            throughput=(r1 - r0) / (t1 - t0) if t1 > t0 else 0.0,
            outage_left_s=max(0.0, self._outage_until - now) if self._outage_until else None,
            events=list(self.events),
            interactive=self.options.tui,
            stopping=self._stopping,
        )
        if status is not None:
            buffer = status["buffer"]
            snap.mqtt_connected = bool(status["mqtt"]["connected"])
            snap.mqtt_error = status["mqtt"].get("last_error")
            snap.buffer_readings = int(buffer["readings"])
            snap.buffer_bytes = int(buffer["bytes"])
            snap.buffer_oldest_s = float(buffer["oldest_age_s"])
            for name, source in status["sources"].items():
                row = self.rows.get(name)
                if row is not None:
                    row.up, row.last_error = bool(source["up"]), source["last_error"]
                    row.polled = int(source.get("readings", 0))
        self.history.append(snap.buffer_readings)
        snap.buffer_history = list(self.history)
        return snap

    def _summary(self, verifier: Verifier, broker: LocalBroker) -> int:
        code, lines = verifier.summary()
        print(
            f"edge-agent demo: ran {time.monotonic() - self._started:.1f}s, "
            f"broker {broker.name}, MQTT {broker.protocol}"
        )
        silent = [row.name for row in self.rows.values() if row.verified == 0]
        for row in self.rows.values():
            print(f"  source {row.name} ({row.kind}): {row.verified} readings verified")
        for line in lines:
            print(f"  {line}")
        if silent:
            print(f"  NO READINGS from {', '.join(silent)}")
        sys.stdout.flush()
        if self.options.duration is None:
            return 0  # Ctrl-C ends a demo; the summary above says how it went
        if code == 0 and silent:
            return 1
        return code


def _consumer(broker: LocalBroker) -> aiomqtt.Client:
    """The verifier's client: MQTT 5 with a session expiry, or 3.1.1 with clean_session off."""
    if broker.protocol == "5":
        return consumer_client(broker.url, VERIFIER_ID)
    host, port = broker.url.removeprefix("mqtt://").rsplit(":", 1)
    return aiomqtt.Client(
        host,
        int(port),
        identifier=VERIFIER_ID,
        protocol=aiomqtt.ProtocolVersion.V311,
        clean_session=False,
        max_queued_incoming_messages=10_000,
    )


async def _fetch_status(http: aiohttp.ClientSession, health_url: str) -> dict[str, Any] | None:
    try:
        async with http.get(
            f"{health_url}/status", timeout=aiohttp.ClientTimeout(total=1)
        ) as response:
            data: dict[str, Any] = await response.json()
            return data
    except (aiohttp.ClientError, TimeoutError):
        return None


async def _stop_agent(agent: Agent, agent_task: asyncio.Task[int]) -> None:
    """Stop the agent the way SIGTERM would, and wait for its clean drain."""
    agent.stopping.set()
    await asyncio.wait({agent_task})


async def _first(wanted: Any, task: asyncio.Task[int]) -> None:
    """Wait for `wanted`, or return early when `task` (the agent) ends first."""
    waiter = asyncio.ensure_future(wanted)
    try:
        await asyncio.wait({waiter, task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
