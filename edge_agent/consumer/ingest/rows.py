"""A verified batch's readings as rows of `COPY readings FROM STDIN` (PostgreSQL text format).

The rows are made in one pass that also applies the value rules of docs/contract.md §4.4: a
reading that breaks them (a NaN or infinite number, an integer beyond 64 bits, a value of no
reading type, a quality not in §4, text holding NUL, which PostgreSQL text cannot store) makes
the whole batch refused (`NonconformingError`), never stored as data.
"""

from __future__ import annotations

import math
import time
from typing import Any

from edge_agent.errors import EnvelopeError
from edge_agent.reading import INT_MAX, INT_MIN, Quality, RejectedValue

COLUMNS = (
    "gateway",
    "epoch",
    "seq",
    "src",
    "pt",
    "ts",
    "ts_ns",
    "v_num",
    "v_bool",
    "v_text",
    "q",
    "sc",
)
"""The columns of each row made here, in order."""
COPY_SQL = f"COPY readings (stream, {', '.join(COLUMNS)}) FROM STDIN"
"""Each line is the stream number (known once the ledger row is locked), a tab, and a row."""
QUALITIES = frozenset(q.value for q in Quality)
INT8 = 2**63
NULL = "\\N"


class NonconformingError(EnvelopeError):
    """A signed batch whose readings break the value rules of §4.4; says which and why."""


_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def text_field(value: str) -> str:
    """`value` escaped for COPY's text format; ValueError for NUL, which no text may hold."""
    if "\0" in value:
        raise ValueError("text holds NUL, which PostgreSQL text cannot store")
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_ESCAPES)
    return value


def ts_field(ns: int) -> str:
    """Unix ns as a timestamptz literal in UTC, to the microsecond (truncated)."""
    seconds, rest = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + f".{rest // 1000:06d}+00"


class RowMaker:
    """Makes COPY rows; caches the escaped names and formatted times it has seen."""

    def __init__(self) -> None:
        self._names: dict[tuple[str, str], str] = {}
        self._times: dict[int, str] = {}

    def rows(self, gateway: str, epoch: str, readings: list[dict[str, Any]]) -> list[str]:
        """One line (with its newline) per reading, in order. Raises NonconformingError."""
        try:
            head = f"{text_field(gateway)}\t{text_field(epoch)}\t"
        except ValueError as exc:
            raise NonconformingError(f"gateway or epoch: {exc}") from None
        if len(self._names) > 100_000:
            self._names.clear()
        if len(self._times) > 10_000:
            self._times.clear()
        line = self._line
        try:
            return [line(head, reading) for reading in readings]
        except (RejectedValue, ValueError, KeyError, TypeError, OverflowError, OSError) as exc:
            seqs = [r.get("seq") for r in readings if isinstance(r, dict)]
            where = f"readings seq {seqs[0]}..{seqs[-1]}" if seqs else "readings"
            raise NonconformingError(f"{where}: {type(exc).__name__}: {exc}") from None

    def _line(self, head: str, reading: dict[str, Any]) -> str:
        seq, src, pt, ts = reading["seq"], reading["src"], reading["pt"], reading["ts"]
        value, q, sc = reading["v"], reading["q"], reading.get("sc")
        name = self._names.get((src, pt))
        if name is None:
            if not isinstance(src, str) or not isinstance(pt, str):
                raise ValueError(f"seq {seq}: src and pt must be text")
            name = self._names[(src, pt)] = f"{text_field(src)}\t{text_field(pt)}\t"
        when = self._times.get(ts)
        if when is None:
            if type(ts) is not int or not 0 <= ts < INT8:
                raise ValueError(f"seq {seq}: ts {ts!r} is not Unix ns")
            when = self._times[ts] = f"{ts_field(ts)}\t{ts}\t"
        kind = type(value)
        if kind is float:
            if not math.isfinite(value):
                raise RejectedValue(f"seq {seq}: {value!r} is not a finite number")
            v = f"{value!r}\t{NULL}\t{NULL}"
        elif kind is int:
            if not INT_MIN <= value <= INT_MAX:
                raise RejectedValue(f"seq {seq}: integer {value} is outside -2**63..2**64-1")
            v = f"{value}\t{NULL}\t{NULL}"
        elif kind is bool:
            v = f"{NULL}\t{'t' if value else 'f'}\t{NULL}"
        elif kind is str:
            v = f"{NULL}\t{NULL}\t{text_field(value)}"
        elif value is None:
            v = f"{NULL}\t{NULL}\t{NULL}"
        else:
            raise RejectedValue(f"seq {seq}: a {kind.__name__} is not a reading value")
        if q not in QUALITIES:
            raise ValueError(f"seq {seq}: quality {q!r} is not one of {sorted(QUALITIES)}")
        if sc is None:
            code = NULL
        elif type(sc) is int and -INT8 <= sc < INT8:
            code = str(sc)
        else:
            raise ValueError(f"seq {seq}: status code {sc!r} is not a 64-bit integer")
        return f"{head}{seq}\t{name}{when}{v}\t{q}\t{code}\n"
