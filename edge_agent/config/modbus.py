"""Configuration of Modbus sources (TCP and RTU): devices, points, types and orders."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edge_agent.config.types import Duration, Name, StrictModel

RegisterKind = Literal["coil", "discrete", "input", "holding"]
PointType = Literal[
    "bool", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64", "string"
]
Order = Literal["big", "little"]

REGISTERS_PER_TYPE: dict[str, int] = {
    "bool": 1, "int16": 1, "uint16": 1, "int32": 2, "uint32": 2,
    "int64": 4, "uint64": 4, "float32": 2, "float64": 4,
}


class ModbusPoint(StrictModel):
    name: Name
    kind: RegisterKind = Field(alias="register")
    address: int = Field(ge=0, le=65535)
    type: PointType = "uint16"
    byte_order: Order = "big"
    word_order: Order = "big"
    scale: float = 1.0
    offset: float = 0.0
    unit: str | None = None
    length: int | None = Field(default=None, ge=1, le=125)
    bit: int | None = Field(default=None, ge=0, le=15)

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
        return self

    @property
    def width(self) -> int:
        """Registers (or bits, for coils and discrete inputs) this point occupies."""
        if self.type == "string":
            assert self.length is not None
            return self.length
        return REGISTERS_PER_TYPE[self.type]


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
    points: list[ModbusPoint] = Field(min_length=1)

    @model_validator(mode="after")
    def _transport_has_its_address(self) -> ModbusSourceConfig:
        if self.transport == "tcp" and not self.host:
            raise ValueError("transport tcp needs host")
        if self.transport == "rtu" and not self.serial_port:
            raise ValueError("transport rtu needs serial_port")
        return self

    def problems(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Cross-field problems, as (location relative to this source, message)."""
        found: list[tuple[tuple[str | int, ...], str]] = []
        seen: dict[str, int] = {}
        for index, point in enumerate(self.points):
            if point.name in seen:
                found.append(
                    (("points", index, "name"),
                     f"duplicate point name {point.name!r} (also points[{seen[point.name]}])")
                )
            seen.setdefault(point.name, index)
            if point.address + point.width > 65536:
                found.append((("points", index, "address"), "point runs past address 65535"))
        return found
