"""Blocks of points (`count`): the same points, plans and decoded values as writing them out, the
same problems located at the entry plus the index in the block, and the bounds on what a file may
make the agent build (points, keys and values, bytes).

(A block-configured source polling a real device: test_modbus_blocks.py.)
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.config import load_config, parse_config
from edge_agent.config import loader as config_loader
from edge_agent.config.blocks import MAX_POINTS, parse_pattern
from edge_agent.config.modbus import ModbusSourceConfig
from edge_agent.errors import ConfigError
from edge_agent.sources.modbus.plan import decode_response, plan_reads

pytestmark = pytest.mark.unit

HEAD = "gateway: {id: gw1}\nsources:\n"


def modbus(points: str, **keys: Any) -> str:
    """A file with one Modbus source whose `points:` list is `points` (indented entries)."""
    extra = "".join(f"    {k}: {v}\n" for k, v in keys.items())
    return (
        HEAD + f"  - type: modbus\n    name: plc\n    host: 10.0.0.5\n{extra}    points:\n{points}"
    )


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "cfg.yaml")
    return [p.render("cfg.yaml") for p in caught.value.problems]


def points_of(text: str) -> list[dict[str, Any]]:
    source = parse_config(text).sources[0]
    assert isinstance(source, ModbusSourceConfig)
    return [p.model_dump() for p in source.points]


BLOCKS = """\
      - {name: mode, register: holding, address: 0}
      - {name: "ft{n:03}", register: holding, address: 10, type: float32, word_order: little,
         unit: m3/h, count: 4}
      - {name: "hr{address}", register: holding, address: 100, count: 3, stride: 5, scale: 0.1}
      - {name: "tag{n}", register: holding, address: 200, type: string, length: 3, count: 2,
         n_from: 7}
      - {name: "run{n}", register: holding, address: 300, type: bool, bit: 3, count: 2}
      - {name: "q{n:02}", register: coil, address: 0, type: bool, count: 3}
      - {name: "e{n}", register: input, address: 0, type: float64, count: 2, deadband: 0.5,
         heartbeat: 10s}
"""

WRITTEN_OUT = """\
      - {name: mode, register: holding, address: 0}
      - {name: ft001, register: holding, address: 10, type: float32, word_order: little, unit: m3/h}
      - {name: ft002, register: holding, address: 12, type: float32, word_order: little, unit: m3/h}
      - {name: ft003, register: holding, address: 14, type: float32, word_order: little, unit: m3/h}
      - {name: ft004, register: holding, address: 16, type: float32, word_order: little, unit: m3/h}
      - {name: hr100, register: holding, address: 100, scale: 0.1}
      - {name: hr105, register: holding, address: 105, scale: 0.1}
      - {name: hr110, register: holding, address: 110, scale: 0.1}
      - {name: tag7, register: holding, address: 200, type: string, length: 3}
      - {name: tag8, register: holding, address: 203, type: string, length: 3}
      - {name: run1, register: holding, address: 300, type: bool, bit: 3}
      - {name: run2, register: holding, address: 301, type: bool, bit: 3}
      - {name: q01, register: coil, address: 0, type: bool}
      - {name: q02, register: coil, address: 1, type: bool}
      - {name: q03, register: coil, address: 2, type: bool}
      - {name: e1, register: input, address: 0, type: float64, deadband: 0.5, heartbeat: 10s}
      - {name: e2, register: input, address: 4, type: float64, deadband: 0.5, heartbeat: 10s}
"""


def test_blocks_expand_to_exactly_the_points_written_out_in_order() -> None:
    assert points_of(modbus(BLOCKS)) == points_of(modbus(WRITTEN_OUT))
    assert len(points_of(modbus(BLOCKS))) == 17


def test_blocks_plan_and_decode_like_the_points_written_out() -> None:
    blocks = parse_config(modbus(BLOCKS)).sources[0]
    written = parse_config(modbus(WRITTEN_OUT)).sources[0]
    assert isinstance(blocks, ModbusSourceConfig) and isinstance(written, ModbusSourceConfig)
    plan = plan_reads(blocks.points)
    assert plan == plan_reads(written.points)
    registers = [(i * 7919) & 0xFFFF for i in range(400)]
    registers[10:12] = struct.unpack(">HH", struct.pack("<f", 1.5)[2:] + struct.pack("<f", 1.5)[:2])
    for request in plan:
        values: list[Any] = registers[request.address : request.end]
        if request.kind in ("coil", "discrete"):
            values = [bool(v & 1) for v in values]
        assert decoded(request, blocks.points, values) == decoded(request, written.points, values)


def decoded(request: Any, points: Any, values: list[Any]) -> list[tuple[int, object]]:
    """decode_response's results, errors as their text (exceptions compare by identity)."""
    return [(i, v if not isinstance(v, Exception) else repr(v))
            for i, v in decode_response(request, points, values)]  # fmt: skip


