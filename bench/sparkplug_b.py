"""Sparkplug B payloads for the wire-size comparison (bench/wire_size.py), with protobuf.

The Sparkplug libraries on PyPI (pysparkplug, mqtt-spb-wrapper) pin paho-mqtt below 2, which
edge-agent's aiomqtt cannot run with, so the messages are built here from the published schema
(`sparkplug_b.proto` of the Eclipse Sparkplug specification, package
`org.eclipse.tahu.protobuf`), the part a DDATA message uses: `Payload` (timestamp 1, metrics 2,
seq 3) and `Payload.Metric` (name 1, alias 2, timestamp 3, datatype 4, is_null 7, and the value
oneof: int_value 10, long_value 11, float_value 12, double_value 13, boolean_value 14,
string_value 15). Field numbers and types are the specification's, so the bytes are what any
Sparkplug B implementation writes for the same message. The descriptor is built in Python with
protobuf's `descriptor_pb2` (no protoc step). Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "org.eclipse.tahu.protobuf"
F = descriptor_pb2.FieldDescriptorProto

METRIC_FIELDS = (
    ("name", 1, F.TYPE_STRING, None),
    ("alias", 2, F.TYPE_UINT64, None),
    ("timestamp", 3, F.TYPE_UINT64, None),
    ("datatype", 4, F.TYPE_UINT32, None),
    ("is_null", 7, F.TYPE_BOOL, None),
    ("int_value", 10, F.TYPE_UINT32, 0),
    ("long_value", 11, F.TYPE_UINT64, 0),
    ("float_value", 12, F.TYPE_FLOAT, 0),
    ("double_value", 13, F.TYPE_DOUBLE, 0),
    ("boolean_value", 14, F.TYPE_BOOL, 0),
    ("string_value", 15, F.TYPE_STRING, 0),
)
"""(name, number, type, oneof index) of the Metric fields used; oneof 0 is `value`."""

DATATYPE = {"Int64": 4, "UInt64": 8, "Double": 10, "Boolean": 11, "String": 12}


def _classes() -> tuple[Any, Any]:
    file = descriptor_pb2.FileDescriptorProto(
        name="sparkplug_b.proto", package=PACKAGE, syntax="proto2"
    )
    payload = file.message_type.add(name="Payload")
    payload.field.add(name="timestamp", number=1, type=F.TYPE_UINT64, label=F.LABEL_OPTIONAL)
    payload.field.add(
        name="metrics",
        number=2,
        type=F.TYPE_MESSAGE,
        label=F.LABEL_REPEATED,
        type_name=f".{PACKAGE}.Payload.Metric",
    )
    payload.field.add(name="seq", number=3, type=F.TYPE_UINT64, label=F.LABEL_OPTIONAL)
    metric = payload.nested_type.add(name="Metric")
    metric.oneof_decl.add(name="value")
    for name, number, kind, oneof in METRIC_FIELDS:
        field = metric.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL)
        if oneof is not None:
            field.oneof_index = oneof
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Payload")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Payload.Metric")),
    )


Payload, Metric = _classes()


def ddata(timestamp_ms: int, seq: int, metrics: list[tuple[int, int, Any]]) -> bytes:
    """A DDATA payload: `metrics` as (alias, timestamp ms, value), names left to the DBIRTH.

    As the specification asks of DATA messages: the alias instead of the name, a timestamp
    per metric, no datatype (it was given in the birth certificate); a None value is
    `is_null`. Integers go in `long_value` (two's complement for negatives, as Int64).
    """
    payload = Payload(timestamp=timestamp_ms, seq=seq % 256)
    for alias, ts_ms, value in metrics:
        metric = payload.metrics.add(alias=alias, timestamp=ts_ms)
        if value is None:
            metric.is_null = True
        elif isinstance(value, bool):
            metric.boolean_value = value
        elif isinstance(value, int):
            metric.long_value = value & 0xFFFFFFFFFFFFFFFF
        elif isinstance(value, float):
            metric.double_value = value
        else:
            metric.string_value = value
    return bytes(payload.SerializeToString())
