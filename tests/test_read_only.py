"""Read-only toward the plant, checked in the code itself (docs/contract.md §5.1).

The integration tests record every request the test devices receive; this test fails as soon as
the code base *calls* a device-write API at all, wherever it is, before any device sees it: the
pymodbus write functions, asyncua's write, method-call and node-management services. And the
agent's own Modbus layer (frames.py) builds no request but a read.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import edge_agent
from edge_agent.sources.modbus import frames, link
from edge_agent.sources.modbus.plan import FUNCTION_CODES

pytestmark = pytest.mark.unit

PACKAGE = Path(edge_agent.__file__).parent

WRITE_APIS = {
    # pymodbus client mixin (ModbusClientMixin): function codes 5, 6, 15, 16, 22, 23, 21
    "write_coil", "write_coils", "write_register", "write_registers", "readwrite_registers",
    "mask_write_register", "write_file_record",
    # asyncua client side: Write, Call, AddNodes, DeleteNodes, references, history
    "write_value", "set_value", "write_attribute", "set_attribute", "write_params",
    "write_attributes", "call_method", "call", "add_nodes", "delete_nodes", "add_references",
    "delete_references", "history_update", "add_variable", "add_object", "add_folder",
    "add_method", "add_property", "delete",
}  # fmt: skip
"""Attribute names whose call would write to a device (or change its address space)."""

SIMULATED_DEVICES = {
    "demo/opcua_device.py": "the demo's own OPC UA server builds and updates its address space",
    "demo/modbus_device.py": "the demo's own Modbus server holds its simulated registers",
}
"""Files that are devices, not clients of one: they serve data, so they write their own."""


def write_calls(path: Path, root: Path = PACKAGE) -> list[str]:
    """`file:line name` of every use of an attribute named in WRITE_APIS in `path`: a call, or a
    reference (a method passed on to be called later)."""
    tree = ast.parse(path.read_text(), str(path))
    called = {id(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in WRITE_APIS:
            how = "" if id(node) in called else " (referenced)"
            found.append((node.lineno, f"{path.relative_to(root)}:{node.lineno} {node.attr}{how}"))
    return [text for _, text in sorted(found)]


def test_no_code_of_the_agent_calls_a_device_write_api() -> None:
    scanned = [
        p for p in sorted(PACKAGE.rglob("*.py"))
        if str(p.relative_to(PACKAGE)) not in SIMULATED_DEVICES
    ]  # fmt: skip
    assert len(scanned) > 40
    calls = [call for path in scanned for call in write_calls(path)]
    assert calls == [], "the agent must never write to a device (docs/contract.md §5.1)"


def test_the_scanner_finds_a_write_call(tmp_path: Path) -> None:
    """The check above can fail: a file that writes is caught, call or reference."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "async def f(client, node, handler):\n"
        "    await client.write_registers(0, [1])\n"
        "    await node.write_value(3)\n"
        "    handler(node.call_method)\n"
    )
    assert [c.split(" ", 1)[1] for c in write_calls(sample, tmp_path)] == [
        "write_registers",
        "write_value",
        "call_method (referenced)",
    ]


def test_only_simulated_devices_are_exempt_and_they_are_servers() -> None:
    for name in SIMULATED_DEVICES:
        text = (PACKAGE / name).read_text()
        assert "Server" in text, f"{name} is exempt as a device: it must be a server"


def test_the_modbus_layer_builds_read_requests_only() -> None:
    assert set(FUNCTION_CODES.values()) == frames.READ_FUNCTIONS == {1, 2, 3, 4}
    for function in range(256):
        if function in frames.READ_FUNCTIONS:
            assert frames.read_pdu(function, 0, 1)[0] == function
        else:
            with pytest.raises(ValueError, match="is not a read"):
                frames.read_pdu(function, 0, 1)


def test_the_modbus_link_has_no_write_method() -> None:
    names = {
        name for cls in vars(link).values()
        if isinstance(cls, type) and cls.__module__ == link.__name__
        for name in dir(cls) if name in WRITE_APIS or name.startswith("write_")
    }  # fmt: skip
    assert names == set()


def test_pymodbus_is_used_for_decoding_only() -> None:
    """No pymodbus client (which has write methods) is imported anywhere but the devices."""
    for path in sorted(PACKAGE.rglob("*.py")):
        if str(path.relative_to(PACKAGE)) in SIMULATED_DEVICES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pymodbus"):
                assert node.module == "pymodbus.client.mixin", f"{path}: {node.module}"
                assert [a.name for a in node.names] == ["ModbusClientMixin"], path