def test_the_number_and_address_placeholders_with_widths() -> None:
    text = modbus(
        '      - {name: "a{n:03}_{address:05}", register: input, address: 99, count: 2}\n'
        '      - {name: "b{n:02d}", register: input, address: 500, count: 100, n_from: 0}\n'
    )
    names = [p["name"] for p in points_of(text)]
    assert names[:4] == ["a001_00099", "a002_00100", "b00", "b01"]
    assert names[-1] == "b99"
    wide = modbus('      - {name: "c{n:02}", register: input, address: 0, count: 3, n_from: 99}\n')
    assert [p["name"] for p in points_of(wide)] == ["c99", "c100", "c101"]  # padded, never cut


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ('"x{i}"', "unknown placeholder {i} in 'x{i}': use {n} or {address}"),
        ('"x{n:3}"', "unknown placeholder {n:3}"),  # space padding would break the name
        ('"x{n!r}"', "unknown placeholder {n!r}"),
        ('"x{n.__class__}"', "unknown placeholder {n.__class__}"),
        ('"x{0}"', "unknown placeholder {0}"),
        ('"x{}"', "unknown placeholder {}"),
        ('"x{n"', "unmatched '{' in 'x{n'"),
        ('"x}{n}"', "unmatched '}'"),
        ('"x {n}"', "besides placeholders, a name has only letters, digits"),
        ('"x{{n}}"', "besides placeholders, a name has only letters, digits"),
    ],
)
def test_a_bad_pattern_is_refused_at_the_entry_name(name: str, expected: str) -> None:
    [problem] = problems_of(
        modbus(f"      - {{name: {name}, register: input, address: 0, count: 2}}\n")
    )
    assert problem.startswith("cfg.yaml:7:16: sources[0].points[0].name: "), problem
    assert expected in problem


@pytest.mark.parametrize(
    ("entry", "expected"),
    [
        ("name: x, count: 3", "a block of 3 points needs {n} or {address} in its name"),
        ('name: "x{n}"', "name has a placeholder but there is no count"),
        ("name: x, stride: 2", "stride and n_from apply to a block: give count"),
        ("name: x, n_from: 2", "stride and n_from apply to a block: give count"),
        ('name: "x{n}", count: 2, type: float32, stride: 1',
         "stride 1 is less than the 2 registers of one float32"),
        ('name: "x{n}", count: 0', "count: Input should be greater than or equal to 1"),
        ('name: "x{n}", count: 65537', "count: Input should be less than or equal to 65536"),
        ('name: "x{n}", count: 2, bit: 16, type: bool', "bit: Input should be less than"),
        ('name: "x{n}", count: 2, n_from: -1', "n_from: Input should be greater than"),
    ],
)  # fmt: skip
def test_block_keys_that_do_not_fit_are_refused_at_the_entry(entry: str, expected: str) -> None:
    [problem] = problems_of(modbus(f"      - {{{entry}, register: input, address: 0}}\n"))
    assert problem.startswith("cfg.yaml:7:"), problem
    assert "sources[0].points[0]" in problem and expected in problem


def test_a_single_point_block_needs_no_placeholder() -> None:
    text = modbus("      - {name: solo, register: input, address: 4, count: 1}\n")
    assert [(p["name"], p["address"]) for p in points_of(text)] == [("solo", 4)]


