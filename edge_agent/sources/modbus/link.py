"""One Modbus connection or serial line, shared by every source that polls through it.

A link owns one TCP connection or one open serial port and a lock: requests go out strictly one
at a time, which an RS-485 line requires and a TCP device that accepts a single connection (or a
TCP-to-RTU gateway) expects. On a serial line the link keeps the inter-frame silence (3.5
character times, at least 1.75 ms above 19200 baud) after every answer or timeout.

The request/response layer is our own (frames.py), over asyncio and pyserial. pymodbus 3.16
hands a late RTU answer to whichever request is waiting and checks neither its function code nor
its byte count (its maintainers: "can only be avoided with a sufficiently large timeout",
pymodbus PR #2636); its RTU framer drops the whole buffer at the first bad CRC, so one stray byte
before an answer costs the request; and it takes about twice the CPU per request
(bench/modbus_requests.py: about 200 us against 110 us for 60 registers over TCP).

An answer is data only if it is the answer to the request in flight (frames.answer_data): same
unit, same function code, exactly the byte count asked for, and on TCP the transaction id of the
request. Everything else is thrown away or is an error, never data:
- bytes waiting before a request is sent answer nothing that is asked: they are discarded and
  reported (a late answer, or line noise);
- RTU: the framer tries every offset for a frame with a valid CRC, so noise before, between or
  after frames is skipped and counted (`framing`); an answer from another unit on the line is
  discarded as `late`; bytes with no frame in them by the timeout are a framing error;
- RTU has no transaction id, so an answer later than the timeout cannot be told from the answer
  to the next request of the same shape. After a failed exchange (timeout, framing error, an
  answer that does not match) the unit is not asked again for one more timeout (`settle`), and
  what arrives meanwhile is discarded. Other units on the line go on meanwhile;
- TCP: an answer with another transaction id is an earlier request's, discarded as `late`; a
  byte stream that is no MBAP frame drops the connection (TCP has no resynchronisation point).

Failure policy, so that one dead unit never costs the others more than its own timeout:
- a timeout is the unit's fault, not the line's; a TCP connection is dropped only after
  `DROP_AFTER_TIMEOUTS` timeouts in a row with no answer from any unit in between (a dead
  peer), never because one unit behind a gateway is silent (Neuron #1602);
- a failed connect or open is retried after `schedule.Backoff` (capped exponential, with
  jitter, reset by a successful connect), and reports
  why it failed: for a serial port, which setting the port refused, a path that does not exist
  or is not a serial port, a port another program holds. The port is closed on every failure.

The link only has read requests: the agent never writes to a device (docs/contract.md §5).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import struct
import termios
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import serial

from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.errors import DeviceError, EdgeAgentError
from edge_agent.schedule import Backoff
from edge_agent.sources.modbus.frames import (
    ExceptionAnswer,
    FrameError,
    MismatchedAnswerError,
    TcpFramingError,
    answer_data,
    describe_pdu,
    find_rtu_answer,
    next_tcp_frame,
    read_pdu,
    rtu_frame,
    tcp_frame,
)
from edge_agent.sources.modbus.plan import ReadRequest

log = logging.getLogger(__name__)

DROP_AFTER_TIMEOUTS = 3
MAX_BUFFER = 4096
"""Bytes kept unread at most; older ones are noise (a Modbus frame is at most 260 bytes)."""

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
    """A read failed; `reason` is the counter it goes to (timeout, exception, short, ...).

    `desync` is set when the line may still carry an answer to this request (an RTU answer that
    did not match): the source asks the unit nothing more in this poll.
    """

    reason = "error"

    def __init__(self, device: str, message: str, *, desync: bool = False) -> None:
        super().__init__(device, message)
        self.desync = desync


class ReadTimeoutError(ReadError):
    """No answer to the request within the timeout."""

    reason = "timeout"


class ShortResponseError(ReadError):
    """An answer to the request that carries fewer registers or bits than asked."""

    reason = "short"


class MalformedError(ReadError):
    """A well-framed answer that is not the answer to the request (unit, function, byte count)."""

    reason = "malformed"


class FramingError(ReadError):
    """Bytes came but no frame: a bad CRC, noise, or (TCP) a stream that is no MBAP frame."""

    reason = "framing"


class LinkDownError(ReadError):
    """The connection or port is not open (with the reason) or was lost during the read."""

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


class ChannelLostError(EdgeAgentError):
    """The connection or port closed under a request (internal; becomes LinkDownError)."""


class GarbledAnswerError(FrameError):
    """Bytes with no valid RTU frame by the timeout (internal; becomes FramingError)."""


class _Channel:
    """An open connection or port seen as a byte buffer; no Modbus here."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.lost: str | None = None
        self._wake = asyncio.Event()

    def feed(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > MAX_BUFFER:
            del self.buffer[: len(self.buffer) - MAX_BUFFER]
        self._wake.set()

    def lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = reason
        self._wake.set()

    async def wait(self, deadline: float) -> bool:
        """Wait for more bytes (or the loss of the channel) until the loop time `deadline`.

        False when the deadline passed. Callers look at the buffer before calling: no callback
        can feed bytes between that look and this wait (no await in between).
        """
        if self.lost is not None:
            return True
        self._wake.clear()
        try:
            async with asyncio.timeout_at(deadline):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    def pull(self) -> None:
        """Take in what the operating system holds already (a serial port); TCP delivers itself."""

    async def send(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _TcpChannel(_Channel, asyncio.Protocol):
    def __init__(self) -> None:
        super().__init__()
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self.feed(data)

    def eof_received(self) -> bool | None:
        self.lose("connection closed by the device")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.lose(f"connection lost: {exc}" if exc else "connection closed by the device")

    async def send(self, data: bytes) -> None:
        assert self._transport is not None
        self._transport.write(data)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # nothing worth flushing: a request nobody waits for


class _SerialChannel(_Channel):
    """A pyserial port, read through the event loop (its file descriptor is non-blocking)."""

    def __init__(self, port: Any) -> None:
        super().__init__()
        self._port = port
        self._fd: int = port.fileno()
        self._loop = asyncio.get_running_loop()
        self._reading = True
        self._empty_reads = 0
        self._loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        # Readable with nothing to read, again and again, is a hang-up (pyserial says so too);
        # once can be a `pull` that took the bytes between the poll and this callback.
        self._empty_reads = 0 if self._read_some() else self._empty_reads + 1
        if self._empty_reads >= 3:
            self.lose("the port reports data but gives none (disconnected?)")

    def pull(self) -> None:
        self._read_some()

    def _read_some(self) -> bool:
        """Read what the port holds; False if it held nothing (a raw tty reads 0, not EAGAIN)."""
        got = False
        while self.lost is None:
            try:
                data = os.read(self._fd, 1024)
            except BlockingIOError:
                break
            except OSError as exc:
                self.lose(f"port failed: {exc.strerror or exc}")
                return True
            if not data:
                break
            got = True
            self.feed(data)
        return got

    def lose(self, reason: str) -> None:
        self._stop_reading()
        super().lose(reason)

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                pass
            except OSError as exc:
                self.lose(f"port failed: {exc.strerror or exc}")
                return
            if view:
                ready = self._loop.create_future()
                self._loop.add_writer(self._fd, ready.set_result, None)
                try:
                    await ready
                finally:
                    self._loop.remove_writer(self._fd)

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def close(self) -> None:
        self._stop_reading()
        self._port.close()


class PortError(EdgeAgentError):
    """A serial port cannot be opened; the message says why (`cannot open` follows it)."""


def open_serial(settings: LinkSettings) -> Any:
    """The open pyserial port for the link's line settings (exclusively locked, non-blocking).

    Raises PortError naming the cause: a path that does not exist or is not a serial port, no
    permission, a port another program holds, or the setting the port refused (tcsetattr gives
    EINVAL, e.g. a parity the driver cannot do). Nothing stays open when it raises.
    """
    path = str(settings.serial_port)
    try:
        port = serial.serial_for_url(
            path, do_not_open=True, baudrate=settings.baudrate, bytesize=settings.bytesize,
            parity=settings.parity, stopbits=settings.stopbits, exclusive=True, timeout=0,
        )  # fmt: skip
    except (ValueError, serial.SerialException) as exc:  # a URL pyserial does not know
        raise PortError(str(exc)) from None
    try:
        port.open()
    except (OSError, termios.error, ValueError) as exc:
        port.close()  # pyserial closes on failure already; this keeps it so
        raise PortError(_why_not_open(settings, exc)) from None
    try:
        port.fileno()
    except (AttributeError, OSError, ValueError):  # e.g. pyserial's loop:// and socket://
        port.close()
        raise PortError("it has no file descriptor the agent can wait on") from None
    return port


def _why_not_open(settings: LinkSettings, exc: BaseException) -> str:
    path = str(settings.serial_port)
    if isinstance(exc, termios.error | ValueError):
        detail = exc.args[1] if isinstance(exc, termios.error) and len(exc.args) > 1 else exc
        refused = _refused_setting(settings)
        if refused is None:
            return (
                f"the port refused its settings {settings.baudrate} baud, {settings.bytesize}"
                f"{settings.parity}{settings.stopbits}: {detail}"
            )
        return f"the port refused {refused}: {detail}"
    code = getattr(exc, "errno", None)
    if code == errno.ENOENT or ("://" not in path and not Path(path).exists()):
        return "no such file"
    if code == errno.EACCES:
        return "permission denied"
    if code in (errno.EAGAIN, errno.EWOULDBLOCK) and "lock" in str(exc):
        return "in use: another program holds the port"
    if "://" not in path and not _is_terminal(path):
        return "not a serial port"
    return str(exc)


def _is_terminal(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return True  # cannot tell; the caller reports pyserial's own message
    try:
        return os.isatty(fd)
    finally:
        os.close(fd)


def _refused_setting(settings: LinkSettings) -> str | None:
    """Which line setting the port refuses, applied one at a time on pyserial's defaults."""
    try:
        port = serial.serial_for_url(str(settings.serial_port), exclusive=True, timeout=0)
    except (OSError, termios.error, ValueError):
        return None  # it refuses even 9600 8N1: no single setting to name
    try:
        for name, value in (
            ("baudrate", settings.baudrate),
            ("bytesize", settings.bytesize),
            ("parity", settings.parity),
            ("stopbits", settings.stopbits),
        ):
            try:
                setattr(port, name, value)  # pyserial applies it to the open port at once
            except (OSError, termios.error, ValueError):
                return f"{name} {value}"
        return None
    finally:
        port.close()


class ModbusLink:
    """A shared connection or line: reads serialised by a lock, connects with backoff."""

    def __init__(self, settings: LinkSettings) -> None:
        self.settings = settings
        self.users = 0
        self.connects = 0
        self._rtu = settings.transport == "rtu"
        self._lock = asyncio.Lock()
        self._channel: _Channel | None = None
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._retry_at = 0.0
        self._down_reason = ""
        self._silent_in_a_row = 0
        self._tid = 0
        self._last_unit = 0
        self._settle_until: dict[int, float] = {}
        self._discarded: dict[int, dict[str, tuple[int, str]]] = {}

    async def settle(self, unit: int) -> None:
        """Wait until `unit` may be asked again (RTU: one timeout after a failed exchange)."""
        until = self._settle_until.get(unit)
        if until is None:
            return
        delay = until - asyncio.get_running_loop().time()
        if delay > 0:
            await asyncio.sleep(delay)
        if self._settle_until.get(unit) == until:
            del self._settle_until[unit]

    def take_discarded(self, unit: int) -> dict[str, tuple[int, str]]:
        """What was discarded for `unit` since the last call: kind -> (count, first detail)."""
        return self._discarded.pop(unit, {})

    async def read(
        self, request: ReadRequest, *, unit: int, wait: float, device: str
    ) -> Sequence[int] | Sequence[bool]:
        """Read the request's registers or bits; a ReadError names device, unit and addresses."""
        data = await self.read_data(request, unit=unit, wait=wait, device=device)
        if request.kind in ("coil", "discrete"):
            return [bool(data[i >> 3] >> (i & 7) & 1) for i in range(request.count)]
        return list(struct.unpack(f">{request.count}H", data))

    async def read_data(
        self, request: ReadRequest, *, unit: int, wait: float, device: str
    ) -> bytes:
        """The answer's data bytes (see frames.answer_data), checked against the request.

        Raises ReadError as `read` does; what a source decodes with its read's BlockDecoder.
        """
        what = f"unit {unit} {request.describe()}"
        await self.settle(unit)
        async with self._lock:
            channel = await self._connected(device)
            try:
                values = await self._exchange(channel, request, unit, wait)
            except TimeoutError:
                self._unsettled(unit, wait)
                self._silent_in_a_row += 1
                if self._silent_in_a_row >= DROP_AFTER_TIMEOUTS and not self._rtu:
                    self._drop(f"no answer to {DROP_AFTER_TIMEOUTS} requests in a row")
                raise ReadTimeoutError(device, f"{what}: no answer within {wait:g}s") from None
            except GarbledAnswerError as exc:
                self._unsettled(unit, wait)
                raise FramingError(device, f"{what}: framing error: {exc}", desync=True) from None
            except TcpFramingError as exc:
                self._drop(f"framing error: {exc}")
                raise FramingError(device, f"{what}: framing error: {exc}") from None
            except MismatchedAnswerError as exc:
                self._silent_in_a_row = 0
                self._unsettled(unit, wait)
                if exc.reason == "short":
                    raise ShortResponseError(device, f"{what}: {exc}", desync=self._rtu) from None
                raise MalformedError(
                    device, f"{what}: malformed answer: {exc}", desync=self._rtu
                ) from None
            except ExceptionAnswer as exc:
                self._silent_in_a_row = 0
                name = EXCEPTION_NAMES.get(exc.code, "unknown exception")
                raise ExceptionReplyError(
                    device, f"{what}: exception {exc.code} ({name})", exc.code
                ) from None
            except ChannelLostError as exc:
                self._drop(str(exc))
                raise LinkDownError(device, f"{what}: connection lost: {exc}") from None
            finally:
                if self.settings.silence:
                    await asyncio.sleep(self.settings.silence)
        self._silent_in_a_row = 0
        return values

    async def _exchange(
        self, channel: _Channel, request: ReadRequest, unit: int, wait: float
    ) -> bytes:
        """Send one request and wait for its answer; internal exceptions say what went wrong."""
        self._discard_unasked(channel)
        pdu = read_pdu(request.function_code, request.address, request.count)
        if self._rtu:
            await channel.send(rtu_frame(unit, pdu))
        else:
            self._tid = self._tid % 0xFFFF + 1
            await channel.send(tcp_frame(self._tid, unit, pdu))
        self._last_unit = unit
        deadline = asyncio.get_running_loop().time() + wait
        while True:
            find = self._rtu_answer if self._rtu else self._tcp_answer
            answer = find(channel, unit)
            if answer is not None:
                return answer_data(answer, request.function_code, request.count)
            if channel.lost is not None:
                raise ChannelLostError(channel.lost)
            if not await channel.wait(deadline):
                if channel.buffer:  # RTU only: TCP bytes are a frame or a TcpFramingError
                    log.debug("Modbus garbled answer link=%s unit=%d bytes=%s",
                              self.settings.where, unit, _bytes(channel.buffer))  # fmt: skip
                    channel.buffer.clear()
                    raise GarbledAnswerError("garbled answer, no frame with a valid CRC")
                raise TimeoutError

    def _rtu_answer(self, channel: _Channel, unit: int) -> bytes | None:
        """The PDU of the asked unit's answer once complete; other frames and noise discarded."""
        buf = channel.buffer
        while (span := find_rtu_answer(buf)) is not None:
            start, end = span
            if start:
                self._discard("framing", unit, f"{_bytes(buf[:start])} before an answer")
            answer_unit, pdu = buf[start], bytes(buf[start + 1 : end - 2])
            del buf[:end]
            if answer_unit == unit:
                return pdu
            self._discard(
                "late", answer_unit,
                f"{describe_pdu(pdu)} from unit {answer_unit} while unit {unit} was asked",
            )  # fmt: skip
        return None

    def _tcp_answer(self, channel: _Channel, unit: int) -> bytes | None:
        """The PDU of the answer with this request's transaction id; earlier ones discarded."""
        buf = channel.buffer
        while (frame := next_tcp_frame(buf)) is not None:
            tid, answer_unit, pdu, used = frame
            del buf[:used]
            if tid == self._tid:
                if unit and answer_unit != unit:  # unit 0: many TCP devices answer as theirs
                    raise MismatchedAnswerError(
                        "malformed", f"answer from unit {answer_unit} to a request for unit {unit}"
                    )
                return pdu
            self._discard(
                "late", answer_unit,
                f"{describe_pdu(pdu)} with transaction id {tid} while {self._tid} was awaited",
            )  # fmt: skip
        return None

    def _discard_unasked(self, channel: _Channel) -> None:
        """Throw away what arrived while nothing was asked: late answers, noise."""
        channel.pull()
        buf = channel.buffer
        if not buf:
            return
        if not self._rtu:
            while (frame := next_tcp_frame(buf)) is not None:  # a partial frame stays: its
                tid, answer_unit, pdu, used = frame  # rest is on its way
                del buf[:used]
                self._discard(
                    "late", answer_unit,
                    f"{describe_pdu(pdu)} with transaction id {tid}, after its request timed out",
                )  # fmt: skip
            return
        data = bytes(buf)
        buf.clear()
        at = noise = 0
        while (span := find_rtu_answer(data, at)) is not None:
            start, end = span
            noise += start - at
            answer_unit, pdu = data[start], data[start + 1 : end - 2]
            self._discard(
                "late", answer_unit,
                f"{describe_pdu(pdu)} from unit {answer_unit}, after its request timed out",
            )  # fmt: skip
            at = end
        noise += len(data) - at
        if noise:
            self._discard("framing", self._last_unit, f"{noise} bytes of noise between answers")

    def _discard(self, kind: str, unit: int, detail: str) -> None:
        log.debug("Modbus bytes discarded link=%s unit=%d kind=%s detail=%s",
                  self.settings.where, unit, kind, detail)  # fmt: skip
        per_unit = self._discarded.setdefault(unit, {})
        count, first = per_unit.get(kind, (0, detail))
        per_unit[kind] = (count + 1, first)

    def _unsettled(self, unit: int, wait: float) -> None:
        """RTU: an answer to this request may still come; keep the unit quiet for `wait`."""
        if self._rtu:
            self._settle_until[unit] = asyncio.get_running_loop().time() + wait

    async def _connected(self, device: str) -> _Channel:
        """The open channel, opening it if the backoff allows; else LinkDownError at once."""
        channel = self._channel
        if channel is not None and channel.lost is None:
            return channel
        if channel is not None:
            self._drop(channel.lost or "lost")
        loop = asyncio.get_running_loop()
        if loop.time() < self._retry_at:
            raise LinkDownError(device, self._down_reason)
        try:
            channel = await self._open()
        except PortError as exc:
            self._down_reason = f"cannot open {self.settings.where} ({exc})"
        except TimeoutError:
            self._down_reason = (
                f"cannot connect to {self.settings.where} "
                f"(no answer within {self.settings.timeout:g}s)"
            )
        except socket.gaierror as exc:
            self._down_reason = f"cannot connect to {self.settings.where} ({exc.strerror})"
        except OSError:
            self._down_reason = f"cannot connect to {self.settings.where} (refused or unreachable)"
        else:
            self._channel = channel
            self._backoff.reset()
            self._silent_in_a_row = 0
            self.connects += 1
            return channel
        self._retry_at = loop.time() + self._backoff.next()
        raise LinkDownError(device, self._down_reason)

    async def _open(self) -> _Channel:
        s = self.settings
        if self._rtu:
            return _SerialChannel(open_serial(s))
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(s.timeout):
            _, channel = await loop.create_connection(_TcpChannel, str(s.host), s.port)
        return channel

    def _drop(self, reason: str) -> None:
        log.info("Modbus connection dropped link=%s reason=%s", self.settings.where, reason)
        self._close()

    def _close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def close(self) -> None:
        self._close()


def _bytes(data: bytes | bytearray) -> str:
    """`3 bytes (00 ff 01)`: a count and the first bytes in hex, for log lines and errors."""
    shown = data[:8].hex(" ") + (" ..." if len(data) > 8 else "")
    return f"{len(data)} byte{'s' if len(data) != 1 else ''} ({shown})"


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
        link.users += 1
        return link

    def release(self, config: ModbusSourceConfig, link: ModbusLink) -> None:
        """Give the link back; the last user closes it."""
        link.users -= 1
        if link.users <= 0:
            link.close()
            if self._links.get(config.link_key) is link:
                del self._links[config.link_key]
