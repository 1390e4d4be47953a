"""Configuration of Modbus sources (TCP and RTU): devices, points, types, orders and read limits.

A point entry with `count` is a block of consecutive points of one type (edge_agent.config.blocks):
validation expands it, so `ModbusSourceConfig.points` always holds the points one by one.

One source is one Modbus device (one unit id). Sources that name the same `serial_port` share one
RS-485 line and are polled strictly one request at a time; sources that name the same TCP
`host:port` share one connection (a gateway in front of several units, or a device that accepts
a single connection). `shared_link_problems` checks that such sources agree on the line settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, field_validator, model_validator

from edge_agent.config.blocks import (
    MAX_BLOCK,
    check_name_or_pattern,
    collapse,
    duplicates,
    expand,
    has_placeholder,
    parse_pattern,
    path_text,
    where,
)
from edge_agent.config.types import (
    Duration,
    Finite,
    Loc,
    Name,
    StrictModel,
)

RegisterKind = Literal["coil", "discrete", "input", "holding"]
PointType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]
Order = Literal["big", "little"]

REGISTERS_PER_TYPE: dict[str, int] = {
    "bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2,
    "int64": 4, "uint64": 4, "float32": 2, "float64": 4,
}  # fmt: skip

MAX_REGISTERS_PER_READ = 125
"""Modbus spec limit for function codes 3 and 4 (a 256-byte PDU)."""
MAX_BITS_PER_READ = 2000
"""Modbus spec limit for function codes 1 and 2."""

PLACEHOLDERS = ("n", "address")
"""What a point name pattern may use: the number in the block and the point's address."""


class ModbusPoint(StrictModel):
    """One point, or with `count` a block of points that differ only in name and address."""

    name: str
    """A name; in a block, a pattern with `{n}` and/or `{address}` (edge_agent.config.blocks)."""
    kind: RegisterKind = Field(alias="register")
    address: int = Field(ge=0, le=65535)
    type: PointType = "uint16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: Finite = 1.0
    offset: Finite = 0.0
    unit: str | None = None
    length: int | None = Field(default=None, ge=1, le=MAX_REGISTERS_PER_READ)
    bit: int | None = Field(default=None, ge=0, le=15)
    deadband: float | None = Field(default=None, ge=0)
    """Report by exception: a value is sent only when it moved more than this (0: any change)."""
    heartbeat: Duration | None = None
    """With a deadband, an unchanged value is still sent at least this often (source default)."""
    count: int | None = Field(default=None, ge=1, le=MAX_BLOCK)
    """A block: this entry stands for `count` points from `address` on."""
    stride: int | None = Field(default=None, ge=1, le=65535)
    """In a block, addresses from one point to the next; the point's width by default."""
    n_from: int | None = Field(default=None, ge=0)
    """In a block, the `{n}` of its first point (1 by default)."""

    @field_validator("name")
    @classmethod
    def _name_or_pattern(cls, value: str) -> str:
        return check_name_or_pattern(value, PLACEHOLDERS)

    @model_validator(mode="after")
    def _type_fits_register(self) -> ModbusPoint:
        if self.kind in ("coil", "discrete") and self.type != "bool":
            raise ValueError(f"a {self.kind} holds one bit: type must be bool, not {self.type}")
        if self.type == "string" and self.length is None:
            raise ValueError("type string needs length (in registers)")
        if self.type != "string" and self.length is not None:
            raise ValueError("length applies only to type string")
        if self.bit is not None and (self.type != "bool" or self.kind in ("coil", "discrete")):
            raise ValueError("bit applies only to type bool in an input or holding register")
        if (self.scale != 1.0 or self.offset != 0.0) and self.type in ("bool", "string"):
            raise ValueError(f"scale and offset apply to numbers, not to type {self.type}")
        return self._block_fits()

    def _block_fits(self) -> ModbusPoint:
        """The block keys agree with each other and with the name (edge_agent.config.blocks)."""
        patterned = has_placeholder(self.name)
        if self.count is None:
            if patterned:
                raise ValueError(
                    "name has a placeholder but there is no count: give count for a block, "
                    "or write the name out"
                )
            if self.stride is not None or self.n_from is not None:
                raise ValueError("stride and n_from apply to a block: give count")
            return self
        if self.count > 1 and not patterned:
            raise ValueError(
                f"a block of {self.count} points needs {{n}} or {{address}} in its name"
            )
        if self.stride is not None and self.stride < self.width:
            what = "bits" if self.is_bit_table else "registers"
            raise ValueError(
                f"stride {self.stride} is less than the {self.width} {what} of one {self.type}: "
                "the points of the block would overlap"
            )
        return self

    @property
    def width(self) -> int:
        """Registers (or bits, for coils and discrete inputs) this point occupies."""
        if self.type == "string":
            assert self.length is not None
            return self.length
        return REGISTERS_PER_TYPE[self.type]

    @property
    def is_bit_table(self) -> bool:
        return self.kind in ("coil", "discrete")


