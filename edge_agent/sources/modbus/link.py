"""One Modbus connection or serial line, shared by every source that polls through it.

A link owns one pymodbus client and a lock: requests go out strictly one at a time, which an
RS-485 line requires and a TCP device that accepts a single connection (or a TCP-to-RTU
gateway) expects. On a serial line the link keeps the inter-frame silence (3.5 character times,
at least 1.75 ms above 19200 baud) after every answer or timeout.

Failure policy, so that one dead unit never costs the others more than its own timeout:
- a timeout is the unit's fault, not the line's; the connection is dropped only after
  `DROP_AFTER_TIMEOUTS` timeouts in a row with no answer from any unit in between (a dead TCP
  peer), never because one unit behind a gateway is silent (Neuron #1602);
- pymodbus' own retries, reconnect loop and disconnect-after-N-timeouts are switched off: this
  module decides, and a failed connect is retried after `schedule.Backoff` (capped exponential,
  with jitter), reset by a successful connect.

The link only has read methods: the agent never writes to a device (docs/contract.md §5).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.exceptions import ModbusException, ModbusIOException

from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.errors import DeviceError
from edge_agent.logs import quiet_unless_configured
from edge_agent.schedule import Backoff
from edge_agent.sources.modbus.plan import ReadRequest

log = logging.getLogger(__name__)

DROP_AFTER_TIMEOUTS = 3

EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class ReadError(DeviceError):
    """A read failed; `reason` is one of the counters (timeout, exception, short, disconnected)."""

    reason = "error"


class ReadTimeoutError(ReadError):
    reason = "timeout"


class ShortResponseError(ReadError):
    reason = "short"


class MalformedError(ReadError):
    """An answer that does not belong to the request (wrong unit or transaction id, garbage)."""

    reason = "malformed"


class LinkDownError(ReadError):
    reason = "disconnected"


class ExceptionReplyError(ReadError):
    """The device answered with a Modbus exception response."""

    reason = "exception"

    def __init__(self, device: str, message: str, code: int) -> None:
        super().__init__(device, message)
        self.code = code


@dataclass(frozen=True)
class LinkSettings:
    """What a link needs from the first source that opens it."""

    transport: str
    where: str
    host: str | None
    port: int
    serial_port: str | None
    baudrate: int
    parity: str
    stopbits: int
    bytesize: int
    timeout: float
    pause: float
    reconnect_min: float
    reconnect_max: float

    @classmethod
    def of(cls, config: ModbusSourceConfig) -> LinkSettings:
        where = config.link_key[1]
        return cls(
            config.transport, where, config.host, config.port, config.serial_port,
            config.baudrate, config.parity, config.stopbits, config.bytesize,
            config.timeout, config.pause_between_requests or 0.0,
            config.reconnect_min, config.reconnect_max,
        )  # fmt: skip

    @property
    def silence(self) -> float:
        """Seconds of quiet after each answer: the RTU inter-frame gap or the configured pause."""
        if self.transport != "rtu":
            return self.pause
        bits = 1 + self.bytesize + (self.parity != "N") + self.stopbits
        t35 = 3.5 * bits / self.baudrate if self.baudrate <= 19200 else 0.00175
        return max(t35, self.pause)


class ModbusLink:
    """A shared client: reads serialised by a lock, connects with backoff."""

    def __init__(self, settings: LinkSettings) -> None:
        self.settings = settings
        self.users = 0
        self.connects = 0
        self._lock = asyncio.Lock()
        self._client: Any = None
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._retry_at = 0.0
        self._down_reason = ""
        self._silent_in_a_row = 0

    async def read(
        self, request: ReadRequest, *, unit: int, wait: float, device: str
    ) -> Sequence[int] | Sequence[bool]:
        """Read the request's registers or bits; a ReadError names device, unit and addresses."""
        kind, address, count = request.kind, request.address, request.count
        what = f"unit {unit} {request.describe()}"
        async with self._lock:
            client = await self._connected(device)
            try:
                async with asyncio.timeout(wait):
                    response = await _READERS[kind](client, address, count=count, device_id=unit)
            except TimeoutError:
                self._silent_in_a_row += 1
                if (
                    self._silent_in_a_row >= DROP_AFTER_TIMEOUTS
                    and self.settings.transport == "tcp"
                ):
                    self._drop(f"no answer to {DROP_AFTER_TIMEOUTS} requests in a row")
                raise ReadTimeoutError(device, f"{what}: no answer within {wait:g}s") from None
            except ModbusIOException as exc:
                if self.settings.transport == "tcp":  # resynchronise the stream
                    self._drop(str(exc))
                raise MalformedError(device, f"{what}: malformed answer: {exc}") from None
            except (ModbusException, OSError) as exc:
                self._drop(str(exc))
                raise LinkDownError(device, f"{what}: connection lost: {exc}") from None
            finally:
                if self.settings.silence:
                    await asyncio.sleep(self.settings.silence)
        self._silent_in_a_row = 0
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            name = EXCEPTION_NAMES.get(code, "unknown exception")
            raise ExceptionReplyError(device, f"{what}: exception {code} ({name})", code)
        values: Sequence[int] | Sequence[bool] = (
            response.bits if kind in ("coil", "discrete") else response.registers
        )
        if len(values) < count:
            raise ShortResponseError(device, f"{what}: short response ({len(values)} of {count})")
        return values

    async def _connected(self, device: str) -> Any:
        """The open client, connecting if the backoff allows; else LinkDownError at once."""
        if self._client is not None and self._client.connected:
            return self._client
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            raise LinkDownError(device, self._down_reason)
        self._close()
        self._client = client = self._new_client()
        started = loop.time()
        try:
            async with asyncio.timeout(self.settings.timeout):
                ok = await client.connect()
        except TimeoutError:
            ok = False
        if ok:
            self._backoff.reset()
            self._silent_in_a_row = 0
            self.connects += 1
            return client
        self._close()
        waited = loop.time() - started >= self.settings.timeout
        verb = "open" if self.settings.transport == "rtu" else "connect to"
        why = f"no answer within {self.settings.timeout:g}s" if waited else "refused or unreachable"
        self._down_reason = f"cannot {verb} {self.settings.where} ({why})"
        self._retry_at = loop.time() + self._backoff.next()
        raise LinkDownError(device, self._down_reason)

    def _new_client(self) -> Any:
        s = self.settings
        # retries=0: a timeout costs exactly one timeout; reconnect_delay=0: we reconnect.
        # pymodbus' timeout is a backstop only: `read` and `_connected` time out first.
        if s.transport == "rtu":
            client: Any = AsyncModbusSerialClient(
                str(s.serial_port), baudrate=s.baudrate, parity=s.parity, stopbits=s.stopbits,
                bytesize=s.bytesize, timeout=s.timeout * 4, retries=0, reconnect_delay=0,
            )  # fmt: skip
        else:
            client = AsyncModbusTcpClient(
                str(s.host), port=s.port, timeout=s.timeout * 4, retries=0, reconnect_delay=0
            )
        client.set_max_no_responses(1_000_000)  # never let pymodbus drop a shared connection
        return client

    def _drop(self, reason: str) -> None:
        log.info("Modbus connection dropped link=%s reason=%s", self.settings.where, reason)
        self._close()

    def _close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def close(self) -> None:
        self._close()


