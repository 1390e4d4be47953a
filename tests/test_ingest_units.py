"""The pieces of `edge-agent ingest` that need no server: settings, rows, decoding, the report."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pytest

from edge_agent.consumer.ingest.decode import Accepted, Decoder, Rejection, split_topic
from edge_agent.consumer.ingest.keystore import GatewayTrust
from edge_agent.consumer.ingest.report import render
from edge_agent.consumer.ingest.rows import NonconformingError, RowMaker, text_field, ts_field
from edge_agent.consumer.ingest.settings import load_settings
from edge_agent.consumer.ingest.worker import run_worker
from edge_agent.consumer.ingest.write import multirange, parse_multirange
from edge_agent.reading import Quality, Reading
from edge_agent.seal.columnar import Columns
from edge_agent.seal.envelope import Opener, Sealer
from edge_agent.seal.hwm import HighWaterMark
from edge_agent.seal.keys import key_id, load_private_key, write_keypair
from edge_agent.seal.trust import TrustedKey, TrustSet

pytestmark = pytest.mark.unit


def args(**given: object) -> argparse.Namespace:
    names = ("config", "url", "dsn", "group", "ack_key", "topic_prefix", "client_id", "ca_file",
             "username", "password_file", "max_group", "ack_interval")  # fmt: skip
    return argparse.Namespace(**{n: given.get(n) for n in names})


def test_settings_come_from_the_file_and_options_win(tmp_path: Path) -> None:
    path = tmp_path / "ingest.yaml"
    path.write_text("dsn: host=db\ngroup: plant\nmax_group: 16\nurl: mqtt://b:1883\n")
    settings = load_settings(args(config=str(path), group="other"))
    assert (settings.dsn, settings.group, settings.max_group) == ("host=db", "other", 16)
    assert settings.mqtt_client_id().startswith("edge-agent-ingest-other-")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("dsn: x\nbogus: 1\n", "unknown key bogus"),
        ("dsn: x\nmax_group: many\n", "max_group: expected an integer"),
        ("- a\n", "expected a mapping"),
        ("url: mqtt://b\n", "no --dsn"),
        ("dsn: x\nurl: mqtt://user:pw@b\n", "credentials in the URL"),
        ("dsn: x\ngroup: 'a/b'\n", "group"),
        ("dsn: &d x\nclient_id: *d\n", r"ingest\.yaml: not YAML: alias"),
        ("dsn: " + "[" * 1000 + "]" * 1000, r"ingest\.yaml: not YAML: nested deeper"),
        ("dsn: x\n#" + "x" * 1024**2, r"ingest\.yaml: larger than 1 MiB"),
    ],
)
def test_bad_settings_name_what_is_wrong(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "ingest.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_settings(args(config=str(path)))


def test_copy_text_escapes_what_copy_would_misread() -> None:
    assert text_field("a\tb\nc\\d\re") == "a\\tb\\nc\\\\d\\re"
    with pytest.raises(ValueError, match="NUL"):
        text_field("a\0b")
    assert ts_field(1_700_000_000_123_456_789) == "2023-11-14 22:13:20.123456+00"


def reading(**over: object) -> dict[str, object]:
    return {"seq": 1, "src": "s", "pt": "p", "ts": 10**18, "v": 1.5, "q": "good", **over}


def test_rows_carry_every_value_type_in_its_column() -> None:
    maker = RowMaker()
    lines = maker.rows("gw", "ep", [
        reading(v=1.5), reading(seq=2, v=-(2**63)), reading(seq=3, v=True),
        reading(seq=4, v="on\tline"), reading(seq=5, v=None, q="bad", sc=2147483648),
    ])  # fmt: skip
    fields = [line.rstrip("\n").split("\t") for line in lines]
    assert [f[7:10] for f in fields] == [
        ["1.5", "\\N", "\\N"], [str(-(2**63)), "\\N", "\\N"], ["\\N", "t", "\\N"],
        ["\\N", "\\N", "on\\tline"], ["\\N", "\\N", "\\N"],
    ]  # fmt: skip
    assert fields[4][10:] == ["bad", "2147483648"]
    assert fields[0][:7] == [
        "gw",
        "ep",
        "1",
        "s",
        "p",
        "2001-09-09 01:46:40.000000+00",
        str(10**18),
    ]


@pytest.mark.parametrize(
    "bad",
    [
        reading(v=math.nan), reading(v=math.inf), reading(v=2**64), reading(v=[1]),
        reading(v="a\0b"), reading(q="excellent"), reading(sc=1.5), reading(ts=-1),
        reading(src=3), {"seq": 1},
    ],
)  # fmt: skip
def test_a_reading_that_breaks_the_value_rules_refuses_the_batch(bad: dict[str, object]) -> None:
    with pytest.raises(NonconformingError):
        RowMaker().rows("gw", "ep", [reading(), bad])


def format2_readings(t: int) -> list[Reading]:
    """Every value type, two times, a status code, text needing escapes, names in any order."""
    values: list[object] = [1.5, -(2**63), True, "on\tline", None, 2**64 - 1, 0.1 + 0.2, False]
    return [
        Reading(f"s{i % 3}", f"p.{i % 4}", t + (i // 5) * 1000, v, Quality.GOOD if i % 2 else
                Quality.BAD, 2147483648 if i == 4 else None)  # type: ignore[arg-type]
        for i, v in enumerate(values * 3)
    ]  # fmt: skip


def test_format2_rows_are_made_from_columns_and_equal_the_rows_of_maps(
    gateway: tuple[Sealer, bytes],
) -> None:
    sealer = Sealer(gateway[0].signer._key, payload_format=2)
    payload = sealer.seal(
        gateway="gw", epoch="e1", batch=1, first_seq=7, sealed_ns=time.time_ns(),
        readings=format2_readings(time.time_ns()),
    )  # fmt: skip
    item = Decoder(trust_for(gateway, "gw"), "edge").decode("edge/gw/batch", payload)
    assert isinstance(item, Accepted) and item.batch.columns is not None, item
    assert item.batch.readings == [] and item.first == 7
    maps = Opener([sealer.signer._key.public_key()]).open(payload).readings
    assert item.rows == RowMaker().rows("gw", "e1", maps)


@pytest.mark.parametrize("bad", [math.nan, -math.inf, "a\0b"])
def test_a_format2_batch_that_breaks_the_value_rules_is_refused(
    gateway: tuple[Sealer, bytes], bad: object
) -> None:
    sealer = Sealer(gateway[0].signer._key, payload_format=2)
    readings = format2_readings(time.time_ns())
    readings[5] = readings[5]._replace(value=bad)  # type: ignore[arg-type]
    payload = sealer.seal(
        gateway="gw", epoch="e1", batch=1, first_seq=1, sealed_ns=time.time_ns(),
        readings=readings,
    )  # fmt: skip
    item = Decoder(trust_for(gateway, "gw"), "edge").decode("edge/gw/batch", payload)
    assert isinstance(item, Rejection) and item.reason == "nonconforming", item
    assert "seq 6" in item.detail


@pytest.mark.parametrize(
    ("column", "bad"),
    [
        ("values", math.nan), ("values", math.inf), ("values", 2**64), ("values", [1]),
        ("values", "a\0b"), ("q", "excellent"), ("sc", 1.5), ("sc", 2**63), ("ts", -1),
        ("src", "a\0"),
    ],
)  # fmt: skip
def test_column_rows_keep_the_value_rules_of_the_map_rows(column: str, bad: object) -> None:
    good = {"src": "s", "pt": "p", "ts": 10**18, "values": 1.5, "q": "good", "sc": None}
    fields = {
        name: [value, value, 7 if name == "values" else value] for name, value in good.items()
    }
    fields[column][1] = bad
    columns = Columns(first=5, **fields)  # type: ignore[arg-type]
    with pytest.raises(NonconformingError, match="seq 6"):
        RowMaker().column_rows("gw", "ep", columns)
    fields[column][1] = good[column]
    assert len(RowMaker().column_rows("gw", "ep", Columns(first=5, **fields))) == 3  # type: ignore[arg-type]


def test_multiranges_round_trip() -> None:
    assert parse_multirange("{[1,11),[21,31)}") == [(1, 10), (21, 30)]
    assert parse_multirange("{}") == []
    assert multirange([(1, 10), (21, 30)]) == "{[1,11),[21,31)}"


@pytest.fixture
def gateway(tmp_path: Path) -> tuple[Sealer, bytes]:
    write_keypair(tmp_path)
    key = load_private_key(tmp_path / "signing.key")
    return Sealer(key), key_id(key.public_key())


def trust_for(
    sealer_kid: tuple[Sealer, bytes], owner: str, *, retired: bool = False
) -> GatewayTrust:
    sealer, kid = sealer_kid
    public = sealer.signer._key.public_key()
    return GatewayTrust(TrustSet([TrustedKey(public, kid, retired=retired)]), {kid: owner})


def sealed(sealer: Sealer, gateway: str = "gw", value: object = 1.0) -> bytes:
    return sealer.seal(
        gateway=gateway, epoch="e1", batch=1, first_seq=1, sealed_ns=time.time_ns(),
        readings=[Reading("s", "p", time.time_ns(), value, Quality.GOOD)],  # type: ignore[arg-type]
    )  # fmt: skip


def test_decoding_accepts_a_batch_of_the_enrolled_gateway(gateway: tuple[Sealer, bytes]) -> None:
    decoder = Decoder(trust_for(gateway, "gw"), "edge")
    item = decoder.decode("edge/gw/batch", sealed(gateway[0]))
    assert isinstance(item, Accepted) and len(item.rows) == 1
    assert decoder.decode("other/gw/batch", b"") is None
    assert split_topic("edge/gw/hwm", "edge") == ("gw", "hwm")
    assert split_topic("edge/a/b/batch", "edge") is None


@pytest.mark.parametrize(
    ("topic", "owner", "retired", "payload_gateway", "value", "reason"),
    [
        ("edge/gw/batch", "gw", False, "gw2", 1.0, "wrong_gateway"),  # signed for another
        ("edge/gw/batch", "gw2", False, "gw", 1.0, "wrong_gateway"),  # key of another gateway
        ("edge/gw/batch", "gw", True, "gw", 1.0, "key_not_valid"),
        ("edge/gw/batch", "gw", False, "gw", math.nan, "nonconforming"),
    ],
)
def test_decoding_refuses_with_the_reason(
    gateway: tuple[Sealer, bytes], topic: str, owner: str, retired: bool,
    payload_gateway: str, value: float, reason: str,
) -> None:  # fmt: skip
    decoder = Decoder(trust_for(gateway, owner, retired=retired), "edge")
    item = decoder.decode(topic, sealed(gateway[0], payload_gateway, value))
    assert isinstance(item, Rejection) and item.reason == reason, item
    assert item.kid == gateway[1].hex() and item.payload_bytes > 0


def test_decoding_refuses_tampered_malformed_and_unknown(gateway: tuple[Sealer, bytes]) -> None:
    decoder = Decoder(GatewayTrust(TrustSet([]), {}), "edge")
    unknown = decoder.decode("edge/gw/batch", sealed(gateway[0]))
    assert isinstance(unknown, Rejection) and unknown.reason == "unknown_key"
    decoder.set_trust(trust_for(gateway, "gw"))
    tampered = bytearray(sealed(gateway[0]))
    tampered[-3] ^= 1
    bad = decoder.decode("edge/gw/batch", bytes(tampered))
    assert isinstance(bad, Rejection) and bad.reason == "bad_signature"
    junk = decoder.decode("edge/gw/batch", b"\xff" * 5000)
    assert isinstance(junk, Rejection) and junk.reason == "malformed"
    assert len(junk.payload) == 4096 and junk.payload_bytes == 5000
    mark = decoder.decode("edge/gw/hwm", b"junk")
    assert isinstance(mark, Rejection) and mark.reason == "malformed"


def mark(sealer: Sealer, gateway: str = "gw", epoch: str = "e1") -> bytes:
    """A high-water mark as the agent seals it (seal/hwm.py), signed with `sealer`'s key."""
    return HighWaterMark(gateway, epoch, 35, 4, time.time_ns()).seal(sealer.signer)