class ModbusSourceConfig(StrictModel):
    type: Literal["modbus"]
    name: Name
    transport: Literal["tcp", "rtu"] = "tcp"
    host: str | None = None
    port: int = Field(default=502, ge=1, le=65535)
    serial_port: str | None = None
    baudrate: int = Field(default=19200, gt=0)
    parity: Literal["N", "E", "O"] = "E"
    stopbits: Literal[1, 2] = 1
    bytesize: Literal[7, 8] = 8
    unit_id: int = Field(default=1, ge=0, le=255)
    poll_interval: Duration = 1.0
    timeout: Duration = 1.0
    """How long one request may wait for its answer; also the connect timeout."""
    max_registers_per_read: int = Field(
        default=MAX_REGISTERS_PER_READ, ge=1, le=MAX_REGISTERS_PER_READ
    )
    max_bits_per_read: int = Field(default=MAX_BITS_PER_READ, ge=1, le=MAX_BITS_PER_READ)
    max_gap: int = Field(default=16, ge=0, le=MAX_REGISTERS_PER_READ)
    """Unused addresses a coalesced read may bridge (registers, or bits in a bit table)."""
    pause_between_requests: Duration | None = None
    """Silence kept after each answer; RTU always keeps at least 3.5 character times."""
    reconnect_min: Duration = 1.0
    reconnect_max: Duration = 30.0
    heartbeat: Duration = 60.0
    """Default heartbeat of points with a deadband; also how often a bad point is re-reported."""
    points: list[ModbusPoint] = Field(min_length=1)
    """The points one by one: blocks are expanded where they stand (`expand_points`)."""

    @field_validator("points")
    @classmethod
    def _expand_blocks(cls, points: list[ModbusPoint]) -> list[ModbusPoint]:
        return expand_points(points)

    @model_validator(mode="after")
    def _transport_has_its_address(self) -> ModbusSourceConfig:
        if self.transport == "tcp" and not self.host:
            raise ValueError("transport tcp needs host")
        if self.transport == "rtu" and not self.serial_port:
            raise ValueError("transport rtu needs serial_port")
        if self.reconnect_min > self.reconnect_max:
            raise ValueError("reconnect_min must not exceed reconnect_max")
        return self

    @property
    def link_key(self) -> tuple[str, str]:
        """Sources with the same key share one connection or serial line."""
        if self.transport == "rtu":
            assert self.serial_port is not None
            return ("rtu", self.serial_port)
        return ("tcp", f"{self.host}:{self.port}")

    def describe(self) -> str:
        """Where this device is, for log lines and errors."""
        where = self.serial_port if self.transport == "rtu" else f"{self.host}:{self.port}"
        return f"{self.transport} {where} unit {self.unit_id}"

    def problems(self) -> list[tuple[Loc, str]]:
        """Cross-field problems, as (location relative to this source, message).

        A point of a block is located at its entry and index, `("points", 3, 57, "address")`;
        each problem of a block is reported once, with how many more points have it.
        """
        points = self.points
        found = duplicates([p.name for p in points], points, "points", "name")
        checks: list[tuple[Loc, str, str]] = []
        for index, point in enumerate(points):
            width = point.width
            if point.address + width > 65536:
                loc = where(points, "points", index)
                checks.append(
                    ((*loc, "address"), "point runs past address 65535" + _which(point, loc), "end")
                )
            if len(point.name) > 64:  # only a block's pattern can make one: names are checked
                loc = where(points, "points", index)
                checks.append(
                    ((*loc, "name"), f"name {point.name!r} is longer than 64 characters", "long")
                )
            limit = self.max_bits_per_read if point.is_bit_table else self.max_registers_per_read
            if width > limit:
                checks.append(
                    ((*where(points, "points", index), "length"),
                     f"point needs {width} registers, more than one read may fetch "
                     f"(max_registers_per_read is {limit})", "wide")
                )  # fmt: skip
        for (_, later, key), message in overlap_problems(points):
            at = int(later)
            loc = where(points, "points", at)
            checks.append(((*loc, key), message + _which(points[at], loc), "overlap"))
        return found + collapse(checks)


