"""What the demo shows: one `Snapshot` of the pipeline, drawn as a screen or as a status line.

The drawing is pure (a snapshot in, text out), so it is tested without a terminal. The screen is
plain ANSI: home the cursor and overwrite, which any terminal a gateway is reached with (a serial
console, tmux, an SSH session) understands; no curses or rich needed for a dozen lines.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import termios
import tty
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

from edge_agent.reading import Value

_STYLES = {"b": "1", "d": "2", "g": "32", "r": "31", "y": "33", "c": "36"}
_SPARK = " ▁▂▃▄▅▆▇█"

Segment = tuple[str, str]
"""Text and a style key from `_STYLES` ("" for plain): lines are cut to width before painting."""


@dataclass
class SourceRow:
    name: str
    kind: str
    up: bool = False
    last_error: str | None = None
    polled: int = 0
    verified: int = 0
    latest: dict[str, Value] = field(default_factory=dict)


@dataclass
class Snapshot:
    """Everything one frame shows; the demo fills it from /status and the verifier."""

    gateway: str
    elapsed_s: float
    broker: str
    broker_url: str
    mqtt_protocol: str
    health_url: str
    sources: list[SourceRow]
    mqtt_connected: bool | None = None
    mqtt_error: str | None = None
    buffer_readings: int = 0
    buffer_bytes: int = 0
    buffer_oldest_s: float = 0.0
    buffer_history: list[int] = field(default_factory=list)
    batches_verified: int = 0
    readings_verified: int = 0
    duplicates: int = 0
    rejected: int = 0
    last_rejection: str | None = None
    max_seq: int = 0
    missing: int = 0
    catalogues: int = 0
    """Point catalogues the verifier holds (§4.12)."""
    waiting: int = 0
    """Batches the verifier holds until their catalogue arrives (not verified yet)."""
    throughput: float = 0.0
    outage_left_s: float | None = None
    events: list[str] = field(default_factory=list)
    interactive: bool = False
    stopping: bool = False


def render(snap: Snapshot, width: int = 100, *, color: bool = True) -> list[str]:
    """The full screen, one string per line, each at most `width` visible characters."""
    lines: list[list[Segment]] = []
    add = lines.append
    mins, secs = divmod(int(snap.elapsed_s), 60)
    add(
        [
            ("edge-agent demo", "b"),
            (f"  ·  gateway {snap.gateway}  ·  running {mins:02d}:{secs:02d}", ""),
        ]
        + ([("  ·  stopping…", "y")] if snap.stopping else [])
    )
    add([("health   ", ""), (snap.health_url, "c")])
    add([(f"         edge-agent status --url {snap.health_url}   ·   curl {snap.health_url}"
          "/metrics", "d")])  # fmt: skip
    add([])
    name_width = max([len("SOURCES"), *(len(s.name) + len(s.kind) + 5 for s in snap.sources)])
    add([("SOURCES".ljust(name_width), "b"), (" state    polled  verified  latest values", "d")])
    for row in snap.sources:
        label = f"  {row.name} ({row.kind})".ljust(name_width)
        state = ("UP  ", "g") if row.up else ("DOWN", "r")
        values = "  ".join(f"{k}={_value(v)}" for k, v in row.latest.items())
        add(
            [
                (label, ""),
                (" ", ""),
                state,
                (f"  {row.polled:>7}  {row.verified:>8}  ", ""),
                (values, "c"),
            ]
        )
        if not row.up and row.last_error:
            add([("      " + row.last_error, "r")])
    add([])
    add(
        [
            ("AGENT → BROKER", "b"),
            (f"  {snap.broker} {snap.broker_url} (MQTT {snap.mqtt_protocol})", "d"),
        ]
    )
    if snap.outage_left_s is not None:
        add(
            [
                ("  broker   ", ""),
                (f"STOPPED for the outage demo, back in {snap.outage_left_s:.0f}s", "y"),
            ]
        )
    if snap.mqtt_connected is None:
        add([("  mqtt     ", ""), ("unknown (health endpoint not answering)", "y")])
    elif snap.mqtt_connected:
        add([("  mqtt     ", ""), ("connected", "g")])
    else:
        add(
            [
                ("  mqtt     ", ""),
                ("disconnected", "r"),
                (f"  {snap.mqtt_error}" if snap.mqtt_error else "", "d"),
            ]
        )
    add(
        [
            ("  buffer   ", ""),
            (
                f"{snap.buffer_readings} readings · {_size(snap.buffer_bytes)} · oldest "
                f"{snap.buffer_oldest_s:.1f}s   ",
                "y" if snap.buffer_readings > 1000 else "",
            ),
            (sparkline(snap.buffer_history, 30), "y"),
        ]
    )
    add([])
    add([("VERIFIER", "b"), ("  the reference consumer, subscribed to the same broker", "d")])
    add(
        [
            (
                f"  {snap.batches_verified} batches verified · {snap.readings_verified} readings · "
                f"{snap.duplicates} duplicates dropped · ",
                "",
            ),
            (f"{snap.rejected} rejected", "r" if snap.rejected else ""),
        ]
    )
    if snap.missing:
        completeness: Segment = (
            f"{snap.missing} readings missing (holes up to seq {snap.max_seq})",
            "r",
        )
    elif snap.max_seq:
        completeness = (f"complete: seq 1..{snap.max_seq}, no holes", "g")
    else:
        completeness = ("waiting for the first batch", "y")
    add([("  ", ""), completeness, (f"   ·   {snap.throughput:.0f} readings/s", "")])
    if snap.catalogues or snap.waiting:
        catalogues = f"  {snap.catalogues} point catalogues received"
        waiting = f" · {snap.waiting} batches wait for theirs" if snap.waiting else ""
        add([(catalogues, "d"), (waiting, "y")])
    if snap.last_rejection:
        add([("  last rejection: " + snap.last_rejection, "r")])
    add([])
    add([("EVENTS", "b")])
    lines.extend([("  " + event, "d")] for event in snap.events[-6:])
    add([])
    if snap.interactive:
        add(
            [
                ("keys: ", "d"),
                ("o", "b"),
                (" stop the broker for 10 s  ·  ", "d"),
                ("q", "b"),
                (" or ", "d"),
                ("Ctrl-C", "b"),
                (" quit", "d"),
            ]
        )
    return [_paint(segments, width, color=color) for segments in lines]


def status_line(snap: Snapshot) -> str:
    """One line for `--no-tui` and logs: the same facts, none of the layout."""
    sources = " ".join(f"{s.name}={'up' if s.up else 'down'}/{s.verified}" for s in snap.sources)
    mqtt = {None: "?", True: "up", False: "down"}[snap.mqtt_connected]
    outage = f" outage={snap.outage_left_s:.0f}s" if snap.outage_left_s is not None else ""
    return (
        f"[{snap.elapsed_s:6.1f}s] sources {sources} | mqtt={mqtt}{outage} "
        f"buffer={snap.buffer_readings}r/{_size(snap.buffer_bytes)}/{snap.buffer_oldest_s:.1f}s | "
        f"verified={snap.readings_verified} batches={snap.batches_verified} "
        f"dup={snap.duplicates} rejected={snap.rejected} missing={snap.missing} "
        f"catalogues={snap.catalogues}{f' waiting={snap.waiting}' if snap.waiting else ''} "
        f"rate={snap.throughput:.0f}/s"
    )


def sparkline(values: list[int], width: int) -> str:
    """Buffer depth over the last `width` frames, scaled to its own peak (the shape matters)."""
    recent = values[-width:]
    peak = max(recent, default=0)
    if peak <= 0:
        return _SPARK[1] * len(recent)
    top = len(_SPARK) - 1
    return "".join(_SPARK[max(1, math.ceil(v / peak * top))] for v in recent)


def _value(value: Value) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop always returns


def _paint(segments: list[Segment], width: int, *, color: bool) -> str:
    out: list[str] = []
    room = width
    for text, style in segments:
        piece = text[:room]
        room -= len(piece)
        if piece:
            out.append(f"\x1b[{_STYLES[style]}m{piece}\x1b[0m" if color and style else piece)
        if room <= 0:
            break
    return "".join(out)


class Screen:
    """The terminal while the view runs: alternate screen, hidden cursor, keys without Enter.

    Everything it changes is put back in `close`, also after an exception, so a crash never
    leaves the user's shell without a cursor or echo.
    """

    def __init__(self, stream: TextIO, keys: TextIO | None) -> None:
        self._out = stream
        self._keys = keys
        self._saved: list[Any] | None = None

    def open(self, on_key: Callable[[str], None]) -> None:
        self._out.write("\x1b[?1049h\x1b[?25l")
        self._out.flush()
        if self._keys is not None and self._keys.isatty():
            fd = self._keys.fileno()
            self._saved = termios.tcgetattr(fd)
            tty.setcbreak(fd)
            asyncio.get_running_loop().add_reader(
                fd, lambda: on_key(os.read(fd, 16).decode(errors="replace"))
            )

    def draw(self, lines: list[str]) -> None:
        """Overwrite in place (no clear), so the frame does not flicker."""
        height = shutil.get_terminal_size().lines
        body = "".join(f"{line}\x1b[K\r\n" for line in lines[: max(1, height - 1)])
        self._out.write(f"\x1b[H{body}\x1b[J")
        self._out.flush()

    def close(self) -> None:
        if self._keys is not None and self._saved is not None:
            fd = self._keys.fileno()
            asyncio.get_running_loop().remove_reader(fd)
            termios.tcsetattr(fd, termios.TCSADRAIN, self._saved)
            self._saved = None
        self._out.write("\x1b[?25h\x1b[?1049l")
        self._out.flush()
