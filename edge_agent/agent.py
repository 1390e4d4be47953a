"""Wiring and lifecycle: builds every component from the validated config and runs them.

It never polls, runs SQL or publishes itself. Shutdown order keeps the promise of no loss: stop
the sources, seal what they produced, give in-flight publishes a moment to be acknowledged, close
the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from edge_agent import audit as audit_events
from edge_agent import systemd
from edge_agent.audit import audit
from edge_agent.config import Config, load_config
from edge_agent.errors import ConfigError, StoreError
from edge_agent.forward.mqtt import Forwarder
from edge_agent.health import Health, start_health_server
from edge_agent.logs import configure_logging
from edge_agent.metrics import AuditCollector, Metrics, SourceCollector
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Sealer
from edge_agent.seal.keys import load_private_key
from edge_agent.sources import Emit, Source, SourceContext, build_source
from edge_agent.store.sqlite import Store

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0
GOODBYE_S = 3.0
SOURCE_RESTART_S = 5.0


def run_agent(path: Path) -> int:
    """`edge-agent run`: 0 after a clean stop, 1 when the config or the start-up fails."""
    configure_logging()
    try:
        config = load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)  # one located line per problem
        audit("config", "refused", file=str(path), problems=len(exc.problems))
        return 1
    except OSError as exc:
        print(f"{path}: cannot read: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        agent = Agent(config)
        del config  # what the agent does not keep of the validated file is freed now
        return asyncio.run(agent.run())
    except (StoreError, OSError, ValueError) as exc:
        log.error("Could not start error=%s", exc)
        return 1


def _check_allowance_us(path: Path) -> int:
    """Start-up time to ask systemd for: the buffer's quick_check reads the whole file.

    Measured: 512 MB in 13 s from a cold page cache on a virtual disk (about 40 MB/s); allow
    10 MB/s, plus a minute for the rest of the start.
    """
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    return int((60 + size / 10e6) * 1e6)


def tune_garbage_collector() -> None:
    """Fewer, cheaper collections: readings are short-lived but tracked by the GC.

    Freezing what start-up created (about 130,000 objects of imported modules) keeps full
    collections from walking it again, and a higher first threshold stops a collection every
    few hundred readings. Measured in docs/performance.md: CPU per 100,000 readings 0.23-0.25 s
    down to 0.15-0.19 s, p99 latency at 100,000 readings/s 55 ms down to 27 ms.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