def test_decoding_accepts_the_mark_of_the_enrolled_gateway(gateway: tuple[Sealer, bytes]) -> None:
    item = Decoder(trust_for(gateway, "gw"), "edge").decode("edge/gw/hwm", mark(gateway[0]))
    assert isinstance(item, HighWaterMark), item
    assert (item.gateway, item.epoch, item.seq, item.batch, item.kid) == (
        "gw", "e1", 35, 4, gateway[1],
    )  # fmt: skip


@pytest.mark.parametrize(
    ("owner", "retired", "mark_gateway", "epoch", "reason"),
    [
        ("gw", False, "gw2", "e1", "wrong_gateway"),  # a mark for another gateway
        ("gw2", False, "gw", "e1", "wrong_gateway"),  # signed by a key of another gateway
        ("gw", True, "gw", "e1", "key_not_valid"),
        ("gw", False, "gw", "e\0", "malformed"),  # no PostgreSQL text holds a NUL
    ],
)
def test_decoding_refuses_a_mark_with_the_reason(
    gateway: tuple[Sealer, bytes], owner: str, retired: bool, mark_gateway: str, epoch: str,
    reason: str,
) -> None:  # fmt: skip
    decoder = Decoder(trust_for(gateway, owner, retired=retired), "edge")
    item = decoder.decode("edge/gw/hwm", mark(gateway[0], mark_gateway, epoch))
    assert isinstance(item, Rejection) and item.reason == reason, item
    assert item.kid == gateway[1].hex() and "high-water mark" in item.detail


