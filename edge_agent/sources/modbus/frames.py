"""Modbus frames for the four read functions: build requests, find answers, check them. No I/O.

Sources of the rules: the Modbus Application Protocol Specification V1.1b3 (the PDUs of function
codes 1-4 and exception responses, §6.1-6.4 and §7), Modbus over Serial Line V1.02 §2.5.1 (the
RTU frame: unit, PDU, CRC-16 low byte first) and Modbus Messaging on TCP/IP V1.0b §3.1.3 (the
MBAP header: transaction id, protocol id 0, length, unit).

An answer is data only when it is the exact answer to the request: the same function code and a
byte count of exactly what was asked (2 per register, one per 8 bits). Anything else is an error
that names what was wrong; `answer_data` is the one place that decides.
"""

from __future__ import annotations

import struct

from edge_agent.errors import EdgeAgentError

READ_FUNCTIONS = frozenset({1, 2, 3, 4})
"""Read coils, read discrete inputs, read holding registers, read input registers."""
RTU_MAX_FRAME = 256
"""Unit (1) + PDU (at most 253) + CRC (2), rounded up (Serial Line §2.5.1.1)."""
TCP_MAX_LENGTH = 254
"""Largest MBAP length field: unit (1) + PDU (253)."""


def _crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc16(data: bytes | bytearray | memoryview) -> int:
    """CRC-16/MODBUS of `data` (polynomial 0xA001 reflected, initial 0xFFFF).

    On the wire the CRC follows the frame low byte first: `crc16(f).to_bytes(2, "little")`.
    """
    crc = 0xFFFF
    table = _CRC_TABLE
    for byte in data:
        crc = (crc >> 8) ^ table[(crc ^ byte) & 0xFF]
    return crc


def read_pdu(function: int, address: int, count: int) -> bytes:
    """The request PDU of a read (function codes 1-4 only: the agent never writes)."""
    if function not in READ_FUNCTIONS:
        raise ValueError(f"function code {function} is not a read")
    return struct.pack(">BHH", function, address, count)


def rtu_frame(unit: int, pdu: bytes) -> bytes:
    """An RTU frame: unit, PDU, CRC."""
    body = bytes((unit,)) + pdu
    return body + crc16(body).to_bytes(2, "little")


def tcp_frame(tid: int, unit: int, pdu: bytes) -> bytes:
    """A Modbus TCP ADU: MBAP header (transaction id, protocol 0, length, unit) and PDU."""
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1, unit) + pdu


def expected_byte_count(function: int, count: int) -> int:
    """The byte count a complete answer to a read of `count` registers or bits carries."""
    return (count + 7) // 8 if function in (1, 2) else 2 * count


def _rtu_length(buf: bytes | bytearray, at: int) -> int:
    """Length of the answer frame that would start at `at`, or 0 when no answer starts there."""
    function = buf[at + 1]
    if function in READ_FUNCTIONS:
        return 5 + buf[at + 2]  # unit, function, byte count, data, CRC
    if function & 0x80 and function & 0x7F in READ_FUNCTIONS:
        return 5  # unit, function | 0x80, exception code, CRC
    return 0


def find_rtu_answer(buf: bytes | bytearray, start: int = 0) -> tuple[int, int] | None:
    """(start, end) of the first complete read answer with a valid CRC at or after `start`.

    This is the resynchronising framer: every offset is tried, so leading noise, a frame with a
    bad CRC or garbage between frames is skipped, never read as data. None means no complete
    answer yet (more bytes may complete one). Only answers to reads (1-4, and their exception
    responses) are recognised: those are the only answers the agent can be waiting for.
    """
    end_of_data = len(buf)
    for at in range(start, end_of_data - 4):
        length = _rtu_length(buf, at)
        if not length or at + length > end_of_data:
            continue
        crc = buf[at + length - 2] | buf[at + length - 1] << 8
        if crc16(memoryview(buf)[at : at + length - 2]) == crc:
            return at, at + length
    return None


class FrameError(EdgeAgentError):
    """Bytes from a device that are not the answer to the request in flight (never data)."""


class TcpFramingError(FrameError, ValueError):
    """The bytes on a Modbus TCP connection are not an MBAP frame: the stream is lost."""


