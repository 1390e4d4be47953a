"""Wiring and lifecycle: builds every component from the validated config and runs them.

It never polls, runs SQL or publishes itself. Shutdown order keeps the promise of no loss: stop
the sources, seal what they produced, give in-flight publishes a moment to be acknowledged, close
the store.

The configuration is read and validated in a child process (edge_agent/config/isolated.py),
which hands back a `Blueprint` (edge_agent/blueprint.py): the memory that reading takes does
not stay in the agent (docs/performance.md, issue 10).

Reload (SIGHUP, `systemctl reload`; docs/contract.md §1): the file is read and validated again;
an invalid one is refused, its problems logged, and the running configuration kept. A valid one
goes to `Agent.reload`, which applies sources (added, removed, changed: their intervals too), the
log level and the signing key while the buffer, the batcher and the forwarder keep running, so
nothing buffered is dropped or sent twice; keys that need a restart are named in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent import audit as audit_events
from edge_agent import systemd
from edge_agent.audit import audit
from edge_agent.blueprint import Blueprint, PreparedSources, source_digest
from edge_agent.clock import ClockWatch
from edge_agent.config import Config
from edge_agent.config.fresh import fresh_copy
from edge_agent.config.isolated import load_config_isolated
from edge_agent.config.schema import SourceConfig
from edge_agent.errors import ConfigError, StoreError
from edge_agent.forward.mqtt import Forwarder
from edge_agent.health import Health, start_health_server
from edge_agent.logs import LEVELS, LogFormat, configure_logging, set_level
from edge_agent.metrics import AuditCollector, Metrics, SourceCollector
from edge_agent.seal.batcher import Batcher
from edge_agent.seal.envelope import Sealer
from edge_agent.seal.keys import load_consumer_key, load_private_key
from edge_agent.sources import Emit, Source, SourceContext, SourceState, build_source
from edge_agent.store.sqlite import Store

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 5.0
GOODBYE_S = 3.0
SOURCE_RESTART_S = 5.0
CLOCK_CHECK_S = 1.0
"""How often the wall clock is compared with the monotonic clock for steps."""
STATUS_EVERY_S = 5.0
"""How often the systemd STATUS= line is recomputed (sent only when its text changes)."""

RESTART_SECTIONS = ("gateway", "store", "mqtt", "batch", "health")
"""Config sections a reload cannot apply to a running agent: a change is named, not applied."""


def run_agent(path: Path, log_format: LogFormat = "auto") -> int:
    """`edge-agent run`: 0 after a clean stop, 1 when the config or the start-up fails."""
    configure_logging(log_format=log_format)
    one_malloc_arena()
    try:
        # Read and validated in a child process, whose memory goes with it (config/isolated.py)
        with _stop_signals_raise():
            blueprint = load_config_isolated(path, Blueprint.of)
    except KeyboardInterrupt as stop:
        log.info("Stopped while reading the configuration file=%s signal=%s", path, stop)
        return 0
    except ConfigError as exc:
        for line in str(exc).splitlines():  # one located line per problem
            log.error("Invalid configuration, not starting problem=%s", line)
        audit("config", "refused", file=str(path), problems=len(exc.problems))
        return 1
    except OSError as exc:
        log.error("Cannot read the configuration file=%s error=%s", path, exc.strerror or exc)
        return 2
    set_level(LEVELS[blueprint.config.log.level])
    step = "building the components"
    try:
        # A stop from here until the event loop runs raises KeyboardInterrupt; from then on
        # the loop's handlers take it (Agent.run): start-up ends cleanly at any step.
        with _stop_signals_raise():
            agent = Agent(blueprint.config, config_path=path, prepared=blueprint.prepared)
            del blueprint  # what the agent does not keep of the validated file is freed now
            agent.compact()
            step = "starting the event loop"
            return asyncio.run(agent.run())
    except KeyboardInterrupt as stop:
        log.info("Stopped during start-up step=%s signal=%s", step, stop)
        return 0
    except (StoreError, OSError, ValueError) as exc:
        log.error("Could not start error=%s", exc)
        return 1


@contextlib.contextmanager
def _stop_signals_raise() -> Iterator[None]:
    """SIGTERM, as SIGINT does, raises KeyboardInterrupt in the block (a BaseException: no
    `except Exception` on the way swallows it); in the main thread only, and the handlers
    before it are restored after it.

    Reading a large file takes a second or more (in a child process): a stop meanwhile must end
    the agent as a stop does later (exit 0, contract §1) and end that child with it
    (config/isolated.py), not kill the agent by the signal's default and leave the child on.
    The same holds while the agent is built and until its event loop takes the signals over
    (`Agent.run`), so that no step of start-up is left to the default action. A SIGHUP
    (`systemctl reload`) meanwhile is ignored and logged, as it is later in start-up: its default
    action would end the agent.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set in the main thread
        return

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def hang_up(signum: int, frame: object) -> None:
        log.warning("Reload ignored: the agent is still starting")

    before = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    before[signal.SIGHUP] = signal.signal(signal.SIGHUP, hang_up)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


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