class Agent:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.store = Store(
            config.store.path, max_bytes=int(config.store.max_bytes), max_age_s=config.store.max_age
        )
        self.source_context = SourceContext()
        """What the sources share (the Modbus link pool); owned here, lent to each source."""
        self.sources: list[Source] = [build_source(c, self.source_context) for c in config.sources]
        # Each source keeps what it needs of its config (a Modbus source: its points as compact
        # tuples), so the validated models of the sources, thousands of points on a large
        # gateway, are not kept here too: `config.sources` is empty from now on.
        self.config = config.model_copy(update={"sources": []})
        self.metrics.registry.register(SourceCollector({s.name: s.state for s in self.sources}))
        self.metrics.registry.register(AuditCollector(audit_events.COUNTS))
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.batcher: Batcher | None = None
        """The batcher once running: `rotate_signing_key` switches its key."""

    def load_sealer(self, key_file: Path) -> Sealer:
        """A Sealer for the key in `key_file`, after the checks of seal/keys.py (blocking I/O).

        Raises PermissionError (owner, mode, directory) or ValueError (not an Ed25519 PEM key),
        each naming the file and never its content; the refusal is an audit event.
        """
        try:
            key = load_private_key(key_file)
        except (OSError, ValueError) as exc:
            audit("key", "refused", file=str(key_file), error=str(exc))
            raise
        return Sealer(
            key,
            compress=self.config.batch.compression == "zstd",
            payload_format=self.config.batch.format,
        )

    async def rotate_signing_key(self, key_file: Path) -> bytes:
        """Sign every batch sealed from now on with the key in `key_file`; return its key id.

        What a reload (SIGHUP) calls when `signing.key_file` names another file or the file now
        holds another key. The new key is checked and loaded before anything changes: on
        PermissionError or ValueError the running key stays in use. Batches sealed before keep
        their signature (docs/security.md: consumers trust both keys while they drain). Logged
        as a `key` audit event; a key id equal to the running one changes nothing.
        """
        if self.batcher is None:
            raise RuntimeError("the agent is not running: nothing signs yet")
        sealer = await asyncio.to_thread(self.load_sealer, key_file)
        old = self.batcher.sealer.kid
        if sealer.kid != old:
            self.batcher.use_sealer(sealer)
            audit("key", "success", action="rotated", kid=sealer.kid, previous_kid=old,
                  file=str(key_file))  # fmt: skip
        return sealer.kid

    async def run(self) -> int:
        sealer = self.load_sealer(self.config.signing.key_file)
        try:
            allowance = _check_allowance_us(self.config.store.path)
            systemd.notify(f"STATUS=Checking the buffer\nEXTEND_TIMEOUT_USEC={allowance}")
            await self.store.open()
            self.metrics.store_quarantined.inc(len(self.store.quarantined))
            return await self._run_with_store(sealer)
        finally:
            await self.store.close()  # also when start-up fails: its thread would keep us alive

    async def _run_with_store(self, sealer: Sealer) -> int:
        audit("key", "success", action="loaded", kid=sealer.kid,
              file=str(self.config.signing.key_file))  # fmt: skip
        self.batcher = batcher = Batcher(
            self.store,
            sealer,
            self.metrics,
            gateway=self.config.gateway.id,
            max_readings=self.config.batch.max_readings,
            max_delay=self.config.batch.max_delay,
            capacity=self.config.batch.queue_readings,
        )
        forwarder = Forwarder(
            self.config.mqtt,
            self.config.gateway.id,
            self.store,
            batcher.sealed,
            self.metrics,
            on_evicted=batcher.declare_pending,
            on_payload_limit=batcher.set_max_bytes,
        )
        tasks: list[asyncio.Task[None]] = []
        health = Health(
            gateway=self.config.gateway.id,
            store=self.store,
            mqtt=forwarder.state,
            sources={s.name: s.state for s in self.sources},
            metrics=self.metrics,
            alive=lambda: all(not t.done() for t in tasks),
            held_back_since=lambda: batcher.held_back_since,
        )
        runner = await start_health_server(health, self.config.health.host, self.config.health.port)
        self._install_signal_handlers()
        tune_garbage_collector()
        log.info(
            "Started gateway=%s sources=%d buffer=%s epoch=%s backlog=%d",
            self.config.gateway.id,
            len(self.sources),
            self.store.path,
            self.store.epoch,
            self.store.stats.readings,
        )
        try:
            async with asyncio.TaskGroup() as group:
                source_tasks = [
                    group.create_task(self._guard(s, batcher.emit), name=f"source-{s.name}")
                    for s in self.sources
                ]
                batcher_task = group.create_task(batcher.run(), name="batcher")
                forwarder_task = group.create_task(forwarder.run(), name="forwarder")
                tasks.extend([*source_tasks, batcher_task, forwarder_task])
                watchdog = systemd.watchdog_interval()
                if watchdog:
                    tasks.append(group.create_task(self._watchdog(watchdog), name="watchdog"))
                health.ready = True
                systemd.notify("READY=1\nSTATUS=Forwarding")
                self.started.set()
                await self.stopping.wait()
                health.ready = False
                systemd.notify("STOPPING=1\nSTATUS=Draining")
                log.info("Stopping: sealing pending readings and draining in-flight batches")
                await _cancel(source_tasks)
                batcher.stop()
                await batcher_task
                await self._drain(forwarder)
                await _cancel(tasks, patience=GOODBYE_S)
        finally:
            await runner.cleanup()
        log.info("Stopped cleanly buffered_readings=%d", self.store.stats.readings)
        return 0

    async def _drain(self, forwarder: Forwarder) -> None:
        """Wait until the buffer is empty or the grace period ends, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                while forwarder.state.connected and self.store.stats.batches > 0:
                    forwarder.acked.clear()
                    await forwarder.acked.wait()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)

    async def _guard(self, source: Source, emit: Emit) -> None:
        """A source that crashes (a bug, not a device fault) is logged and restarted alone."""
        while True:
            try:
                await source.run(emit)
            except Exception as exc:
                source.state.mark_down(f"internal error: {exc!r}")
                log.exception("Source crashed, restarting source=%s", source.name)
            await asyncio.sleep(SOURCE_RESTART_S)

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


async def _cancel(tasks: Sequence[asyncio.Task[None]], *, patience: float = 0.2) -> None:
    """Cancel and wait, re-delivering a cancellation that a library swallowed.

    On Python 3.11, `asyncio.wait_for` returns the result instead of raising when the awaited
    future completes in the same loop turn as the cancel (fixed in 3.12); pymodbus awaits every
    response that way, so one cancel does not always stop a Modbus source. `patience` is how
    long a task may take to wind up (the forwarder says goodbye) before it is cancelled again.
    """
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=patience)
    for task in tasks:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "Task failed while stopping task=%s error=%r", task.get_name(), task.exception()
            )