def next_tcp_frame(buf: bytes | bytearray) -> tuple[int, int, bytes, int] | None:
    """The first frame in `buf` as (transaction id, unit, PDU, bytes used); None if incomplete.

    Raises TcpFramingError when the header is impossible (protocol id not 0, a length that no
    Modbus PDU has): TCP has no resynchronisation point, so the caller drops the connection.
    """
    if len(buf) < 7:
        return None
    tid, protocol, length = struct.unpack_from(">HHH", buf)
    if protocol != 0:
        raise TcpFramingError(f"protocol id {protocol} in the MBAP header (Modbus is 0)")
    if not 3 <= length <= TCP_MAX_LENGTH:
        raise TcpFramingError(f"MBAP length {length} (a Modbus answer is 3..{TCP_MAX_LENGTH})")
    if len(buf) < 6 + length:
        return None
    return tid, buf[6], bytes(buf[7 : 6 + length]), 6 + length


class MismatchedAnswerError(FrameError, ValueError):
    """A well-framed answer that is not the answer to the request; `reason` is the counter."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class ExceptionAnswer(FrameError):  # noqa: N818 - it is an answer, not an error of ours
    """The device answered the request with a Modbus exception response (`code` 1-255)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def describe_pdu(pdu: bytes) -> str:
    """A short description of an answer PDU, for log lines: function and byte count."""
    if not pdu:
        return "an empty answer"
    if pdu[0] & 0x80:
        return f"exception answer to function {pdu[0] & 0x7F}"
    if len(pdu) >= 2:
        return f"function {pdu[0]} answer of {pdu[1]} bytes"
    return f"function {pdu[0]} answer"


def check_answer(pdu: bytes, function: int, count: int) -> list[int] | list[bool]:
    """The registers or bits of `pdu` if it is exactly the answer to a read of `count`.

    Raises as `answer_data` does.
    """
    data = answer_data(pdu, function, count)
    if function in (1, 2):
        return [bool(data[i >> 3] >> (i & 7) & 1) for i in range(count)]
    return list(struct.unpack(f">{count}H", data))


def answer_data(pdu: bytes, function: int, count: int) -> bytes:
    """The data bytes of `pdu` if it is exactly the answer to a read of `count`.

    Registers are 2 bytes each, big-endian as on the wire; bits are packed 8 to a byte, the
    lowest address in the lowest bit. Raises ExceptionAnswer for an exception response to this
    function, MismatchedAnswerError with reason "short" when the answer carries fewer values
    than asked, and with reason "malformed" for any other difference: another function code,
    more bytes than asked, a byte count that does not match the bytes that came, an odd
    register byte count.
    """
    if not pdu:
        raise _malformed("empty answer")
    got = pdu[0]
    if got == function | 0x80:
        if len(pdu) != 2:
            raise _malformed(f"exception answer of {len(pdu)} bytes (2 expected)")
        raise ExceptionAnswer(pdu[1])
    if got != function:
        raise _malformed(f"{describe_pdu(pdu)} to a request with function {function}")
    if len(pdu) < 2 or len(pdu) != 2 + pdu[1]:
        said = pdu[1] if len(pdu) > 1 else "none"
        raise _malformed(f"byte count {said} but {max(len(pdu) - 2, 0)} data bytes")
    data, wanted = pdu[2:], expected_byte_count(function, count)
    if function in (1, 2):
        if len(data) < wanted:
            raise _short(f"short response ({len(data) * 8} of {count} bits)")
        if len(data) > wanted:
            raise _malformed(f"{len(data)} bytes for {count} bits ({wanted} expected)")
        return data
    if len(data) % 2:
        raise _malformed(f"odd byte count {len(data)} for registers")
    if len(data) < wanted:
        raise _short(f"short response ({len(data) // 2} of {count})")
    if len(data) > wanted:
        raise _malformed(f"{len(data) // 2} registers in the answer to a read of {count}")
    return data


def _malformed(message: str) -> MismatchedAnswerError:
    return MismatchedAnswerError("malformed", message)


def _short(message: str) -> MismatchedAnswerError:
    return MismatchedAnswerError("short", message)