LONG_CHECK_BYTES = 64 * 1024**2
"""A buffer from this size up takes seconds to check (about 40 MB/s from a cold cache)."""


def _log_a_long_check(path: Path) -> None:
    """Say that a large buffer is being checked, so that seconds of silence at start are
    explained; a small one is not (a start that fails stays one line, contract §1)."""
    try:
        size = path.stat().st_size
    except OSError:
        return
    if size >= LONG_CHECK_BYTES:
        log.info("Checking the buffer path=%s bytes=%d", path, size)


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
    return_freed_memory()


def return_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim`); else nothing.

    Start-up's garbage (the configuration as read and validated, freed by now) leaves free
    pages inside the heap that glibc keeps unless asked: 1-2 MB on a gateway of 10,000 points
    (docs/performance.md).
    """
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def one_malloc_arena() -> None:
    """Threads made from now on share the main C heap (glibc's M_ARENA_MAX = 1); else nothing.

    The agent's few threads (SQLite's, the executor's) allocate little; an arena of their own
    each costs about 0.5 MB of RSS (docs/performance.md). Call it before they start.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_ARENA_MAX, 1)


_M_ARENA_MAX = -8
"""glibc's mallopt parameter number (malloc.h)."""


def _glibc() -> Any:
    """glibc through ctypes when the process runs on it (it has `malloc_trim`), else None."""
    import ctypes  # noqa: PLC0415 - 0.2 MB, for start-up only

    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim  # noqa: B018 - glibc only (not musl, not macOS)
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@dataclass
class ReloadResult:
    """What `Agent.reload` did: parts applied, and keys that take effect only after a restart."""

    applied: list[str] = field(default_factory=list)
    """`sources+=NAME`, `sources-=NAME`, `sources~=NAME` (changed), `log.level`, `signing.key`."""
    needs_restart: list[str] = field(default_factory=list)
    """Dotted keys (`mqtt.url`, `batch.max_delay`) whose new values wait for a restart."""


class Agent:
    """The running agent: builds the components from `config` and runs them until stopped.

    `config_path` is the file a SIGHUP re-reads (none: SIGHUP is ignored). `reload` applies a
    new validated config to the running agent.
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        prepared: PreparedSources | None = None,
    ) -> None:
        """`prepared`: for a `config` made light by `Blueprint.of`, what that left out."""
        self.config = config
        self.config_path = config_path
        self.metrics = Metrics()
        self.clock = ClockWatch()
        """The batches' clock state, the age clock of the buffer, steps of the wall clock."""
        self.store = Store(
            config.store.path,
            max_bytes=int(config.store.max_bytes),
            max_age_s=config.store.max_age,
            now_ns=self.clock.age_ns,
        )
        self.source_context = SourceContext(dict(prepared.parts) if prepared else None)
        """What the sources share (the Modbus link pool); owned here, lent to each source."""
        self.sources: list[Source] = [build_source(c, self.source_context) for c in config.sources]
        self.source_states: dict[str, SourceState] = {s.name: s.state for s in self.sources}
        """Each running source's state by name, shared with health and metrics (kept current)."""
        self.metrics.registry.register(SourceCollector(self.source_states))
        self.metrics.registry.register(AuditCollector(audit_events.COUNTS))
        # Each source keeps what it needs of its config (a Modbus source: its points as compact
        # tuples), so the validated models of the sources, thousands of points on a large
        # gateway, are not kept here too: `config.sources` is empty from now on. A reload
        # tells a changed source by the digest of its config (`_source_digests`).
        if prepared is None:
            self._source_digests = {c.name: source_digest(c) for c in config.sources}
        else:  # `config`'s sources are light: the digests of the whole ones
            self._source_digests = dict(prepared.digests)
        self.config = config.model_copy(update={"sources": []})
        self.stopping = asyncio.Event()
        self.started = asyncio.Event()
        self._group: asyncio.TaskGroup | None = None
        self._source_tasks: dict[str, asyncio.Task[None]] = {}
        self.batcher: Batcher | None = None
        """The batcher once running: `rotate_signing_key` switches its key."""
        self._reload_lock = asyncio.Lock()
        self._status = ""
        self._forwarder: Forwarder | None = None
        """The running forwarder once started (the STATUS= line reads its state)."""
        self._ack_keys: list[Ed25519PublicKey] = []
        self._starting: asyncio.Task[int] | None = None
        """`run`'s task while it starts (a stop cancels it), None once started."""
        self._step = "starting"
        """The start-up step under way, for the log line of a stop during start-up."""
        self._stopped_by: str | None = None
        """The signal that stopped start-up (SIGTERM, SIGINT), if one did."""

    def compact(self) -> None:
        """Let the memory of loading the configuration go, once nothing refers to it any more.

        Each source that can remakes what it keeps per point as fresh objects (`compact`), so
        that the pages of the validated configuration are freed whole; then glibc is asked to
        give its free pages back. Call it once the caller has dropped the `Config` it built the
        agent from.
        """
        gc.collect()
        self.config = fresh_copy(self.config)
        self._source_digests = fresh_copy(self._source_digests)
        for source in self.sources:
            compact = getattr(source, "compact", None)
            if compact is not None:
                compact()
        gc.collect()
        return_freed_memory()

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
            catalogue=self.config.batch.uses_catalogue,
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
        """Start, run until SIGTERM or SIGINT, stop cleanly: 0. Raises StoreError, OSError or
        ValueError when start-up fails.

        The stop signals are the loop's from the first step on: during start-up one cancels
        it at whatever step it is (`_on_stop`; checking a large buffer takes seconds, 13 s at
        512 MB from a cold cache) and the agent ends as after a stop, 0 and the step logged
        (docs/contract.md §1), the buffer closed; nothing is connected or sealed yet.
        """
        self._starting = asyncio.current_task()
        self._install_signal_handlers()
        try:
            return await self._start()
        except asyncio.CancelledError:
            if self._stopped_by is None or self._starting is None:
                raise  # not our stop's cancellation
            self._starting.uncancel()
            log.info("Stopped during start-up step=%s signal=%s", self._step, self._stopped_by)
            return 0

    async def _start(self) -> int:
        self._step = "loading the keys"
        sealer = self.load_sealer(self.config.signing.key_file)
        # Consumer keys whose acknowledgements are trusted (end_to_end; ValueError names a bad one).
        self._ack_keys = [load_consumer_key(path) for path in self.config.mqtt.ack_keys]
        try:
            self._step = "checking the buffer"
            allowance = _check_allowance_us(self.config.store.path)
            systemd.notify(f"STATUS=Checking the buffer\nEXTEND_TIMEOUT_USEC={allowance}")
            _log_a_long_check(self.config.store.path)
            await self.store.open()
            self.metrics.store_quarantined.inc(len(self.store.quarantined))
            self._step = "adopting the buffer's clock"
            await self._adopt_clock()
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
            clock=self.clock,
        )
        forwarder = Forwarder(
            self.config.mqtt,
            self.config.gateway.id,
            self.store,
            batcher.sealed,
            self.metrics,
            on_evicted=batcher.declare_pending,
            on_payload_limit=batcher.set_max_bytes,
            ack_keys=self._ack_keys,
            mark=batcher.high_water_mark,
        )
        tasks: list[asyncio.Task[None]] = []
        self._step = "starting the health server"
        health = Health(
            gateway=self.config.gateway.id,
            store=self.store,
            mqtt=forwarder.state,
            sources=self.source_states,
            metrics=self.metrics,
            alive=lambda: all(not t.done() for t in [*tasks, *self._source_tasks.values()]),
            held_back_since=lambda: batcher.held_back_since,
            clock=self.clock,
        )
        runner = await start_health_server(health, self.config.health.host, self.config.health.port)
        # Started: nothing awaits from here to the task group, and a stop is an ordinary one
        self._starting = None
        self._forwarder = forwarder
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
                self._group = group
                for source in self.sources:
                    self._start_source(source)
                batcher_task = group.create_task(batcher.run(), name="batcher")
                forwarder_task = group.create_task(forwarder.run(), name="forwarder")
                tasks.extend([batcher_task, forwarder_task])
                watchdog = systemd.watchdog_interval()
                if watchdog:
                    tasks.append(group.create_task(self._watchdog(watchdog), name="watchdog"))
                health.ready = True
                systemd.notify(f"READY=1\nSTATUS={self._current_status()}")
                tasks.append(group.create_task(self._status_loop(forwarder), name="status"))
                tasks.append(group.create_task(self._clock_loop(), name="clock"))
                self.started.set()
                await self.stopping.wait()
                health.ready = False
                systemd.notify("STOPPING=1\nSTATUS=Stopping: sealing pending readings")
                log.info("Stopping: sealing pending readings and draining in-flight batches")
                await _cancel(list(self._source_tasks.values()))
                batcher.stop()
                await batcher_task
                await self._drain(forwarder)
                await _cancel(tasks, patience=GOODBYE_S)
        finally:
            await runner.cleanup()
        log.info(
            "Stopped cleanly buffered_readings=%d taken=%d sealed=%d",
            self.store.stats.readings, batcher.taken, batcher.sealed_readings,
        )  # fmt: skip
        return 0

    async def _adopt_clock(self) -> None:
        """Continue this boot's age clock from the buffer's meta (edge_agent/clock/watch.py), so
        that batches buffered by an earlier run keep their true ages; then keep ours there."""
        kept = (self.store.recall(k) for k in ("clock_boot", "clock_anchor_ns", "clock_offset_ns"))
        if self.clock.adopt(*kept) is not None:
            self.metrics.clock_steps.inc()
        await self._remember_clock()

    async def _remember_clock(self) -> None:
        for key, value in self.clock.persisted().items():
            if self.store.recall(key) != value:
                try:
                    await self.store.remember(key, value)
                except StoreError as exc:  # kept at the next step or start; ages stay right
                    log.debug("Could not keep the clock's anchor error=%s", exc)
                    return

    async def _clock_loop(self) -> None:
        """Every CLOCK_CHECK_S: look for a step of the wall clock (logged, counted, kept)."""
        while True:
            await asyncio.sleep(CLOCK_CHECK_S)
            self.metrics.clock_synced.set(1 if self.clock.state()["synced"] else 0)
            if self.clock.check() is not None:
                self.metrics.clock_steps.inc()
                await self._remember_clock()

    async def _drain(self, forwarder: Forwarder) -> None:
        """Wait until the buffer is empty or the grace period ends, whichever comes first."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                while forwarder.state.connected and await forwarder.unsent_batches() > 0:
                    forwarder.acked.clear()
                    await forwarder.acked.wait()

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig.name)
        loop.add_signal_handler(signal.SIGHUP, self._on_hangup)

    def _on_stop(self, signame: str) -> None:
        """SIGTERM or SIGINT: stop. During start-up, cancel it (`run` ends it cleanly); after,
        the running agent stops (`stopping`)."""
        if self._starting is not None and self._stopped_by is None:
            self._stopped_by = signame
            self._starting.cancel()
        self.stopping.set()

    def _start_source(self, source: Source) -> None:
        assert self._group is not None and self.batcher is not None
        self._source_tasks[source.name] = self._group.create_task(
            self._guard(source, self.batcher.emit), name=f"source-{source.name}"
        )

    def _on_hangup(self) -> None:
        if self.config_path is None or self.stopping.is_set():
            log.warning("Reload ignored: the agent is not running from a file")
            return
        if self._group is None:
            log.warning("Reload ignored: the agent is still starting file=%s", self.config_path)
            return
        self._group.create_task(self._reload_from_file(self.config_path), name="reload")

    async def _reload_from_file(self, path: Path) -> None:
        """SIGHUP: read and validate `path`; refuse it (logged, audited) or apply it (`reload`)."""
        async with self._reload_lock:
            if self._stopping_drops_reload(path):
                return
            systemd.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
            try:
                # In a fresh interpreter: the memory of loading stays there (config/isolated.py)
                new = await asyncio.to_thread(
                    load_config_isolated, path, Blueprint.of, fresh_interpreter=True
                )
            except ConfigError as exc:
                for line in str(exc).splitlines():
                    log.error("Reload: invalid configuration problem=%s", line)
                audit("config", "refused", file=str(path), problems=len(exc.problems))
                self._refused(path, f"{len(exc.problems)} problem(s) in {path}")
                return
            except OSError as exc:
                self._refused(path, exc.strerror or str(exc))
                return
            if self._stopping_drops_reload(path):
                return
            try:
                result = await self.reload(new.config, new.prepared)
            except (OSError, ValueError) as exc:  # the signing key refused: nothing changed
                self._refused(path, str(exc))
                return
            except Exception:  # a bug: keep running on what was applied, say so once
                log.exception("Reload failed part-way, a bug to report file=%s", path)
                self._refused(path, "internal error, see the log")
                return
            applied = ",".join(result.applied) or "nothing changed"
            audit("reload", "success", file=str(path), applied=applied,
                  needs_restart=",".join(result.needs_restart) or None)  # fmt: skip
            log.info("Reloaded file=%s applied=%s", path, applied)
            systemd.notify(f"READY=1\nSTATUS={self._current_status()}")

    def _stopping_drops_reload(self, path: Path) -> bool:
        """True (and logged) once a stop began: a reload then applies nothing.

        Reading the file takes a while (a fresh interpreter, 0.5 s and more); a SIGTERM in that
        time has already stopped the sources, and a reload applied after it would start them
        again under a stopped batcher: the agent would never exit.
        """
        if not self.stopping.is_set():
            return False
        log.warning("Reload dropped: the agent is stopping file=%s", path)
        return True

    def _refused(self, path: Path, why: str) -> None:
        """A reload refused: audited, logged (the outcome line last), and in systemd's STATUS=."""
        audit("reload", "refused", file=str(path), error=why)
        log.error("Reload refused, running configuration kept file=%s error=%s", path, why)
        systemd.notify(f"READY=1\nSTATUS={self._current_status()} (last reload refused: {why})")

    async def reload(self, new: Config, prepared: PreparedSources | None = None) -> ReloadResult:
        """Apply a validated config to the running agent; return what was applied.

        `prepared`: for a `new` made light by `Blueprint.of`, what that left out.
        Applied now: the signing key first, through `rotate_signing_key` (checked and audited;
        raises PermissionError, OSError or ValueError before anything changes, and the running
        configuration stays whole), then `log.level` and sources (a source whose config changed
        is stopped and started again with the new one; others keep running undisturbed).
        Everything buffered stays: readings a stopped source produced are sealed with the rest,
        and nothing is re-sealed or re-sent. Keys under RESTART_SECTIONS that changed are logged
        as needing a restart and keep their running values (so a later reload names them again
        until the restart); a new key is sealed with the running `batch` settings (format,
        compression).
        """
        assert self.batcher is not None, "reload needs a running agent"
        previous_kid = self.batcher.sealer.kid
        kid = await self.rotate_signing_key(new.signing.key_file)
        result = ReloadResult()
        kept: dict[str, Any] = {}
        for section in RESTART_SECTIONS:
            old_value, new_value = getattr(self.config, section), getattr(new, section)
            if old_value != new_value:
                result.needs_restart.extend(
                    f"{section}.{key}" if key else section
                    for key in _changed_keys(old_value.model_dump(), new_value.model_dump())
                )
                kept[section] = old_value
        if kid != previous_kid:  # logged by rotate_signing_key as a `key` audit event
            result.applied.append("signing.key")
        if new.log.level != self.config.log.level:
            set_level(LEVELS[new.log.level])
            result.applied.append("log.level")
        result.applied.extend(await self._apply_sources(new.sources, prepared))
        self.config = new.model_copy(update={**kept, "sources": []})
        if result.needs_restart:
            log.warning(
                "Reload: these changes need a restart to apply keys=%s",
                ",".join(result.needs_restart),
            )
        return result

    async def _apply_sources(
        self, configs: Sequence[SourceConfig], prepared: PreparedSources | None
    ) -> list[str]:
        """Stop removed and changed sources, start added and changed ones; the rest run on."""
        running = {s.name: s for s in self.sources}
        wanted = {c.name: c for c in configs}
        if prepared is None:
            digests = {name: source_digest(c) for name, c in wanted.items()}
        else:  # `configs` are light: the digests of the whole ones
            digests = dict(prepared.digests)
        changed = [n for n in wanted if n in running and digests[n] != self._source_digests.get(n)]
        removed = [n for n in running if n not in wanted]
        added = [n for n in wanted if n not in running]
        stopping = [*removed, *changed]
        await _cancel([self._source_tasks.pop(n) for n in stopping if n in self._source_tasks])
        for name in stopping:
            self.source_states.pop(name, None)
        sources: list[Source] = []
        if prepared is not None:  # what the light configs left out, for the sources built now
            self.source_context.prepared.update(prepared.parts)
        try:
            for config in configs:
                source = running.get(config.name)
                if source is None or config.name in changed:
                    source = build_source(config, self.source_context)
                    self.source_states[source.name] = source.state
                    self._start_source(source)
                sources.append(source)
        finally:  # and what was left out of those that run on: never used by a later build
            self.source_context.prepared.clear()
        self.sources = sources
        self._source_digests = digests
        for name in removed:
            log.info("Source removed by reload source=%s", name)
        for name in changed:
            log.info("Source restarted with its new configuration source=%s", name)
        for name in added:
            log.info("Source added by reload source=%s", name)
        return (
            [f"sources+={n}" for n in added]
            + [f"sources-={n}" for n in removed]
            + [f"sources~={n}" for n in changed]
        )

    def _status_text(self, forwarder: Forwarder) -> str:
        """The STATUS= line: what a person needs from `systemctl status` at a glance."""
        up = sum(1 for s in self.source_states.values() if s.up)
        stats = self.store.stats
        head = "Forwarding" if forwarder.state.connected else "Buffering (broker not connected)"
        return (
            f"{head}; {up} of {len(self.source_states)} sources up; "
            f"{stats.readings} readings in {stats.batches} batches buffered"
        )

    def _current_status(self) -> str:
        """The STATUS= line now (and the one `_status_loop` compares with): READY=1 after a
        reload must count the sources of the configuration just applied, not those the loop
        last counted, up to STATUS_EVERY_S before."""
        if self._forwarder is not None:
            self._status = self._status_text(self._forwarder)
        return self._status

    async def _status_loop(self, forwarder: Forwarder) -> None:
        """Send STATUS= when its text changes, checked every STATUS_EVERY_S."""
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            text = self._status_text(forwarder)
            if text != self._status:
                self._status = text
                systemd.notify(f"STATUS={text}")

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


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two `model_dump()`s ("" for the whole value)."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            name = f"{prefix}.{key}" if prefix else str(key)
            if old.get(key) != new.get(key):
                found.extend(_changed_keys(old.get(key), new.get(key), name))
        return found
    return [prefix]


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
