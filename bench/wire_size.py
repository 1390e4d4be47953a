"""Bytes per reading on the wire, and the CPU to seal them: payload format 1 against format 2.

The reference readings are the "plant mix" of bench/plant_mix.py (200 tags, 4 sources, the
signal kinds a mine or process plant sends), polled every 1 s and every 100 ms, sealed in
batches of 1,000 and 10,000 readings. For each, the bytes on the wire per reading:

- **edge-agent format 1 / format 2**: the sealed batch exactly as the agent stores and sends it
  (CBOR, zstd level 3 for format 1 and 6 for format 2, COSE_Sign1 with Ed25519), in an MQTT 5
  PUBLISH at QoS 1 on `edge/plant-gw01/batch` (fixed header, remaining length, topic, packet id,
  empty properties) plus its PUBACK (4 bytes). "format 2": self-contained batches (each carries
  its points' names: `batch.catalogue: false`); "format 2 + catalogue": the default since
  contract 2.4, batches that reference the point catalogue (§4.12), whose own message (a
  retained PUBLISH on `edge/plant-gw01/catalogue/{digest}` and its PUBACK) is counted once per
  case: `--readings` 100,000 are 8 minutes of the mix at 1 s and 50 s at 100 ms, so the agent
  publishes its catalogue as often as if the link reconnected every 8 minutes (or every 50 s).
- **ThingsBoard gateway JSON**: the same readings as the IoT gateway's telemetry message
  (`v1/gateway/telemetry`: `{"device": [{"ts": ms, "values": {"key": value}}, ...]}`, compact
  JSON, one message per batch, each reading under its source and millisecond timestamp), MQTT
  3.1.1 PUBLISH at QoS 1 plus PUBACK. No quality or status code (the API has none; a bad
  reading is `null`) and milliseconds, not nanoseconds: less information than the agent sends.
- **Sparkplug B**: DDATA messages of the specification's protobuf schema (bench/sparkplug_b.py):
  metric aliases instead of names (the names travel once in the DBIRTH, not counted), a
  millisecond timestamp per metric, no datatype, `is_null` for a bad reading, no quality
  property. "per poll": one DDATA per device and poll, as edge nodes publish them, at QoS 0
  as the specification publishes DATA messages (no packet id, no PUBACK); "per batch": one
  DDATA per device and batch (every metric with its own timestamp).

TCP/IP and TLS framing are not counted: they depend on the link, not on the format.

Then the CPU to seal (encode, compress, sign) and to open (verify, decompress, decode) 100,000
readings in this process, format 1 and format 2 alternately, best of `--repeat` runs.

    .venv/bin/pip install -e '.[bench]'       # protobuf, for Sparkplug B
    .venv/bin/python bench/wire_size.py       # about a minute
    .venv/bin/python bench/wire_size.py --json out.json

Results and their reading: docs/performance.md ("Bytes on the wire").
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from collections.abc import Callable, Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import plant_mix
import sparkplug_b
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.reading import Reading
from edge_agent.seal.catalogue import Catalogue, catalogue_topic
from edge_agent.seal.envelope import Opener, Sealer

GATEWAY = "plant-gw01"
EPOCH = "0f3a9c2e7b1d4e6f8a2b3c4d5e6f7a8b"
PUBACK = 4  # fixed header (2) + packet id (2); MQTT 5 omits the reason code when it is success


def publish_bytes(topic: str, payload: bytes, *, qos: int, mqtt5: bool) -> int:
    """The size of an MQTT PUBLISH packet carrying `payload` (and no properties)."""
    body = 2 + len(topic.encode()) + (2 if qos else 0) + (1 if mqtt5 else 0) + len(payload)
    length = 1
    while body >= 128**length:
        length += 1
    return 1 + length + body


def agent_wire(
    payload_format: int, key: Ed25519PrivateKey, *, catalogue: bool = False
) -> Callable[[list[Reading]], int]:
    sealer = Sealer(key, payload_format=payload_format, catalogue=catalogue)
    topic = f"edge/{GATEWAY}/batch"
    state = {"seq": 1, "batch": 1}
    published: set[bytes] = set()

    def wire(chunk: list[Reading]) -> int:
        data = sealer.seal(
            gateway=GATEWAY,
            epoch=EPOCH,
            batch=state["batch"],
            first_seq=state["seq"],
            readings=chunk,
            sealed_ns=time.time_ns(),
        )
        state["seq"] += len(chunk)
        state["batch"] += 1
        size = publish_bytes(topic, data, qos=1, mqtt5=True) + PUBACK
        used = sealer.catalogue
        if used is not None and used.digest not in published:  # once per connection
            published.add(used.digest)
            where = catalogue_topic("edge", GATEWAY, used.digest)
            size += publish_bytes(where, used.payload, qos=1, mqtt5=True) + PUBACK
        return size

    return wire


def thingsboard_wire(chunk: list[Reading]) -> int:
    devices: dict[str, list[dict[str, Any]]] = {}
    for (src, ts_ms), group in groupby(chunk, key=lambda r: (r.src, r.ts_ns // 1_000_000)):
        devices.setdefault(src, []).append({"ts": ts_ms, "values": {r.pt: r.value for r in group}})
    payload = json.dumps(devices, separators=(",", ":"), allow_nan=False).encode()
    return publish_bytes("v1/gateway/telemetry", payload, qos=1, mqtt5=False) + PUBACK


class Sparkplug:
    """DDATA messages per device: per poll (contiguous readings of a source) or per batch."""

    def __init__(self, per_batch: bool) -> None:
        self.per_batch = per_batch
        self.aliases: dict[tuple[str, str], int] = {}
        self.seq = 0

    def wire(self, chunk: list[Reading]) -> int:
        groups: list[tuple[str, list[Reading]]]
        if self.per_batch:
            by_source: dict[str, list[Reading]] = {}
            for reading in chunk:
                by_source.setdefault(reading.src, []).append(reading)
            groups = list(by_source.items())
        else:
            groups = [(src, list(group)) for src, group in groupby(chunk, key=lambda r: r.src)]
        total = 0
        for src, readings in groups:
            metrics = [(self.aliases.setdefault((r.src, r.pt), len(self.aliases)),
                        r.ts_ns // 1_000_000, r.value) for r in readings]  # fmt: skip
            payload = sparkplug_b.ddata(metrics[0][1], self.seq, metrics)
            self.seq += 1
            topic = f"spBv1.0/plant/DDATA/{GATEWAY}/{src}"
            total += publish_bytes(topic, payload, qos=0, mqtt5=False)
        return total


def per_reading(
    readings: Sequence[Reading], size: int, wire: Callable[[list[Reading]], int]
) -> float:
    chunks = [list(readings[i : i + size]) for i in range(0, len(readings), size)]
    return sum(map(wire, chunks)) / len(readings)


def sizes(readings: Sequence[Reading], size: int, key: Ed25519PrivateKey) -> dict[str, float]:
    return {
        "format 1": per_reading(readings, size, agent_wire(1, key)),
        "format 2": per_reading(readings, size, agent_wire(2, key)),
        "format 2 + catalogue": per_reading(readings, size, agent_wire(2, key, catalogue=True)),
        "ThingsBoard JSON": per_reading(readings, size, thingsboard_wire),
        "Sparkplug B per poll": per_reading(readings, size, Sparkplug(per_batch=False).wire),
        "Sparkplug B per batch": per_reading(readings, size, Sparkplug(per_batch=True).wire),
    }


def cpu(
    readings: Sequence[Reading], size: int, key: Ed25519PrivateKey, repeat: int
) -> dict[str, float]:
    """CPU seconds per 100,000 readings to seal and to open, per format (best of `repeat`).

    Each run's Sealer has sealed the same readings once before it is timed (the steady state of
    a running agent: format 1 has its names encoded, format 2 its batch shapes and decimal
    places); bench/seal_cpu.py --cold measures first sight."""
    chunks = [list(readings[i : i + size]) for i in range(0, len(readings), size)]
    opener = Opener([key.public_key()])
    best: dict[str, float] = {}
    sealed: dict[str, list[bytes]] = {}
    scale = 100_000 / len(readings)
    gc.collect()
    gc.freeze()  # as the agent does after start-up (agent.tune_garbage_collector)
    for _ in range(repeat):
        for variant in ("1", "2", "2c"):
            sealer = Sealer(key, payload_format=int(variant[0]), catalogue=variant == "2c")
            for i, chunk in enumerate(chunks):  # warm: every point seen, as in a running agent
                sealer.seal(gateway=GATEWAY, epoch=EPOCH, batch=i + 1, first_seq=i * size + 1,
                            readings=chunk, sealed_ns=0)  # fmt: skip
            if sealer.catalogue is not None:  # the consumer has it, as it would
                used = sealer.catalogue
                opener.catalogues[used.digest] = Catalogue.parse(used.payload, used.digest)
            start = time.process_time()
            sealed[variant] = [
                sealer.seal(gateway=GATEWAY, epoch=EPOCH, batch=i + 1, first_seq=i * size + 1,
                            readings=chunk, sealed_ns=0)
                for i, chunk in enumerate(chunks)
            ]  # fmt: skip
            seal_s = (time.process_time() - start) * scale
            start = time.process_time()
            for message in sealed[variant]:
                opener.open(message)
            open_s = (time.process_time() - start) * scale
            for name, value in ((f"seal {variant}", seal_s), (f"open {variant}", open_s)):
                best[name] = min(best.get(name, value), value)
    gc.unfreeze()
    return best


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--readings", type=int, default=100_000, help="readings per case")
    parser.add_argument("--repeat", type=int, default=5, help="CPU runs per format (best kept)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    key = Ed25519PrivateKey.generate()
    results: dict[str, Any] = {"mix": {}, "kinds": {}, "cpu": {}}
    print(f"wire size of the plant mix: {args.readings:,} readings per case, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}\n")  # fmt: skip

    columns = [
        "format 1",
        "format 2",
        "format 2 + catalogue",
        "ThingsBoard JSON",
        "Sparkplug B per poll",
        "Sparkplug B per batch",
    ]
    rows = []
    for interval in (1.0, 0.1):
        readings = plant_mix.readings(args.readings, interval)
        for size in (1_000, 10_000):
            found = sizes(readings, size, key)
            results["mix"][f"{interval:g}s/{size}"] = found
            rows.append([f"{interval:g} s", f"{size:,}", *(f"{found[c]:.2f}" for c in columns)])
    print("Bytes per reading on the wire, plant mix (MQTT framing and COSE included):\n")
    print(table(["interval", "batch", *columns], rows))

    rows = []
    for kind in plant_mix.KINDS:
        readings = plant_mix.readings(args.readings // 2, 1.0, kinds=(kind,))
        found = sizes(readings, 1_000, key)
        results["kinds"][kind] = found
        rows.append([kind, *(f"{found[c]:.2f}" for c in columns)])
    print("\nBy signal kind (each kind's tags alone, 1 s, batches of 1,000):\n")
    print(table(["kind", *columns], rows))

    rows = []
    for interval, size in ((1.0, 1_000), (1.0, 10_000), (0.1, 1_000)):
        readings = plant_mix.readings(args.readings, interval)
        found = cpu(readings, size, key, args.repeat)
        results["cpu"][f"{interval:g}s/{size}"] = found
        rows.append([f"{interval:g} s", f"{size:,}",
                     *(f"{found[n]:.3f}" for n in ("seal 1", "seal 2", "seal 2c", "open 1",
                                                   "open 2", "open 2c")),
                     f"{100_000 / found['seal 2c']:,.0f}"])  # fmt: skip
    print(f"\nCPU seconds per 100,000 readings (best of {args.repeat}, load "
          f"{os.getloadavg()[0]:.2f}):\n")  # fmt: skip
    print(
        table(
            [
                "interval",
                "batch",
                "seal f1",
                "seal f2",
                "seal f2+c",
                "open f1",
                "open f2",
                "open f2+c",
                "f2+c sealed/s",
            ],
            rows,
        )
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