def test_decoding_refuses_a_tampered_or_unknown_mark(gateway: tuple[Sealer, bytes]) -> None:
    unknown = Decoder(GatewayTrust(TrustSet([]), {}), "edge").decode(
        "edge/gw/hwm", mark(gateway[0])
    )
    assert isinstance(unknown, Rejection) and unknown.reason == "unknown_key", unknown
    tampered = bytearray(mark(gateway[0]))
    tampered[-3] ^= 1
    bad = Decoder(trust_for(gateway, "gw"), "edge").decode("edge/gw/hwm", bytes(tampered))
    assert isinstance(bad, Rejection) and bad.reason == "bad_signature", bad


def test_the_report_fails_on_holes_only() -> None:
    stream = {"gateway": "gw", "epoch": "e1", "readings": 10, "duplicates": 0, "max_seq": 20,
              "hwm": 25, "evicted": 5}  # fmt: skip
    gap = {"gateway": "gw", "epoch": "e1", "first": 21, "last": 25, "kind": "tail", "detail": "x"}
    code, lines = render({"streams": [stream], "gaps": [gap], "rejected": {"bad_signature": 2}})
    assert code == 0 and any(line.startswith("NOT YET RECEIVED") for line in lines)
    assert "REJECTED 2 messages: bad_signature (see the table `rejected`)" in lines
    hole = {**gap, "first": 3, "last": 7, "kind": "hole"}
    code, lines = render({"streams": [stream], "gaps": [hole, gap], "rejected": {}})
    assert code == 4 and lines[-1].startswith("INCOMPLETE")
    assert any("HOLE: gateway=gw epoch=e1 readings=5 seq 3..7" in line for line in lines)