def test_duplicates_across_blocks_are_located_at_the_index_once_per_block() -> None:
    problems = problems_of(
        modbus(
            '      - {name: "tt{n}", register: input, address: 0, count: 10}\n'
            "      - {name: mode, register: holding, address: 0}\n"
            '      - {name: "tt{n}",\n'
            "         register: input, address: 100, count: 20, n_from: 6}\n"
            "      - {name: tt3, register: holding, address: 1}\n"
        )
    )
    assert problems == [
        "cfg.yaml:9:16: sources[0].points[2][0].name: duplicate name 'tt6' (also points[0][5]), "
        "and 4 more points of this block",
        "cfg.yaml:11:16: sources[0].points[3].name: duplicate name 'tt3' (also points[0][2])",
    ]


def test_a_block_running_past_65535_is_located_at_the_first_point_that_does() -> None:
    [problem] = problems_of(
        modbus(
            '      - name: "pv{n}"\n'
            "        register: holding\n"
            "        address: 65530\n"
            "        type: float32\n"
            "        count: 5\n"
        )
    )
    assert problem == (
        "cfg.yaml:9:18: sources[0].points[0][3].address: point runs past address 65535 "
        "('pv4' at address 65536), and 1 more point of this block"
    )


def test_names_a_pattern_makes_too_long_and_points_too_wide_for_a_read() -> None:
    long = "x" * 62
    problems = problems_of(
        modbus(
            f'      - {{name: "{long}{{n}}", register: input, address: 0, count: 2000}}\n'
            '      - {name: "s{n}", register: holding, address: 0, type: float64, count: 3}\n',
            max_registers_per_read=2,
        )
    )
    assert problems == [
        f"cfg.yaml:8:16: sources[0].points[0][99].name: name '{long}100' is longer than 64 "
        "characters, and 1900 more points of this block",
        "cfg.yaml:9:9: sources[0].points[1][0].length: point needs 4 registers, more than one "
        "read may fetch (max_registers_per_read is 2), and 2 more points of this block",
    ]


def test_opcua_node_blocks_expand_name_and_node_id_and_locate_their_problems() -> None:
    source = (
        HEAD + "  - type: opcua\n    name: ua\n    endpoint: opc.tcp://h:4840\n"
        "    security: {policy: None}\n    nodes:\n"
    )
    config = parse_config(
        source + '      - {name: "tt{n:02}", node_id: "ns=2;s=Line1.TT{n:02}", count: 2}\n'
        '      - {name: "m{n}", node_id: "ns=3;i={n}", count: 2, n_from: 1001, unit: rpm}\n'
        '      - {name: x, node_id: "ns=2;s={literal}"}\n'
        '      - {name: "b{n}", node_id: "ns=2;s={{b}}{n}", count: 1}\n'
    )
    nodes = config.sources[0].nodes  # type: ignore[union-attr]
    assert [(n.name, n.node_id, n.unit) for n in nodes] == [
        ("tt01", "ns=2;s=Line1.TT01", None), ("tt02", "ns=2;s=Line1.TT02", None),
        ("m1001", "ns=3;i=1001", "rpm"), ("m1002", "ns=3;i=1002", "rpm"),
        ("x", "ns=2;s={literal}", None), ("b1", "ns=2;s={b}1", None),
    ]  # fmt: skip
    problems = problems_of(
        source + '      - {name: "a{n}", node_id: "ns=3;i={n}", count: 3}\n'
        '      - {name: "b{n}", node_id: "ns=3;i={n}", count: 3, n_from: 3}\n'
        '      - {name: "c{n}", node_id: "ns=x;i={n}", count: 4}\n'
        '      - {name: "d{n}", node_id: "ns=3;i=7", count: 2}\n'
        '      - {name: "e{n}", node_id: "ns=3;i={address}", count: 2}\n'
    )
    assert problems == [
        "cfg.yaml:11:9: sources[0].nodes[3]: a block of 2 nodes needs {n} in its name and node_id",
        "cfg.yaml:12:9: sources[0].nodes[4]: unknown placeholder {address} in 'ns=3;i={address}': "
        "use {n}, optionally zero-padded as {n:03}",
    ]
    problems = problems_of(
        source + '      - {name: "a{n}", node_id: "ns=3;i={n}", count: 3}\n'
        '      - {name: "b{n}", node_id: "ns=3;i={n}", count: 3, n_from: 3}\n'
        '      - {name: "c{n}", node_id: "ns=x;i={n}", count: 4}\n'
    )
    assert problems == [
        "cfg.yaml:9:33: sources[0].nodes[1][0].node_id: duplicate node_id 'ns=3;i=3' "
        "(also nodes[0][2])",
        "cfg.yaml:10:33: sources[0].nodes[2][0].node_id: invalid node id 'ns=x;i=1': namespace "
        "index 'x' is not a number from 0 to 65535; expected e.g. "
        "nsu=urn:example:plant;s=Tank.Level, ns=3;i=1001 or i=2258, and 3 more nodes of this block",
    ]


