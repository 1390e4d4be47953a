"""The agent's Modbus frames against independent references: an answer is data only if it is
the exact answer to its request; noise, bad CRCs and impossible headers are never data."""

from __future__ import annotations

import re

import pytest
from pymodbus.framer import FramerRTU

from edge_agent.sources.modbus.frames import (
    ExceptionAnswer,
    MismatchedAnswerError,
    TcpFramingError,
    check_answer,
    crc16,
    find_rtu_answer,
    next_tcp_frame,
    read_pdu,
    rtu_frame,
    tcp_frame,
)

pytestmark = pytest.mark.unit


def pymodbus_rtu(body: bytes) -> bytes:
    """An RTU frame with pymodbus' CRC: the reference the agent's framer is checked against."""
    return body + FramerRTU.compute_CRC(body).to_bytes(2, "big")


@pytest.mark.parametrize("body", [b"\x01\x03\x00\x00\x00\x0a", b"\x11\x01\x02\xcd\x01"])
def test_crc_is_pymodbus_crc(body: bytes) -> None:
    assert rtu_frame(body[0], body[1:]) == pymodbus_rtu(body)
    assert crc16(body) == int.from_bytes(pymodbus_rtu(body)[-2:], "little")


def test_requests_are_the_spec_examples() -> None:
    # Modbus over Serial Line V1.02 and Application Protocol V1.1b3 §6.3: read holding 107..109
    assert read_pdu(3, 0x006B, 3) == bytes.fromhex("03006b0003")
    assert rtu_frame(0x11, read_pdu(3, 0x006B, 3)) == pymodbus_rtu(bytes.fromhex("1103006b0003"))
    assert tcp_frame(7, 1, read_pdu(4, 0, 2)) == bytes.fromhex("000700000006010400000002")
    with pytest.raises(ValueError, match="not a read"):
        read_pdu(6, 0, 1)  # a write: the agent has no way to build one


ANSWER_3 = bytes.fromhex("0306022b00000064")  # spec §6.3: 3 registers 0x022B, 0, 0x64


def test_the_exact_answer_is_data() -> None:
    assert check_answer(ANSWER_3, 3, 3) == [0x022B, 0, 0x64]
    # spec §6.1: coils 20..38 (19 bits) answer CD 6B 05
    bits = check_answer(bytes.fromhex("0103cd6b05"), 1, 19)
    assert bits[:8] == [True, False, True, True, False, False, True, True]
    assert len(bits) == 19


@pytest.mark.parametrize(
    ("pdu", "function", "count", "reason", "says"),
    [
        (ANSWER_3, 4, 3, "malformed", "function 3 answer of 6 bytes to a request with function 4"),
        (ANSWER_3, 3, 2, "malformed", "3 registers in the answer to a read of 2"),
        (ANSWER_3, 3, 4, "short", "short response (3 of 4)"),
        (bytes.fromhex("030400"), 3, 2, "malformed", "byte count 4 but 1 data bytes"),
        (bytes.fromhex("0303000102"), 3, 1, "malformed", "odd byte count 3 for registers"),
        (bytes.fromhex("0101ff"), 1, 9, "short", "short response (8 of 9 bits)"),
        (bytes.fromhex("0102ffff"), 1, 8, "malformed", "2 bytes for 8 bits (1 expected)"),
        (bytes.fromhex("8302"), 4, 1, "malformed", "exception answer to function 3"),
        (bytes.fromhex("830201"), 3, 1, "malformed", "exception answer of 3 bytes"),
        (b"", 3, 1, "malformed", "empty answer"),
    ],
)
def test_an_answer_that_is_not_the_answer_is_an_error(
    pdu: bytes, function: int, count: int, reason: str, says: str
) -> None:
    with pytest.raises(MismatchedAnswerError, match=re.escape(says)) as caught:
        check_answer(pdu, function, count)
    assert caught.value.reason == reason


def test_an_exception_answer_carries_its_code() -> None:
    with pytest.raises(ExceptionAnswer) as caught:
        check_answer(bytes.fromhex("8302"), 3, 1)
    assert caught.value.code == 2


FRAME = pymodbus_rtu(bytes.fromhex("01030442f6e979"))


@pytest.mark.parametrize(
    ("data", "span"),
    [
        (FRAME, (0, 9)),
        (b"\x00" + FRAME, (1, 10)),  # issue 8 case 8: a stray byte first
        (b"\xff\x01\x03" + FRAME + b"\x01\x03\x04", (3, 12)),  # noise around it
        (FRAME[:-1] + bytes([FRAME[-1] ^ 1]), None),  # bad CRC: never a frame
        (FRAME[:-1], None),  # incomplete: wait for more
        (FRAME[:-1] + bytes([FRAME[-1] ^ 1]) + FRAME, (9, 18)),  # resynchronised after a bad one
        (pymodbus_rtu(bytes.fromhex("018302")), (0, 5)),  # an exception answer
    ],
)
def test_the_rtu_framer_finds_only_frames_with_a_valid_crc(
    data: bytes, span: tuple[int, int] | None
) -> None:
    assert find_rtu_answer(data) == span


def test_tcp_frames_and_impossible_headers() -> None:
    answer = bytes.fromhex("00050000000701030442f6e979")
    assert next_tcp_frame(answer + b"\x00\x06") == (5, 1, bytes.fromhex("030442f6e979"), 13)
    assert next_tcp_frame(answer[:-1]) is None
    with pytest.raises(TcpFramingError, match="protocol id 1"):
        next_tcp_frame(bytes.fromhex("0005000100070103") + b"\x00" * 5)
    with pytest.raises(TcpFramingError, match="MBAP length 600"):
        next_tcp_frame(bytes.fromhex("0005000002580103"))