def test_the_example_configuration_loads() -> None:
    example = Path(__file__).parent.parent / "config" / "ingest.example.yaml"
    settings = load_settings(args(config=str(example)))
    assert settings.client_id == "ingest-db1-1" and settings.url.startswith("mqtts://")
    assert settings.keys_refresh == 10 and settings.ack_key is not None


@pytest.mark.parametrize(
    ("option", "problem"),
    [
        ("ack_key", "ack_key: {missing}: No such file or directory"),
        ("ack_key", "ack_key: {loose} is readable by others (mode 644)"),
        ("password_file", "password_file: {missing}: No such file or directory"),
    ],
)
def test_an_unusable_ack_key_or_password_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, problem: str
) -> None:
    """Found by the acceptance check: `ingest run` with a missing or world-readable ack key, or
    a missing password file, ended in a traceback (exit 1); it is a bad argument (contract §1),
    said in one line before anything is connected (the DSN and URL lead nowhere, and a unit
    test may not connect)."""
    write_keypair(tmp_path / "loose")
    loose = tmp_path / "loose" / "signing.key"
    loose.chmod(0o644)
    missing = tmp_path / "missing"
    file = {"ack_key": loose if "644" in problem else missing, "password_file": missing}
    settings = load_settings(
        args(dsn="host=/nonexistent", url="mqtt://127.0.0.1:9", username="u",
             **{option: str(file[option])})
    )  # fmt: skip
    assert run_worker(settings) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [lines[0]], lines
    assert lines[0].startswith("ingest run: " + problem.format(missing=missing, loose=loose))