def _which(point: ModbusPoint, loc: Loc) -> str:
    """For a point of a block, which one: its name and address are not written in the file."""
    return f" ({point.name!r} at address {point.address})" if len(loc) == 3 else ""


def expand_points(entries: list[ModbusPoint]) -> list[ModbusPoint]:
    """The points `entries` stand for, in order: each block replaced by its points.

    A block's point `i` is the entry with name `pattern(n_from + i, address)` at
    `address + i * stride`, every other key the same. Returns `entries` itself when it has no
    block, else an `Expanded` list that maps points back to entries. ValueError when the points
    would number more than MAX_POINTS. Addresses past 65535 are kept, for `problems` to report
    with their position.
    """
    return expand(entries, "points", _block_points)


def _block_points(entry: ModbusPoint) -> list[ModbusPoint]:
    """The points of one block entry, addresses `stride` apart, names from its pattern."""
    assert entry.count is not None
    pattern = parse_pattern(entry.name, PLACEHOLDERS)
    stride = entry.stride or entry.width
    first = 1 if entry.n_from is None else entry.n_from
    points = []
    for i in range(entry.count):
        address = entry.address + i * stride
        update = {"name": pattern.fill(first + i, address), "address": address,
                  "count": None, "stride": None, "n_from": None}  # fmt: skip
        points.append(entry.model_copy(update=update))
    return points


def overlap_problems(points: Sequence[ModbusPoint]) -> list[tuple[Loc, str]]:
    """One problem per point whose addresses overlap an earlier point's in the same table.

    Two points reading the same register or bit are two names for one value (or, with
    different types, one of them is wrong): a copy-paste mistake, never intended. The one
    legitimate sharing is bits of one register: `type: bool` points with different `bit`s.
    Reported at the later point (in file order), naming the earlier one.
    """
    found: list[tuple[Loc, str]] = []
    order = sorted(range(len(points)), key=lambda i: (points[i].kind, points[i].address, i))
    widest: int | None = None
    """Index of the point reaching furthest among those seen in the current table."""
    bits: dict[tuple[str, int, int], int] = {}
    """(table, address, bit) -> the first point that reads that bit."""
    for index in order:
        point = points[index]
        if point.bit is not None:
            first = bits.setdefault((point.kind, point.address, point.bit), index)
            if first != index:
                found.append((("points", index, "bit"), _overlap_message(points, first)))
        if widest is not None and points[widest].kind != point.kind:
            widest = None
        if widest is not None:
            other = points[widest]
            shared = point.bit is not None and other.bit is not None  # bits of one register
            if point.address < other.address + other.width and not shared:
                first, later = sorted((widest, index))
                found.append((("points", later, "address"), _overlap_message(points, first)))
        if widest is None or _end(point) > _end(points[widest]):
            widest = index
    return sorted(found)


def _end(point: ModbusPoint) -> int:
    return point.address + point.width


def _overlap_message(points: Sequence[ModbusPoint], index: int) -> str:
    other = points[index]
    last = other.address + other.width - 1
    span = f"{other.kind} {other.address}" + (f"..{last}" if last != other.address else "")
    if other.bit is not None:
        span += f" bit {other.bit}"
    return (
        f"overlaps {path_text(where(points, 'points', index))} ({other.name!r}, {span}); points "
        "may share a register only as different bits of it (type bool with bit)"
    )


_LINE_KEYS = ("baudrate", "parity", "stopbits", "bytesize")


def shared_link_problems(sources: Sequence[object]) -> list[tuple[Loc, str]]:
    """Problems across sources that share a serial line or a TCP device.

    Sources on one RS-485 line must agree on its settings: they share one open port.
    Locations are relative to the top of the file (`sources[3].baudrate`).
    """
    found: list[tuple[Loc, str]] = []
    first: dict[tuple[str, str], tuple[int, ModbusSourceConfig]] = {}
    for index, source in enumerate(sources):
        if not isinstance(source, ModbusSourceConfig):
            continue
        key = source.link_key
        if key in first and source.transport == "rtu":
            other_index, other = first[key]
            found.extend(
                (("sources", index, name),
                 f"{name} differs from sources[{other_index}] on the same serial_port "
                 f"({getattr(source, name)} vs {getattr(other, name)})")
                for name in _LINE_KEYS
                if getattr(source, name) != getattr(other, name)
            )  # fmt: skip
        first.setdefault(key, (index, source))
    return found
