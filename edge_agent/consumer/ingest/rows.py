"""A verified batch's readings as rows of `COPY readings FROM STDIN` (PostgreSQL text format).

The rows are made in one pass that also applies the value rules of docs/contract.md §4.4: a
reading that breaks them (a NaN or infinite number, an integer beyond 64 bits, a value of no
reading type, a quality not in §4, text holding NUL, which PostgreSQL text cannot store) makes
the whole batch refused (`NonconformingError`), never stored as data.
"""

from __future__ import annotations

import math
import time
from itertools import compress, count, repeat
from operator import is_
from typing import Any

from edge_agent.errors import EnvelopeError
from edge_agent.reading import INT_MAX, INT_MIN, Quality, RejectedValue
from edge_agent.seal.columnar import Columns

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

    def _start(self, gateway: str, epoch: str) -> str:
        """The lines' common head for one batch; the caches kept bounded between batches.
        Raises NonconformingError for a gateway or epoch that COPY text cannot carry."""
        try:
            head = f"{text_field(gateway)}\t{text_field(epoch)}\t"
        except ValueError as exc:
            raise NonconformingError(f"gateway or epoch: {exc}") from None
        if len(self._names) > 100_000:
            self._names.clear()
        if len(self._times) > 10_000:
            self._times.clear()
        return head

    def rows(self, gateway: str, epoch: str, readings: list[dict[str, Any]]) -> list[str]:
        """One line (with its newline) per reading, in order. Raises NonconformingError."""
        head = self._start(gateway, epoch)
        line = self._line
        try:
            return [line(head, reading) for reading in readings]
        except (RejectedValue, ValueError, KeyError, TypeError, OverflowError, OSError) as exc:
            seqs = [r.get("seq") for r in readings if isinstance(r, dict)]
            where = f"readings seq {seqs[0]}..{seqs[-1]}" if seqs else "readings"
            raise NonconformingError(f"{where}: {type(exc).__name__}: {exc}") from None

    def column_rows(self, gateway: str, epoch: str, columns: Columns) -> list[str]:
        """The lines of `rows` for a format-2 batch's columns, made column by column (no map
        and no Python statement per reading). The same lines and the same value rules as
        `rows`; raises NonconformingError naming the seq of the first reading that breaks one.
        """
        head = self._start(gateway, epoch)
        try:
            names, times, values, tails, ends = self._column_parts(columns)
        except (RejectedValue, ValueError, TypeError) as exc:
            raise NonconformingError(f"{type(exc).__name__}: {exc}") from None
        form = head.replace("{", "{{").replace("}", "}}") + "{}\t"
        seqs = map(form.format, range(columns.first, columns.first + len(columns)))
        return list(map("".join, zip(seqs, names, times, values, tails, ends, strict=True)))

    def _column_parts(self, columns: Columns) -> tuple[list[str], ...]:
        """Per reading: `src\tpt\t`, `ts\tts_ns\t`, the three value columns (two parts, see
        `_value_fields`), and `\tq\tsc\n`, as COPY text; ValueError or RejectedValue names
        the seq of a bad one."""
        first = columns.first
        names = self._names
        pairs = list(zip(columns.src, columns.pt, strict=True))
        for src, pt in set(pairs).difference(names):
            if "\0" in src or "\0" in pt:
                at = first + pairs.index((src, pt))
                raise ValueError(f"seq {at}: src or pt holds NUL, which PostgreSQL cannot store")
            names[(src, pt)] = f"{text_field(src)}\t{text_field(pt)}\t"
        times = self._times
        for ts in set(columns.ts).difference(times):
            if type(ts) is not int or not 0 <= ts < INT8:
                raise ValueError(f"seq {first + columns.ts.index(ts)}: ts {ts!r} is not Unix ns")
            times[ts] = f"{ts_field(ts)}\t{ts}\t"
        return (
            list(map(names.__getitem__, pairs)),
            list(map(times.__getitem__, columns.ts)),
            *_value_fields(columns.values, first),
            _ends(columns.q, columns.sc, first),
        )

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


_TAILS: dict[type, str] = {
    float: f"\t{NULL}\t{NULL}",
    int: f"\t{NULL}\t{NULL}",
    bool: f"\t{NULL}",
    str: "",
    type(None): f"{NULL}\t{NULL}\t{NULL}",
}
"""What follows a value's first text (see `_value_fields`) by its type."""


def _value_fields(values: list[Any], first: int) -> tuple[list[str], list[str]]:
    """`v_num\tv_bool\tv_text` of each value, under §4.4's rules (as `RowMaker._line`), as two
    texts each: the value's own (`repr` of a number; `\\N\tt` of a bool; `\\N\t\\N\t` and
    the escaped text; nothing for a null) and the rest (by type, from `_TAILS`)."""
    kinds = list(map(type, values))
    distinct = set(kinds)
    unknown = distinct.difference(_TAILS)
    if unknown:
        i = next(i for i, kind in enumerate(kinds) if kind in unknown)
        raise RejectedValue(f"seq {first + i}: a {kinds[i].__name__} is not a reading value")
    texts = list(map(repr, values))
    if distinct == {float}:  # the common batch
        _check_floats(values, first, list(range(len(values))))
        return texts, [_TAILS[float]] * len(values)
    for kind in distinct:
        where = list(compress(count(), map(is_, kinds, repeat(kind))))
        chosen = list(map(values.__getitem__, where))
        if kind is float:
            _check_floats(chosen, first, where)
        elif kind is int:
            if min(chosen) < INT_MIN or max(chosen) > INT_MAX:
                at = next(
                    i for i, v in zip(where, chosen, strict=True) if not INT_MIN <= v <= INT_MAX
                )
                raise RejectedValue(
                    f"seq {first + at}: integer {values[at]} is outside -2**63..2**64-1"
                )
        else:
            for i, value in zip(where, chosen, strict=True):
                if kind is bool:
                    texts[i] = f"{NULL}\tt" if value else f"{NULL}\tf"
                elif kind is str:
                    try:
                        texts[i] = f"{NULL}\t{NULL}\t{text_field(value)}"
                    except ValueError as exc:
                        raise ValueError(f"seq {first + i}: {exc}") from None
                else:
                    texts[i] = ""
    return texts, list(map(_TAILS.__getitem__, kinds))


def _check_floats(values: list[float], first: int, where: list[int]) -> None:
    """RejectedValue naming the first NaN or infinity of `values` (at positions `where`)."""
    if all(map(math.isfinite, values)):
        return
    i = next(i for i, v in enumerate(values) if not math.isfinite(v))
    raise RejectedValue(f"seq {first + where[i]}: {values[i]!r} is not a finite number")


def _ends(qualities: list[str], codes: list[int | None], first: int) -> list[str]:
    """`\tq\tsc\n` of each reading: the quality checked to be one of §4's, the status code a
    64-bit integer or none (NULL)."""
    pairs = list(zip(qualities, codes, strict=True))
    texts: dict[tuple[str, int | None], str] = {}
    for q, code in set(pairs):
        if q not in QUALITIES:
            at = first + pairs.index((q, code))
            raise ValueError(f"seq {at}: quality {q!r} is not one of {sorted(QUALITIES)}")
        if code is not None and (type(code) is not int or not -INT8 <= code < INT8):
            at = first + pairs.index((q, code))
            raise ValueError(f"seq {at}: status code {code!r} is not a 64-bit integer")
        texts[(q, code)] = f"\t{q}\t{NULL if code is None else code}\n"
    return list(map(texts.__getitem__, pairs))