def test_pattern_filling_is_plain_digits_and_nothing_else() -> None:
    pattern = parse_pattern("a{{b}}{n:04}-{address}", ("n", "address"))
    assert pattern.fill(7, 40001) == "a{b}0007-40001"
    assert pattern.fields == {"n", "address"}
    with pytest.raises(ValueError, match="unmatched '{'"):
        parse_pattern("{n:{address}}", ("n", "address"))


# --- Bounds: what one file may make the agent build -----------------------------------------


def test_absurd_point_totals_are_refused_before_anything_is_built() -> None:
    [problem] = problems_of(
        HEAD + "  - {type: simulated, name: s, interval: 1ms, points: 100000000}\n"
    )
    assert problem == (
        "cfg.yaml:3:55: sources[0].points: 100,000,000 points in all, more than the 100,000 one "
        "configuration may have (this entry passes the limit)"
    )
    entry = '      - {name: "p{n}", register: holding, address: 0, count: 65536}\n'
    started = time.process_time()
    [problem] = problems_of(modbus(entry + entry.replace("p{n}", "q{n}")))
    assert time.process_time() - started < 1.0  # refused on the raw data, not after expanding
    assert problem.startswith("cfg.yaml:8:9: sources[0].points[1]: 131,072 points in all")


def test_keys_and_values_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_loader, "MAX_NODES", 50)
    [problem] = problems_of(HEAD + "  - {type: simulated, name: s}\nx: [" + "0, " * 100 + "0]\n")
    assert problem.startswith("cfg.yaml:4:") and "more than 50 keys and values" in problem


def test_deep_nesting_is_refused_where_it_goes_too_deep() -> None:
    [problem] = problems_of("a:\n" + "".join(f"{'  ' * i}- \n" for i in range(1, 80)))
    assert "nested too deeply (more than 64 levels)" in problem
    assert problem.startswith("cfg.yaml:65:")


def test_a_runaway_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "runaway.yaml"
    line = "      - {name: p, register: holding, address: 0}\n"
    path.write_text(modbus(line * (10_000_000 // len(line))))  # 10 MB of points
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    [problem] = caught.value.problems
    assert problem.message.startswith("file is larger than 4 MiB (10,000,")
    assert "write runs of registers as blocks (count)" in problem.message


def test_a_50000_point_gateway_fits_in_blocks_and_written_out(tmp_path: Path) -> None:
    """The limits leave room for 50,000 points either way, and both forms give the same points."""
    blocks = "".join(
        f'      - {{name: "r{d}_{{n:03}}", register: holding, address: {d * 1000}, '
        "type: uint16, count: 1000, scale: 0.1}\n"
        for d in range(50)
    )
    written = "".join(
        f"      - {{name: r{d}_{n:03}, register: holding, address: {d * 1000 + n - 1}, "
        "scale: 0.1}\n"  # uint16, the default type: a register map's typical line
        for d in range(50)
        for n in range(1, 1001)
    )
    loaded = []
    for name, points in (("blocks", blocks), ("written", written)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(modbus(points) + f"signing: {{key_file: {path}}}\n")
        path.chmod(0o600)  # it stands in for the key file too: check-config checks its mode
        assert path.stat().st_size < config_loader.MAX_CONFIG_BYTES
        source = load_config(path).sources[0]  # its time: bench/config_load.py, not a test
        assert isinstance(source, ModbusSourceConfig)
        loaded.append(source.points)
    assert len(loaded[0]) == 50_000 <= MAX_POINTS
    assert [(p.name, p.address, p.scale) for p in loaded[0]] == [
        (p.name, p.address, p.scale) for p in loaded[1]
    ]