async def _read_coils(client: Any, address: int, **kw: Any) -> Any:
    return await client.read_coils(address, **kw)


async def _read_discrete(client: Any, address: int, **kw: Any) -> Any:
    return await client.read_discrete_inputs(address, **kw)


async def _read_holding(client: Any, address: int, **kw: Any) -> Any:
    return await client.read_holding_registers(address, **kw)


async def _read_input(client: Any, address: int, **kw: Any) -> Any:
    return await client.read_input_registers(address, **kw)


_READERS = {
    "coil": _read_coils,
    "discrete": _read_discrete,
    "holding": _read_holding,
    "input": _read_input,
}
"""Function codes 1-4. There is deliberately no write here."""


class LinkPool:
    """The open links of one agent (or probe), by `link_key`: one per TCP connection or line.

    Sources on the same connection or serial line get the same link, so their requests are
    serialised by its lock; the last source to release a link closes it, and the next to
    acquire it opens a new one. The owner (the agent, the probe) creates the pool and hands it
    to every Modbus source it builds; sources in different pools never share a link.
    """

    def __init__(self) -> None:
        self._links: dict[tuple[str, str], ModbusLink] = {}

    def acquire(self, config: ModbusSourceConfig) -> ModbusLink:
        """The link for this source's connection or line, shared with other sources on it."""
        link = self._links.get(config.link_key)
        if link is None:
            link = self._links[config.link_key] = ModbusLink(LinkSettings.of(config))
            quiet_unless_configured("pymodbus")  # we log each change of state; it, each poll
        link.users += 1
        return link

    def release(self, config: ModbusSourceConfig, link: ModbusLink) -> None:
        """Give the link back; the last user closes it."""
        link.users -= 1
        if link.users <= 0:
            link.close()
            if self._links.get(config.link_key) is link:
                del self._links[config.link_key]
