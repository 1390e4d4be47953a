"""Configuration files shared by tests (str.format templates: `{dir}` is the test's directory)."""

from __future__ import annotations

TWO_PLCS_AND_SIM = """
gateway: {{id: gw-1}}
store: {{path: {dir}/buffer.db}}
signing: {{key_file: {dir}/keys/signing.key}}
sources:
  - type: modbus
    name: plc-1
    host: 10.0.0.5
    max_registers_per_read: 60
    points:
      - {{name: "t{{n:03}}", register: holding, address: 100, type: float32, count: 40,
          scale: 0.1, deadband: 0.5}}
      - {{name: flag, register: coil, address: 3, type: bool}}
      - {{name: serial, register: input, address: 10, type: string, length: 8}}
  - type: modbus
    name: plc-2
    host: 10.0.0.6
    unit_id: 3
    points:
      - {{name: "r{{address}}", register: holding, address: 0, type: uint16, count: 300}}
  - {{type: simulated, name: sim, points: 3}}
"""
"""Two Modbus sources (a block of float32 with scale and deadband, a coil, a string; a block of
300 uint16 named by address) and a simulated one: what `Blueprint` must carry for each kind."""
